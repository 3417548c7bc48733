"""The Kubernetes training pod, rendered without a cluster: what the settings put in the pod
spec, the errors a bad config gives, the refresh DAG's `train` task as a pod, and the pinned
trainer image. The tests marked `dags` need Airflow and the cncf-kubernetes provider (.venv).

docker/trainer-pod.example.yaml is rendered from EXAMPLE_CONFIG below; after a change, rewrite it:
    TUNELOOP_UPDATE_EXAMPLES=1 .venv/bin/python -m pytest tests/unit/test_kubernetes_pod.py -k example
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tuneloop import cli
from tuneloop.config import ConfigError, load_settings
from tuneloop.kubernetes import (
    CANDIDATE_TEMPLATE,
    SNAPSHOT_TEMPLATE,
    TRAINED_SNAPSHOT_TEMPLATE,
    XCOM_RESULT_PATH,
    pod_environment,
    pod_operator_kwargs,
    settings_at_parse_time,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MANIFEST = ROOT / "docker/trainer-pod.example.yaml"

# The config of the README's "Training on Kubernetes" and of docker/trainer-pod.example.yaml.
EXAMPLE_CONFIG = """\
training_runner: kubernetes
store:
  uri: s3://tuneloop/prod
  endpoint_url: http://minio.storage.svc:9000
model:
  base_model: /var/lib/tuneloop/models/Llama-3.2-1B-Instruct   # copied onto the work volume once
kubernetes:
  namespace: ml-training
  image: registry.example.com/tuneloop-trainer:0.1.0-cu128
  service_account: tuneloop-trainer
  gpus: 1
  cpu_request: "8"
  cpu_limit: "16"
  memory_request: 48Gi
  memory_limit: 64Gi
  node_selector:
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
  work_volume_claim: tuneloop-trainer-work   # adapters + checkpoints: a retried pod resumes
  secret_env_from: [tuneloop-store-credentials]   # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
"""

# Enough to make the kubernetes runner valid, as environment variables.
K8S_ENV = {
    "TUNELOOP__TRAINING_RUNNER": "kubernetes",
    "TUNELOOP__STORE__URI": "s3://tuneloop/prod",
    "TUNELOOP__KUBERNETES__NAMESPACE": "ml-training",
    "TUNELOOP__KUBERNETES__IMAGE": "registry.example.com/tuneloop-trainer:0.1.0-cu128",
}


def _example_settings(tmp_path: Path) -> Any:
    path = tmp_path / "tuneloop.yaml"
    path.write_text(EXAMPLE_CONFIG)
    return load_settings(path, env={})


def _render(settings: Any, *, context: dict[str, Any] | None = None, random_suffix: bool = True, component: str = "train") -> Any:
    """The V1Pod the operator would create, built by the provider itself (dry run: no cluster)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    operator = KubernetesPodOperator(task_id=component, **pod_operator_kwargs(settings, component=component))
    operator.random_name_suffix = random_suffix
    return operator.build_pod_request_obj(context, dry_run=True)


def _manifest(pod: Any) -> dict[str, Any]:
    """The pod as a Kubernetes manifest (camelCase keys, no nulls), as `kubectl apply` reads it."""
    from kubernetes.client import ApiClient

    return dict(ApiClient().sanitize_for_serialization(pod))


@pytest.fixture
def kube_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider reads the XCom sidecar's image from the cluster connection: an empty one."""
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes"}))


# --- settings (no Airflow) ----------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TUNELOOP__KUBERNETES__IMAGE": "registry.example.com/tuneloop-trainer:latest"}, ["kubernetes.image", "'latest' is not pinned"]),
        ({"TUNELOOP__KUBERNETES__IMAGE": "registry.example.com:5000/tuneloop-trainer"}, ["kubernetes.image", "has no tag"]),
        (
            {"TUNELOOP__KUBERNETES__GPUS": "0", "TUNELOOP__TRAINING__DEVICE": "cpu", "TUNELOOP__KUBERNETES__NODE_SELECTOR": "{nvidia.com/gpu.present: 'true'}"},
            ["kubernetes.gpus=0", "nvidia.com/gpu.present"],
        ),
        ({"TUNELOOP__KUBERNETES__NAMESPACE": ""}, ["training_runner=kubernetes needs kubernetes.namespace"]),
        ({"TUNELOOP__KUBERNETES__NAMESPACE": "ML_Training"}, ["kubernetes.namespace", "pattern"]),
        ({"TUNELOOP__STORE__URI": "/data/store"}, ["needs an s3:// store", "/data/store"]),
        ({"TUNELOOP__KUBERNETES__GPUS": "9"}, ["kubernetes.gpus", "less than or equal to 8"]),
        ({"TUNELOOP__KUBERNETES__GPUS": "2"}, ["training.processes=1 but kubernetes.gpus=2", "one process per GPU"]),
        ({"TUNELOOP__TRAINING__DEVICE": "cpu"}, ["training.device=cpu but kubernetes.gpus=1"]),
        ({"TUNELOOP__KUBERNETES__MEMORY_REQUEST": "96Gi"}, ["memory_request=96Gi is above kubernetes.memory_limit=32Gi"]),
        ({"TUNELOOP__KUBERNETES__CPU_LIMIT": "8 cores"}, ["kubernetes.cpu_limit", "not a Kubernetes quantity"]),
        ({"TUNELOOP__KUBERNETES__ENV": "{AWS_SECRET_ACCESS_KEY: hunter2}"}, ["AWS_SECRET_ACCESS_KEY looks like a credential", "secret_env"]),
    ],
)
def test_a_bad_kubernetes_config_fails_naming_the_key(env: dict[str, str], expected: list[str]) -> None:
    merged = {**K8S_ENV, **env}
    if merged["TUNELOOP__KUBERNETES__NAMESPACE"] == "":
        del merged["TUNELOOP__KUBERNETES__NAMESPACE"]
    with pytest.raises(ConfigError) as failure:
        load_settings(env=merged)
    for text in expected:
        assert text in str(failure.value)


@pytest.mark.unit
def test_the_local_runner_needs_no_kubernetes_settings() -> None:
    settings = load_settings(env={})
    assert settings.training_runner == "local"
    assert settings.kubernetes.namespace is None
    with pytest.raises(ConfigError, match=r"needs kubernetes\.namespace and kubernetes\.image"):
        pod_operator_kwargs(settings)


@pytest.mark.unit
def test_the_pod_gets_the_same_training_settings_through_its_env(tmp_path: Path) -> None:
    """The pod has no config file: store, model and training settings travel as TUNELOOP__*
    variables and must load back to the same values there."""
    settings = _example_settings(tmp_path)
    settings.training.learning_rate = 1e-5
    settings.training.target_modules = ["q_proj", "v_proj"]
    settings.training.max_steps = 200
    settings.model.served_model_name = "true"  # a string YAML would read as a bool
    env = pod_environment(settings)
    in_pod = load_settings(env=env)
    assert in_pod.training == settings.training
    assert in_pod.store == settings.store
    assert in_pod.model.model_dump(exclude={"demo_model_dir"}) == settings.model.model_dump(exclude={"demo_model_dir"})
    assert in_pod.work_dir == "/var/lib/tuneloop" and in_pod.model.demo_model_dir.startswith("/var/lib/tuneloop/")
    assert env["HF_HOME"] == "/var/lib/tuneloop/hf-cache"


@pytest.mark.unit
def test_credentials_reach_the_pod_only_as_secret_references(tmp_path: Path) -> None:
    from kubernetes.client import models as k8s

    settings = _example_settings(tmp_path)
    settings.vllm.api_key = "vllm-key-never-in-the-pod"  # type: ignore[assignment]
    settings.kubernetes.secret_env = {"HF_TOKEN": {"secret": "huggingface", "key": "token"}}  # type: ignore[dict-item]
    kwargs = pod_operator_kwargs(settings)
    plain = {var.name: var.value for var in kwargs["env_vars"] if var.value is not None}
    referenced = {var.name: var.value_from.secret_key_ref for var in kwargs["env_vars"] if var.value_from is not None}
    assert not any("vllm-key" in value for value in plain.values())
    assert not any(re.search(r"SECRET|PASSWORD|API_KEY|TOKEN(?!S)", name) for name in plain)  # MAX_NEW_TOKENS is no secret
    assert (referenced["HF_TOKEN"].name, referenced["HF_TOKEN"].key) == ("huggingface", "token")
    assert kwargs["env_from"] == [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="tuneloop-store-credentials"))]


@pytest.mark.unit
def test_settings_at_parse_time_ignore_a_config_file_missing_on_this_machine(tmp_path: Path) -> None:
    assert settings_at_parse_time({"TUNELOOP_CONFIG": str(tmp_path / "absent.yaml")}).training_runner == "local"
    path = tmp_path / "tuneloop.yaml"
    path.write_text(EXAMPLE_CONFIG)
    settings = settings_at_parse_time({"TUNELOOP_CONFIG": str(path), "TUNELOOP__KUBERNETES__CPU_REQUEST": "6"})
    assert settings.training_runner == "kubernetes" and settings.kubernetes.cpu_request == "6"


# --- the CLI the pod runs (no Airflow, no torch) ---------------------------------------


@pytest.mark.unit
def test_train_register_runs_the_dag_step_and_writes_the_xcom_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tuneloop train --register --xcom-json PATH` is the pipeline's train_step: same input,
    same dict out, written where the operator's sidecar reads it."""

    calls: dict[str, Any] = {}
    step_result = {"version": "v4", "snapshot": "ab" * 32, "final_loss": 0.1, "first_loss": 2.0, "device": "cuda", "adapter_uri": "s3://b/adapters/v4"}

    def fake_open_loop(config_path: str | None = None, *, run_id: str | None = None, progress: Any = None) -> Any:
        calls["open_loop"] = (config_path, run_id)
        return SimpleNamespace(store=SimpleNamespace(uri="s3://b"))

    def fake_train_step(loop: Any, snapshot: str) -> dict[str, Any]:
        calls["train_step"] = snapshot
        calls["ml_python"] = os.environ.get("TUNELOOP_ML_PYTHON")
        return step_result

    monkeypatch.setattr("tuneloop.steps.loop.open_loop", fake_open_loop)
    monkeypatch.setattr("tuneloop.steps.train.train_step", fake_train_step)
    monkeypatch.delenv("TUNELOOP_ML_PYTHON", raising=False)
    xcom = tmp_path / "airflow/xcom/return.json"
    args = cli.build_parser().parse_args(
        ["train", "--snapshot", "ab" * 32, "--register", "--run-id", "scheduled__2026-10-01", "--json", "--xcom-json", str(xcom)]
    )
    assert args.func(args) == 0
    assert calls["open_loop"] == (None, "scheduled__2026-10-01")
    assert calls["train_step"] == "ab" * 32
    assert calls["ml_python"] == sys.executable  # the pod's own Python trains
    assert json.loads(xcom.read_text()) == step_result


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--register", "--version", "v3"], "drop --version"),
        (["train", "--register", "--max-steps", "5", "--init-from", "v1"], "drop --max-steps, --init-from"),
        (["train", "--register", "--snapshot", "rows.jsonl"], "not a local file"),
        (["train"], "--version is required"),
        (["train", "--version", "v1", "--run-id", "r"], "--run-id goes with --register"),
        (["train", "--register", "WORLD_SIZE=2"], "launch it without torchrun"),
    ],
)
def test_train_register_refuses_what_it_decides_itself(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for item in [a for a in argv if "=" in a]:  # an environment variable the launcher would set
        monkeypatch.setenv(*item.split("=", 1))
        argv.remove(item)
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(cli.CliError, match=re.escape(message)):
        args.func(args)


# --- the trainer image (no Airflow) --------------------------------------------------------


@pytest.mark.unit
def test_trainer_image_pins_the_ml_lock_versions() -> None:
    dockerfile = (ROOT / "docker/trainer.Dockerfile").read_text()
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements/ml.lock").read_text(), flags=re.M))
    pinned = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', dockerfile))
    assert {"torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "safetensors", "tokenizers"} <= set(pinned), pinned
    for name, version in pinned.items():
        assert name in locked, f"{name} is pinned in the image but not in requirements/ml.lock"
        want = locked[name].removesuffix("+cpu") if name == "torch" else locked[name]  # the image's torch is the CUDA build
        assert version == want, f"trainer.Dockerfile pins {name}=={version}, requirements/ml.lock has {locked[name]}"
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # the lock is compiled for Python 3.11
    assert "-c /tmp/constraints.txt" in dockerfile  # the rest of the dependencies: the lock's versions too
    assert re.search(r"^USER 1000$", dockerfile, flags=re.M)  # kubernetes.TRAINER_UID


# --- the rendered pod (Airflow + the cncf-kubernetes provider) ------------------------------


@pytest.mark.dags
def test_rendered_pod_spec(tmp_path: Path, kube_connection: None) -> None:
    settings = _example_settings(tmp_path)
    ti = SimpleNamespace(dag_id="tuneloop_refresh", task_id="train", map_index=-1, try_number=2)
    context = {"ti": ti, "run_id": "scheduled__2026-10-01T03:00:00+00:00", "dag": SimpleNamespace()}
    pod = _render(settings, context=context)
    manifest = _manifest(pod)
    out = tmp_path / "trainer-pod.yaml"
    out.write_text(yaml.safe_dump(manifest, sort_keys=False))
    print(f"rendered training pod: {out}")

    meta, spec = manifest["metadata"], manifest["spec"]
    assert meta["namespace"] == "ml-training"
    assert re.fullmatch(r"tuneloop-train-[a-z0-9]{8}", meta["name"]), meta["name"]
    labels = meta["labels"]
    assert labels["app.kubernetes.io/name"] == "tuneloop-trainer" and labels["app.kubernetes.io/component"] == "train"
    assert (labels["dag_id"], labels["task_id"], labels["try_number"]) == ("tuneloop_refresh", "train", "2")  # the provider finds its pod on a retry
    assert meta["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}

    trainer, sidecar = spec["containers"]
    assert trainer["image"] == "registry.example.com/tuneloop-trainer:0.1.0-cu128"
    assert trainer["command"] == ["tuneloop"]
    assert trainer["args"] == ["train", "--snapshot", SNAPSHOT_TEMPLATE, "--register", "--run-id", "{{ run_id }}", "--json", "--xcom-json", XCOM_RESULT_PATH]
    assert trainer["resources"] == {
        "limits": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"},
        "requests": {"cpu": "8", "memory": "48Gi"},
    }
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert spec["serviceAccountName"] == "tuneloop-trainer"
    assert spec["restartPolicy"] == "Never"  # a failed pod is retried by Airflow, on the same volume

    env = {var["name"]: var.get("value") for var in trainer["env"]}
    assert env["TUNELOOP__STORE__URI"] == "s3://tuneloop/prod"
    assert env["TUNELOOP__STORE__ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    assert env["TUNELOOP__MODEL__BASE_MODEL"] == "/var/lib/tuneloop/models/Llama-3.2-1B-Instruct"
    assert env["TUNELOOP__WORK_DIR"] == "/var/lib/tuneloop"
    assert not any("AWS" in name for name in env)  # credentials: from the Secret only
    assert trainer["envFrom"] == [{"secretRef": {"name": "tuneloop-store-credentials"}}]

    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["work"]["persistentVolumeClaim"] == {"claimName": "tuneloop-trainer-work"}
    mounts = {mount["name"]: mount["mountPath"] for mount in trainer["volumeMounts"]}
    assert mounts == {"work": "/var/lib/tuneloop", "xcom": "/airflow/xcom"}
    assert trainer["securityContext"] == {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000}
    assert spec["securityContext"] == {"fsGroup": 1000}

    # the XCom sidecar: shares /airflow/xcom with the trainer and hands return.json to Airflow
    assert sidecar["name"] == "airflow-xcom-sidecar"
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in sidecar["volumeMounts"]
    assert Path(XCOM_RESULT_PATH).parent.as_posix() == "/airflow/xcom"


@pytest.mark.dags
def test_cpu_pod_without_pvc_requests_no_gpu(tmp_path: Path, kube_connection: None) -> None:
    settings = load_settings(env={**K8S_ENV, "TUNELOOP__KUBERNETES__GPUS": "0", "TUNELOOP__KUBERNETES__TOLERATIONS": "[]"})
    spec = _manifest(_render(settings))["spec"]
    trainer = spec["containers"][0]
    assert "nvidia.com/gpu" not in trainer["resources"]["limits"]
    assert not spec.get("tolerations") and not spec.get("nodeSelector")
    assert {"name": "work", "emptyDir": {}} in spec["volumes"]


@pytest.mark.dags
def test_committed_example_manifest_is_what_the_code_renders(tmp_path: Path, kube_connection: None) -> None:
    settings = _example_settings(tmp_path)
    manifest = _manifest(_render(settings, random_suffix=False))
    header = (
        "# The training pod the refresh DAG's `train` task creates with training_runner: kubernetes,\n"
        "# rendered by KubernetesPodOperator.build_pod_request_obj from this config (no cluster needed):\n"
        + "".join(f"#   {line}\n" for line in EXAMPLE_CONFIG.splitlines())
        + "# Airflow renders the {{ ... }} arguments at run time and adds the run's labels (dag_id, run_id,\n"
        "# try_number) and a random name suffix. Generated: do not edit; regenerate with\n"
        "#   TUNELOOP_UPDATE_EXAMPLES=1 .venv/bin/python -m pytest tests/unit/test_kubernetes_pod.py -k example\n"
    )
    rendered = header + yaml.safe_dump(manifest, sort_keys=False, width=120)
    if os.environ.get("TUNELOOP_UPDATE_EXAMPLES") == "1":
        EXAMPLE_MANIFEST.write_text(rendered)
    assert EXAMPLE_MANIFEST.is_file(), f"{EXAMPLE_MANIFEST} is missing: regenerate it (see this module's docstring)"
    assert EXAMPLE_MANIFEST.read_text() == rendered, (
        f"{EXAMPLE_MANIFEST.name} is stale: regenerate it with TUNELOOP_UPDATE_EXAMPLES=1 (see this module's docstring)"
    )


@pytest.mark.dags
def test_refresh_dag_trains_in_a_pod_with_the_kubernetes_runner(monkeypatch: pytest.MonkeyPatch, kube_connection: None) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    for name, value in K8S_ENV.items():
        monkeypatch.setenv(name, value)
    dagbag = DagBag(dag_folder=str(ROOT / "dags/tuneloop_refresh.py"))
    assert dagbag.import_errors == {}
    dag = dagbag.dags["tuneloop_refresh"]
    train = dag.get_task("train")
    assert isinstance(train, KubernetesPodOperator)
    assert train.upstream_task_ids == {"validate"} and train.downstream_task_ids == {"evaluate"}
    assert train.pool == "gpu" and train.retries >= 1
    assert [outlet.uri for outlet in train.outlets] == ["tuneloop://loop/candidate-adapter"]
    assert train.do_xcom_push and train.namespace == "ml-training"
    assert SNAPSHOT_TEMPLATE in train.arguments  # the snapshot `validate` returned, rendered at run time
    # evaluate is a pod too, after train, reading the candidate from train's XCom; the gate
    # receives its XCom (the evaluation dict) exactly as it received the @task's return
    evaluate = dag.get_task("evaluate")
    assert isinstance(evaluate, KubernetesPodOperator) and evaluate.upstream_task_ids == {"train"}
    assert evaluate.arguments[:2] == ["evaluate", "--step"] and CANDIDATE_TEMPLATE in evaluate.arguments
    (evaluation,) = dag.get_task("gate").op_args
    assert evaluation.operator is evaluate and evaluation.key == "return_value"
    # ...and the candidate-adapter asset event carries the version, as with the local runner
    events: dict[str, Any] = {}

    class OutletEvents:
        def __getitem__(self, asset: Any) -> Any:
            return events.setdefault(asset.uri, SimpleNamespace(extra=None))

    train._post_execute_hook({"outlet_events": OutletEvents()}, {"version": "v4", "snapshot": "ab12", "final_loss": 0.1})
    assert events["tuneloop://loop/candidate-adapter"].extra == {"version": "v4", "snapshot": "ab12"}


@pytest.mark.dags
def test_refresh_dag_keeps_the_local_runner_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    monkeypatch.delenv("TUNELOOP__TRAINING_RUNNER", raising=False)
    dag = DagBag(dag_folder=str(ROOT / "dags/tuneloop_refresh.py")).dags["tuneloop_refresh"]
    train = dag.get_task("train")
    assert not isinstance(train, KubernetesPodOperator) and train.pool == "gpu"


@pytest.mark.dags
def test_rendered_evaluation_pod_runs_the_evaluate_step_on_the_task_of_the_config(tmp_path: Path, kube_connection: None) -> None:
    """The evaluation pod: the same image, `tuneloop evaluate --step` on what train returned, and
    the task (format, metric, its JSON Schema inline: the pod has no copy of the file), eval and
    vLLM settings loading back to the worker's values; no secret in plain values."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["label"]}))
    settings = _example_settings(tmp_path)
    settings.task.metric, settings.task.json_schema, settings.task.system_prompt = "json", str(schema), "Answer in JSON."
    settings.vllm.endpoints = ["http://vllm-0.serving:8000", "http://vllm-1.serving:8000"]
    settings.vllm.api_key = "vllm-key-never-in-the-pod"  # type: ignore[assignment]
    settings.eval.endpoints = ["http://vllm-eval.serving:8000"]
    ti = SimpleNamespace(dag_id="tuneloop_refresh", task_id="evaluate", map_index=-1, try_number=1)
    pod = _render(settings, context={"ti": ti, "run_id": "manual__x", "dag": SimpleNamespace()}, component="evaluate")
    manifest = _manifest(pod)
    assert re.fullmatch(r"tuneloop-evaluate-[a-z0-9]{8}", manifest["metadata"]["name"])
    assert manifest["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluate"
    container = manifest["spec"]["containers"][0]
    assert container["args"] == ["evaluate", "--step", "--candidate", CANDIDATE_TEMPLATE, "--snapshot", TRAINED_SNAPSHOT_TEMPLATE,
                                 "--run-id", "{{ run_id }}", "--json", "--xcom-json", XCOM_RESULT_PATH]  # fmt: skip
    env = {var["name"]: var["value"] for var in container["env"] if var.get("value") is not None}
    assert not any("vllm-key" in value for value in env.values())
    in_pod = load_settings(env=env)
    assert in_pod.task.model_dump(exclude={"json_schema"}) == settings.task.model_dump(exclude={"json_schema"})
    assert in_pod.task.json_schema == {"type": "object", "required": ["label"]}
    assert in_pod.eval == settings.eval and in_pod.vllm.endpoints == settings.vllm.endpoints and in_pod.vllm.api_key is None
    with pytest.raises(ValueError, match="component"):
        pod_operator_kwargs(settings, component="deploy")


@pytest.mark.unit
def test_evaluate_step_runs_the_dag_step_and_writes_the_xcom_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuneloop.steps.evaluate as evaluate_module
    from tuneloop.cli import main

    seen: dict[str, Any] = {}

    def fake_step(loop: Any, train: dict[str, Any]) -> dict[str, Any]:
        seen.update(train=train, run_id=loop.run_id)
        return {"version": train["version"], "snapshot": train["snapshot"], "production": None,
                "candidate_eval": {"adapter": "v2", "scores_key": "evals/v2/x/candidate/scores.jsonl"},
                "production_eval": {"adapter": "none", "scores_key": "evals/v2/x/production/scores.jsonl"}}  # fmt: skip

    monkeypatch.setattr(evaluate_module, "evaluate_step", fake_step)
    monkeypatch.setattr("tuneloop.ml.backends.has_torch", lambda: True)
    monkeypatch.setenv("TUNELOOP__STORE__URI", str(tmp_path / "store"))
    xcom = tmp_path / "return.json"
    argv = ["evaluate", "--step", "--candidate", "v2", "--snapshot", "ab" * 32, "--run-id", "scheduled__2026-10-01", "--json", "--xcom-json", str(xcom)]
    assert main(argv) == 0
    assert seen == {"train": {"version": "v2", "snapshot": "ab" * 32}, "run_id": "scheduled__2026-10-01"}
    assert json.loads(xcom.read_text())["candidate_eval"]["scores_key"] == "evals/v2/x/candidate/scores.jsonl"
    assert main(["evaluate", "--step", "--candidate", "v2", "--snapshot", "ab", "--limit", "3"]) == 2  # the step decides that itself
    assert main(["evaluate", "--step", "--candidate", "../x", "--snapshot", "ab"]) != 0
    assert main(["evaluate", "--candidate", "v2"]) == 2  # --candidate without --step
