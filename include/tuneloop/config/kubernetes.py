"""The training pod of ``training_runner: kubernetes`` (rendered by ``tuneloop.kubernetes``): image,
GPUs, resources, node selection, tolerations, secrets and the work volume, validated so a bad
pod spec fails at load time with the key that is wrong."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from tuneloop.config.sections import (
    _Section,
)

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
    gpus: int = Field(1, ge=0, le=8, description="GPUs the pod requests (0: CPU); the pod trains with one process per GPU (training.processes, equal to it)")
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
