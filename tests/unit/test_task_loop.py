"""Which config an Airflow task's loop uses: $TUNELOOP_CONFIG, else the Variable, else defaults;
a path that does not exist on this worker is skipped with a message, never an error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tuneloop.steps.loop import open_task_loop

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


def _config(tmp_path: Path, name: str, store: str) -> str:
    path = tmp_path / name
    path.write_text(f"store:\n  uri: {tmp_path / store}\n")
    return str(path)


def test_env_config_wins_over_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_CONFIG", _config(tmp_path, "env.yaml", "env-store"))
    loop = open_task_loop("r", config_variable=lambda: _config(tmp_path, "var.yaml", "var-store"), progress=print)
    assert loop.store.uri.endswith("env-store")


def test_missing_env_config_falls_back_to_the_variable_then_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_CONFIG", str(tmp_path / "not-here.yaml"))
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    lines: list[str] = []
    loop = open_task_loop("r", config_variable=lambda: _config(tmp_path, "var.yaml", "var-store"), progress=lines.append)
    assert loop.store.uri.endswith("var-store")
    assert lines == [f"config file {tmp_path / 'not-here.yaml'} does not exist on this worker: using {tmp_path / 'var.yaml'}"]
    lines.clear()
    loop = open_task_loop("r", config_variable=lambda: None, progress=lines.append)  # raised ConfigError before
    assert loop.settings.store.uri.endswith(".tuneloop/store")
    assert "using the embedded defaults" in lines[0]


def test_an_s3_store_takes_its_keys_region_and_endpoint_from_the_airflow_aws_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: str, s3_client: object
) -> None:
    """store.aws_conn_id (tuneloop_store): read through the amazon provider's hook from an
    AIRFLOW_CONN_* connection, as a deployment defines it; the config names no endpoint, so the
    moto server is reached only through the connection's extra; the ML child gets the same keys."""
    import json
    import uuid

    import tuneloop.ml.runner as runner
    from tuneloop_airflow import store_connection

    bucket = f"conn-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "AIRFLOW_CONN_TUNELOOP_STORE",
        json.dumps({"conn_type": "aws", "login": "AKIDFROMCONN", "password": "secret-from-conn", "extra": {"region_name": "eu-west-1", "endpoint_url": s3_server}}),
    )
    config = tmp_path / "tuneloop.yaml"
    config.write_text(f"store:\n  uri: s3://{bucket}/loop\n")
    monkeypatch.setenv("TUNELOOP_CONFIG", str(config))
    lines: list[str] = []
    loop = open_task_loop("r", config_variable=lambda: None, progress=lines.append, store_connection=store_connection)
    assert "credentials and region from the Airflow connection 'tuneloop_store'" in lines[-1]
    assert loop.settings.store.endpoint_url == s3_server and loop.settings.store.region == "eu-west-1"
    assert loop.store._client._request_signer._credentials.access_key == "AKIDFROMCONN"  # type: ignore[attr-defined]
    loop.store.put_text("hello.txt", "through the connection")
    assert loop.store.get_text("hello.txt") == "through the connection"
    assert loop.registry.store is loop.store
    seen: dict[str, object] = {}
    monkeypatch.setattr(runner, "run_ml_step", lambda args, **kw: seen.update(kw) or {})
    loop.run_ml(["train"])
    assert seen["env"] == {"AWS_ACCESS_KEY_ID": "AKIDFROMCONN", "AWS_SECRET_ACCESS_KEY": "secret-from-conn"}
    assert "secret-from-conn" not in "\n".join(lines)

    monkeypatch.delenv("AIRFLOW_CONN_TUNELOOP_STORE")  # no connection: boto3's own chain, said once
    lines.clear()
    plain = open_task_loop("r", config_variable=lambda: None, progress=lines.append, store_connection=store_connection)
    assert plain.ml_env == {} and "no Airflow connection 'tuneloop_store'" in lines[-1]
