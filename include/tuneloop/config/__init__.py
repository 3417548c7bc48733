"""Typed settings: one YAML file plus environment overrides, validated up front.

Precedence (highest first): ``TUNELOOP__SECTION__KEY`` environment variables, the YAML file
named by ``--config`` or ``TUNELOOP_CONFIG``, the embedded defaults (``defaults/tuneloop.yaml``).
A bad value raises :class:`ConfigError` naming the key, the value, the reason and its source.
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from tuneloop.config.kubernetes import (
    KubernetesSettings,
    SecretKeySettings,
    TolerationSettings,
    quantity_value,
)
from tuneloop.config.sections import (
    NOTIFY_EVENTS,
    VLLM_LORA_RANKS,
    AlertSettings,
    ConfigError,
    DataSettings,
    DriftSettings,
    EvalSettings,
    GateSettings,
    JudgeSettings,
    ModelSettings,
    NotifyEvent,
    NotifySettings,
    ServingSettings,
    StoreSettings,
    SuiteBars,
    TaskSettings,
    TeacherSettings,
    TrackingSettings,
    TrainingSettings,
    VllmSettings,
    _Section,
)

ENV_PREFIX = "TUNELOOP__"
CONFIG_ENV = "TUNELOOP_CONFIG"
HOME_ENV = "TUNELOOP_HOME"  # relative paths in settings are taken from here when set
#: YAML whose aliases (``*name``) expand to more values than this is refused: nested anchors
#: (a "billion laughs" bomb) turn 200 bytes into millions of values and megabytes of messages.
MAX_YAML_VALUES = 100_000
#: Longest value, and most errors, a settings error message shows.
MAX_SHOWN_CHARS = 200
MAX_ERRORS_SHOWN = 10


# --- all sections, and how they are loaded -------------------------------------------------


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
    serving: ServingSettings = Field(default_factory=ServingSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
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
    def _teacher_is_complete(self) -> Settings:
        if self.data.label_source == "teacher" and not (self.teacher.endpoint and self.teacher.model):
            raise ValueError("data.label_source=teacher needs teacher.endpoint and teacher.model")
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
        if k8s.gpus and self.training.processes != k8s.gpus:
            raise ValueError(
                f"training.processes={self.training.processes} but kubernetes.gpus={k8s.gpus}: the training pod runs "
                "one process per GPU it requests; set them equal"
            )
        return self


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any) -> str:
    """A value for an error message: a bounded repr (reprlib never builds the whole of a big
    value), clipped to a few hundred characters."""
    return _clip(_SHOWN.repr(value))


_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlevel = MAX_SHOWN_CHARS, MAX_SHOWN_CHARS, 3


def _expanded_values(node: yaml.Node, source: str) -> int:
    """How many values ``node`` becomes once every alias is expanded; ConfigError past
    ``MAX_YAML_VALUES`` or for an alias inside itself. Each node is counted once (memoised),
    so the count costs the size of the file, not of the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(item: yaml.Node) -> int:
        key = id(item)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: a YAML alias refers to a value that contains it (line {item.start_mark.line + 1}): write the value out")
        open_nodes.add(key)
        if isinstance(item, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in item.value)
        elif isinstance(item, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in item.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: its YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values "
                "(nested anchors, a 'billion laughs' bomb?); refused: write the values out or use fewer aliases"
            )
        sizes[key] = total
        return total

    return size(node)


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses aliases expanding past ``MAX_YAML_VALUES`` before any of
    them is expanded. YAML errors propagate; nesting too deep for the parser is a ConfigError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_values(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: its YAML is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(_clip(f"config file {path} is not valid YAML: {err}", 1000)) from err
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
            value = load_yaml(raw, f"environment variable {name}") if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        sources[path] = name
    return overrides, sources


def _format_errors(err: ValidationError, sources: Mapping[tuple[str, ...], str], origin: str) -> str:
    """One line per error (at most ``MAX_ERRORS_SHOWN``): key, value and reason, each clipped."""
    errors = err.errors()
    lines = []
    for item in errors[:MAX_ERRORS_SHOWN]:
        loc = tuple(str(part) for part in item["loc"])
        key = _clip(".".join(loc) or "<root>")
        reason = "unknown key (check the spelling)" if item["type"] == "extra_forbidden" else _clip(item["msg"], 2 * MAX_SHOWN_CHARS)
        value = item.get("input")
        source = sources.get(loc, origin)
        shown = "" if isinstance(value, dict) else f" = {_shown(value)}"
        lines.append(f"  {key}{shown}: {reason} [from {source}]")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
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
    settings.serving.routes_file = anchor(settings.serving.routes_file)
    if settings.serving.access_log is not None:
        settings.serving.access_log = anchor(settings.serving.access_log)
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


__all__ = [
    "CONFIG_ENV", "ENV_PREFIX", "HOME_ENV", "NOTIFY_EVENTS", "VLLM_LORA_RANKS", "AlertSettings", "ConfigError", "DataSettings", "DriftSettings",
    "EvalSettings", "GateSettings", "JudgeSettings", "KubernetesSettings", "ModelSettings", "NotifyEvent", "NotifySettings",
    "SecretKeySettings", "ServingSettings", "Settings", "StoreSettings", "SuiteBars", "TaskSettings", "TeacherSettings", "TolerationSettings", "TrackingSettings", "TrainingSettings",
    "VllmSettings", "choose_task_config", "load_settings", "load_yaml", "quantity_value", "settings_from_job", "settings_job", "settings_table",
]
