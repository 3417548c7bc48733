"""The training pod: settings -> the arguments of the cncf-kubernetes KubernetesPodOperator.

With ``training_runner: kubernetes`` the refresh DAG's ``train`` task starts one pod per run
instead of running the ML env on the worker. The pod runs the trainer image
(``docker/trainer.Dockerfile``) with ``tuneloop train --register``: the same
:func:`tuneloop.steps.train.train_step` as the local runner (next version from the registry, warm
start, training, registration, ``candidate`` alias), so ``evaluate`` receives the same dict. The
result goes to ``/airflow/xcom/return.json``, which the operator's XCom sidecar hands back.

What the pod needs from the settings travels as ``TUNELOOP__*`` environment variables (store,
model, training); credentials come from Kubernetes Secrets, never from plain values. The work
dir (adapter output and the training checkpoints beside it) is a volume: with a PVC, a retry
after a pre-empted pod resumes from the last checkpoint.

Plain data in, plain data out: only :func:`pod_operator_kwargs` imports the Kubernetes client
models (a dependency of the provider), and nothing here imports Airflow.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import yaml

from tuneloop import __version__
from tuneloop.config import CONFIG_ENV, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Mapping

XCOM_RESULT_PATH = "/airflow/xcom/return.json"  # read by the provider's XCom sidecar
POD_NAME = "tuneloop-train"  # the operator adds a random suffix
TRAINER_UID = 1000  # the non-root user of docker/trainer.Dockerfile
WORK_VOLUME = "work"
# Airflow renders these at run time: the snapshot `validate` wrote, the run's id, and what
# `train` returned (the candidate version and its snapshot) for the evaluation pod.
SNAPSHOT_TEMPLATE = "{{ ti.xcom_pull(task_ids='validate')['snapshot'] }}"
RUN_ID_TEMPLATE = "{{ run_id }}"
CANDIDATE_TEMPLATE = "{{ ti.xcom_pull(task_ids='train')['version'] }}"
TRAINED_SNAPSHOT_TEMPLATE = "{{ ti.xcom_pull(task_ids='train')['snapshot'] }}"
COMPONENTS = ("train", "evaluate")


def settings_at_parse_time(env: Mapping[str, str] | None = None) -> Settings:
    """The settings a DAG file may read while it is parsed: ``$TUNELOOP_CONFIG`` (when that file
    exists on this machine, as at run time) and ``TUNELOOP__*`` variables. The
    ``tuneloop_config`` Variable is not read: no metadata-database reads at parse time."""
    env = dict(os.environ if env is None else env)
    path = env.pop(CONFIG_ENV, None)
    return load_settings(path if path and os.path.exists(path) else None, env=env)


def train_arguments(snapshot: str = SNAPSHOT_TEMPLATE, run_id: str = RUN_ID_TEMPLATE) -> list[str]:
    """The trainer container's arguments (its command is ``tuneloop``)."""
    return ["train", "--snapshot", snapshot, "--register", "--run-id", run_id, "--json", "--xcom-json", XCOM_RESULT_PATH]


def evaluate_arguments(candidate: str = CANDIDATE_TEMPLATE, snapshot: str = TRAINED_SNAPSHOT_TEMPLATE, run_id: str = RUN_ID_TEMPLATE) -> list[str]:
    """The evaluation container's arguments: the refresh's evaluate step (``evaluate --step``)."""
    return ["evaluate", "--step", "--candidate", candidate, "--snapshot", snapshot, "--run-id", run_id, "--json", "--xcom-json", XCOM_RESULT_PATH]


def _pod_sections(settings: Settings) -> dict[str, dict[str, Any]]:
    """The settings a pod runs on, by section: what the train and evaluate steps read. Secrets
    are left out (they come from Kubernetes Secrets: ``kubernetes.secret_env``), and a JSON
    Schema file of the task travels inline, since the pod has no copy of it."""
    from tuneloop.tasks.scoring import load_json_schema

    task = settings.task.model_dump(mode="json", exclude={"judge": {"api_key"}})
    if isinstance(settings.task.json_schema, str):
        task["json_schema"] = load_json_schema(settings.task.json_schema)
    k8s = settings.kubernetes
    return {
        "store": settings.store.model_dump(mode="json", exclude={"aws_conn_id"}),  # a pod has no Airflow connections
        "model": {**settings.model.model_dump(mode="json"), "demo_model_dir": f"{k8s.work_mount_path}/models/demo-base"},
        # evaluation through the servers; an adapter copied for them lands on the pod's volume
        "vllm": {**settings.vllm.model_dump(mode="json", exclude={"api_key"}), "adapter_dir": f"{k8s.work_mount_path}/served-adapters"},
        "training": settings.training.model_dump(mode="json"),
        "task": task,
        "eval": settings.eval.model_dump(mode="json"),
    }


def _env_value(value: Any) -> str:
    """A setting as an env var the loader reads back to the same value (it parses YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def pod_environment(settings: Settings) -> dict[str, str]:
    """Plain env vars of the trainer container: the store, model and training settings the pod
    needs (as ``TUNELOOP__*``), its work dir on the volume, then ``kubernetes.env``. Secrets are
    not here: see ``kubernetes.secret_env`` / ``secret_env_from``."""
    k8s = settings.kubernetes
    env: dict[str, str] = {"TUNELOOP__WORK_DIR": k8s.work_mount_path}
    for section, values in _pod_sections(settings).items():
        for key, value in values.items():
            if value is not None:
                env[f"TUNELOOP__{section.upper()}__{key.upper()}"] = _env_value(value)
    env["HF_HOME"] = f"{k8s.work_mount_path}/hf-cache"  # base model downloads survive a retry
    env["PYTHONUNBUFFERED"] = "1"
    env.update(k8s.env)
    return env


def pod_operator_kwargs(
    settings: Settings, *, snapshot: str = SNAPSHOT_TEMPLATE, run_id: str = RUN_ID_TEMPLATE, component: str = "train"
) -> dict[str, Any]:
    """Keyword arguments of ``KubernetesPodOperator`` for the training pod, or with
    ``component="evaluate"`` the evaluation pod (the same image and resources; the DAG adds the
    task's own: task_id, pool, outlets, timeout). Raises :class:`ConfigError` when
    ``kubernetes.namespace`` or ``kubernetes.image`` is missing."""
    from kubernetes.client import models as k8s

    if component not in COMPONENTS:
        raise ValueError(f"component {component!r}: one of {COMPONENTS}")
    cfg = settings.kubernetes
    missing = [f"kubernetes.{name}" for name in ("namespace", "image") if getattr(cfg, name) is None]
    if missing:
        raise ConfigError(f"the training pod needs {' and '.join(missing)} (see docs/deployment.md, 'Training and evaluation on Kubernetes')")

    env_vars = [k8s.V1EnvVar(name=name, value=value) for name, value in pod_environment(settings).items()]
    env_vars += [
        k8s.V1EnvVar(
            name=name,
            value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=ref.secret, key=ref.key)),
        )
        for name, ref in cfg.secret_env.items()
    ]
    limits = {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit}
    if cfg.gpus:
        limits[cfg.gpu_resource] = str(cfg.gpus)  # extended resources: the request equals the limit
    if cfg.work_volume_claim:
        work = k8s.V1Volume(
            name=WORK_VOLUME,
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=cfg.work_volume_claim),
        )
    else:
        work = k8s.V1Volume(name=WORK_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource())
    labels = {
        "app.kubernetes.io/name": "tuneloop-trainer",
        "app.kubernetes.io/part-of": "tuneloop",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": __version__,
        **cfg.labels,
    }
    return {
        "kubernetes_conn_id": cfg.conn_id,
        "namespace": cfg.namespace,
        "name": POD_NAME if component == "train" else f"tuneloop-{component}",
        "random_name_suffix": True,
        "labels": labels,
        "annotations": dict(cfg.annotations),
        "image": cfg.image,
        "image_pull_policy": cfg.image_pull_policy,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=name) for name in cfg.image_pull_secrets] or None,
        "service_account_name": cfg.service_account,
        "cmds": ["tuneloop"],
        "arguments": train_arguments(snapshot, run_id) if component == "train" else evaluate_arguments(run_id=run_id),
        "env_vars": env_vars,
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name)) for name in cfg.secret_env_from],
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": cfg.cpu_request, "memory": cfg.memory_request},
            limits={key: value for key, value in limits.items() if value is not None} or None,
        ),
        "node_selector": dict(cfg.node_selector) or None,
        "tolerations": [
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in cfg.tolerations
        ] or None,
        "volumes": [work],
        "volume_mounts": [k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=cfg.work_mount_path)],
        "security_context": k8s.V1PodSecurityContext(fs_group=TRAINER_UID),  # the volume is writable by the trainer
        "container_security_context": k8s.V1SecurityContext(
            run_as_non_root=True, run_as_user=TRAINER_UID, allow_privilege_escalation=False
        ),
        "do_xcom_push": True,
        "get_logs": cfg.get_logs,
        "startup_timeout_seconds": cfg.startup_timeout_s,
        "log_events_on_failure": True,
        "on_finish_action": "delete_pod",
    }
