"""What every step needs: the loop (settings, store, registry, run id, progress) and how an
Airflow task or the CLI opens it; the ML process boundary (:meth:`Loop.run_ml`)."""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.config import Settings, choose_task_config, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tuneloop.registry import Registry
    from tuneloop.storage import Store
    from tuneloop.tasks import TaskSpec
    from tuneloop.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Loop:
    """What every step needs: settings, the store, the registry and the run's id."""

    settings: Settings
    config_path: str | None
    store: Store
    registry: Registry
    run_id: str
    progress: Callable[[str], None]
    ml_env: dict[str, str] = field(default_factory=dict)
    """Environment for the ML child process (the store's credentials from an Airflow connection)."""

    @property
    def spec(self) -> TaskSpec:
        """The user's task (``settings.task``)."""
        from tuneloop.tasks import TaskSpec

        return TaskSpec(self.settings.task)

    def run_ml(self, args: list[str]) -> dict[str, Any]:
        """``tuneloop <args>`` in the ML environment, on exactly this loop's settings (a job
        file: see :mod:`tuneloop.ml.runner`); progress lines go to :attr:`progress`."""
        from tuneloop.ml.runner import run_ml_step

        return run_ml_step(args, settings=self.settings, on_line=self.progress, env=self.ml_env or None)

    @functools.cached_property
    def tracker(self) -> Tracker | None:
        """This refresh's MLflow run (``tracking.mlflow``), or None; see :mod:`tuneloop.tracking`."""
        from tuneloop.tracking import tracker_for

        return tracker_for(self.settings, run_key=self.run_key, run_name=self.run_id, store=self.store)

    @property
    def run_key(self) -> str:
        """The run id made safe for a store key."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.run_id)[:120]


def open_loop(
    config_path: str | None = None,
    *,
    run_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> Loop:
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store_from_settings

    settings = load_settings(config_path, env=env)
    store = open_store_from_settings(settings)
    return Loop(
        settings=settings,
        config_path=config_path,
        store=store,
        registry=Registry(store),
        run_id=run_id or datetime.now(UTC).strftime("manual__%Y-%m-%dT%H-%M-%S"),
        progress=progress or (lambda message: log.info("%s", message)),
    )


def open_task_loop(
    run_id: str,
    *,
    config_variable: Callable[[], str | None],
    progress: Callable[[str], None],
    vllm_connection: Callable[[], Any] | None = None,
    store_connection: Callable[[str], StoreConnection | None] | None = None,
    config_path: str | None = None,
) -> Loop:
    """The loop for one Airflow task. Config: $TUNELOOP_CONFIG, else ``config_variable()`` (the
    DAGs pass a reader of the ``tuneloop_config`` Variable), else the embedded defaults; a path
    that does not exist on this worker falls back to the defaults. ``vllm_connection()`` (the
    DAGs read the ``tuneloop_vllm`` Airflow connection; None when it does not exist) may replace
    the vLLM endpoints and API key: see :func:`apply_vllm_connection`. ``config_path`` (a loop
    of a loops folder) replaces the choice of config file."""
    config: str | None
    if config_path is not None:  # a loop of a loops folder: its own file, whatever $TUNELOOP_CONFIG says
        config, env = config_path, {key: value for key, value in os.environ.items() if key != "TUNELOOP_CONFIG"}
    else:
        config, env = choose_task_config(os.environ, config_variable, progress)
    loop = open_loop(config, run_id=run_id, progress=progress, env=env)
    conn_id = loop.settings.store.aws_conn_id
    if store_connection is not None and conn_id and loop.settings.store.uri.startswith("s3://"):
        aws = store_connection(conn_id)
        if aws is None:
            progress(f"store {loop.settings.store.uri}: no Airflow connection {conn_id!r}, credentials from boto3's default chain")
        else:
            apply_store_connection(loop, aws)
            progress(f"store {loop.settings.store.uri}: credentials and region from the Airflow connection {conn_id!r}")
    found = vllm_connection() if vllm_connection is not None else None
    if found is not None:
        connection = VllmConnection(
            host=found.host, port=found.port, schema=found.schema, password=found.password, extra=found.extra_dejson
        )
        loop.settings = apply_vllm_connection(loop.settings, connection)
        progress(f"vLLM endpoints from the Airflow connection: {', '.join(loop.settings.vllm.endpoints)}")
    return loop


@dataclass(frozen=True)
class StoreConnection:
    """What an Airflow AWS connection gives an s3:// store (read by the Airflow side)."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    endpoint_url: str | None = None


def apply_store_connection(loop: Loop, aws: StoreConnection) -> None:
    """Reopen ``loop``'s store with the connection's keys (its region and endpoint replace the
    config's when set), and hand the same to the ML child through its environment."""
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store_from_settings

    changes = {k: v for k, v in (("region", aws.region), ("endpoint_url", aws.endpoint_url)) if v}
    store_settings = loop.settings.store.model_copy(update=changes)
    loop.settings = loop.settings.model_copy(update={"store": store_settings})
    keys = {"aws_access_key_id": aws.access_key_id, "aws_secret_access_key": aws.secret_access_key, "aws_session_token": aws.session_token}
    credentials = keys if aws.access_key_id and aws.secret_access_key else None
    loop.store = open_store_from_settings(loop.settings, credentials=credentials)
    loop.registry = Registry(loop.store)
    env = {"AWS_ACCESS_KEY_ID": aws.access_key_id, "AWS_SECRET_ACCESS_KEY": aws.secret_access_key, "AWS_SESSION_TOKEN": aws.session_token}
    loop.ml_env = {k: v for k, v in env.items() if v and credentials}


@dataclass(frozen=True)
class VllmConnection:
    """The parts of an Airflow connection that name the vLLM servers (see docs/serving.md)."""

    host: str | None = None
    port: int | None = None
    schema: str | None = None
    password: str | None = None
    extra: dict[str, Any] | None = None


def apply_vllm_connection(settings: Settings, connection: VllmConnection) -> Settings:
    """Settings whose vLLM endpoints and API key come from ``connection``: ``extra.endpoints``
    (a list of URLs, or one comma-separated string) or else ``host`` (with ``port`` and
    ``schema`` http/https); the password, when set, is the API key. Validated like the YAML."""
    from pydantic import SecretStr, ValidationError

    from tuneloop.config import ConfigError, VllmSettings

    extra = connection.extra or {}
    endpoints: Any = extra.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [part.strip() for part in endpoints.split(",") if part.strip()]
    if not endpoints and connection.host:
        host = connection.host
        if "://" not in host:
            host = f"{connection.schema or 'http'}://{host}"
        endpoints = [f"{host}:{connection.port}" if connection.port else host]
    if not endpoints:
        raise ConfigError("the tuneloop_vllm connection names no endpoint: set its host, or extra {\"endpoints\": [...]}")
    values = {**settings.vllm.model_dump(), "endpoints": endpoints}
    if connection.password:
        values["api_key"] = SecretStr(connection.password)
    try:
        vllm = VllmSettings.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"the tuneloop_vllm connection is invalid: {err.errors()[0]['msg']}") from None
    return settings.model_copy(update={"vllm": vllm})


def parse_day(value: str | date | None) -> date | None:
    if value in (None, ""):
        return None
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def maybe_json(store: Store, key: str) -> dict[str, Any]:
    from tuneloop.storage import StoreKeyError

    try:
        return dict(store.get_json(key))
    except StoreKeyError:
        return {}


def base_model_ref(settings: Settings) -> str:
    """The base model as vLLM and adapter configs name it: the demo dir's path, or the hub id/path."""
    if settings.model.base_model == "demo":
        return str(Path(settings.model.demo_model_dir).resolve())
    return settings.model.base_model


def latest_candidate_scores(loop: Loop, version: str) -> str | None:
    """The newest evaluation of ``version`` as a candidate (its golden answers for rollback)."""
    keys = [k for k in loop.store.list(layout.evaluations(version)) if k.endswith("/candidate/scores.jsonl")]
    return keys[-1] if keys else None
