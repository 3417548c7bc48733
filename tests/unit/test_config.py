"""Settings: defaults load, YAML and env override in order, bad values name key and reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.config import ConfigError, load_settings

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


def test_embedded_defaults_are_valid_and_local() -> None:
    settings = load_settings(env={})
    assert settings.store.uri == ".tuneloop/store"
    assert settings.model.base_model == "demo"
    assert settings.training.lora_rank <= settings.vllm.max_lora_rank
    assert settings.vllm.api_key is None


def test_yaml_then_env_precedence(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("training:\n  learning_rate: 0.001\n  epochs: 2\nstore:\n  uri: s3://bucket/pfx\n")
    env = {"TUNELOOP__TRAINING__EPOCHS": "5", "TUNELOOP__VLLM__ENDPOINTS": "[http://a:1/, http://b:2]"}
    settings = load_settings(config, env=env)
    assert settings.training.learning_rate == 0.001  # from YAML
    assert settings.training.epochs == 5  # env beats YAML
    assert settings.training.batch_size == 16  # default survives a partial section
    assert settings.store.uri == "s3://bucket/pfx"
    assert settings.vllm.endpoints == ["http://a:1", "http://b:2"]


def test_config_path_from_env_variable(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("model:\n  served_model_name: invoices\n")
    assert load_settings(env={"TUNELOOP_CONFIG": str(config)}).model.served_model_name == "invoices"


def test_api_key_is_secret(tmp_path: Path) -> None:
    settings = load_settings(env={"TUNELOOP__VLLM__API_KEY": "s3cr3t"})
    assert settings.vllm.api_key is not None
    assert settings.vllm.api_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TUNELOOP__TRAINING__LEARNING_RATE": "-1"}, ["training.learning_rate", "greater than 0", "TUNELOOP__TRAINING__LEARNING_RATE"]),
        ({"TUNELOOP__GATE__MARGN": "0.1"}, ["gate.margn", "unknown key"]),
        ({"TUNELOOP__VLLM__MAX_LORA_RANK": "12"}, ["vllm.max_lora_rank", "vLLM accepts only"]),
        ({"TUNELOOP__STORE__URI": "gs://bucket"}, ["store.uri", "s3://"]),
        ({"TUNELOOP__VLLM__ENDPOINTS": "[localhost:8000]"}, ["vllm.endpoints", "http://"]),
        ({"TUNELOOP__TRAINING__DEVICE": "tpu"}, ["training.device", "'cpu'"]),
        ({"TUNELOOP__TRAINING__LORA_RANK": "64"}, ["exceeds vllm.max_lora_rank=16"]),
    ],
)
def test_bad_values_fail_fast_naming_key_and_reason(env: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    for fragment in expected:
        assert fragment in str(err.value)


def test_bad_yaml_file_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_settings(broken, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", env={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(scalar, env={})


# 201 bytes of nested aliases that expand to 9**6 = 531,441 values (a "billion laughs" bomb).
BOMB = "\n".join(
    f"{name}: &{name} [{','.join([f'*{prev}' if prev else 'x'] * 9)}]"
    for prev, name in zip(["", "a", "b", "c", "d", "e"], "abcdef", strict=True)
) + "\n"


def test_a_yaml_alias_bomb_is_refused_quickly_in_a_short_message(tmp_path: Path) -> None:
    import time

    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    assert len(BOMB) == 201
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert time.perf_counter() - started < 2.0
    message = str(caught.value)
    assert len(message) < 2000, len(message)
    assert f"config file {config}: its YAML aliases (*name) expand to more than 100,000 values" in message
    with pytest.raises(ConfigError, match="environment variable TUNELOOP__TRAINING__TARGET_MODULES: its YAML aliases"):
        load_settings(env={"TUNELOOP__TRAINING__TARGET_MODULES": "[" + ", ".join(line.split(": ", 1)[1] for line in BOMB.splitlines()) + "]"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "a YAML alias refers to a value that contains it (line 1)"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "its YAML is nested too deeply to read"),
    ],
    ids=["recursive-alias", "too-deep"],
)
def test_self_referencing_and_too_deep_yaml_are_refused(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert str(caught.value).startswith(f"config file {config}: {message}")


def test_aliases_of_a_sane_size_still_work(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("training: &training\n  target_modules: [q_proj, v_proj]\n  epochs: 2\n")
    assert load_settings(config, env={}).training.target_modules == ["q_proj", "v_proj"]


def test_values_echoed_in_errors_are_clipped(tmp_path: Path) -> None:
    four_levels = "\n".join(BOMB.splitlines()[:4])  # 9**4 values: under the limit, so pydantic sees them
    config = tmp_path / "c.yaml"
    config.write_text(f"{four_levels}\ntraining:\n  lora_rank: *d\n  device: {'n' * 100_000}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    message = str(caught.value)
    assert "training.lora_rank = [[[[...], [...]," in message and "training.device = 'nnnn" in message
    assert len(message) < 2000, len(message)
    assert all(len(line) < 600 for line in message.splitlines())


def test_relative_paths_anchor_to_tuneloop_home(tmp_path: Path) -> None:
    settings = load_settings(env={"TUNELOOP_HOME": str(tmp_path), "TUNELOOP__VLLM__ADAPTER_DIR": "/abs/adapters"})
    assert settings.store.uri == str(tmp_path / ".tuneloop/store")
    assert settings.model.demo_model_dir == str(tmp_path / ".tuneloop/models/demo-base")
    assert settings.vllm.adapter_dir == "/abs/adapters"  # absolute stays
    s3 = load_settings(env={"TUNELOOP_HOME": str(tmp_path), "TUNELOOP__STORE__URI": "s3://b/p"})
    assert s3.store.uri == "s3://b/p"


# -- the tuneloop_vllm Airflow connection ---------------------------------------------------


def test_vllm_connection_extra_endpoints_and_password_replace_the_config() -> None:
    from tuneloop.steps.loop import VllmConnection, apply_vllm_connection

    settings = load_settings(env={})
    conn = VllmConnection(password="s3cret", extra={"endpoints": "http://a:8000, http://b:8000/"})
    updated = apply_vllm_connection(settings, conn)
    assert updated.vllm.endpoints == ["http://a:8000", "http://b:8000"]
    assert updated.vllm.api_key is not None and updated.vllm.api_key.get_secret_value() == "s3cret"
    assert updated.vllm.max_lora_rank == settings.vllm.max_lora_rank
    assert settings.vllm.endpoints == ["http://127.0.0.1:8000"]  # the original is untouched


def test_vllm_connection_host_port_schema() -> None:
    from tuneloop.steps.loop import VllmConnection, apply_vllm_connection

    updated = apply_vllm_connection(load_settings(env={}), VllmConnection(host="vllm.svc", port=8000, schema="https"))
    assert updated.vllm.endpoints == ["https://vllm.svc:8000"] and updated.vllm.api_key is None


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        ({}, "names no endpoint"),
        ({"extra": {"endpoints": ["ftp://x"]}}, "must start with http"),
    ],
)
def test_bad_vllm_connection_fails_naming_it(conn: dict[str, Any], message: str) -> None:
    from tuneloop.steps.loop import VllmConnection, apply_vllm_connection

    with pytest.raises(ConfigError, match=message) as caught:
        apply_vllm_connection(load_settings(env={}), VllmConnection(**conn))
    assert "tuneloop_vllm connection" in str(caught.value)


def test_docs_configuration_table_is_current() -> None:
    from pathlib import Path

    from tuneloop.config import settings_table

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    start, end = "<!-- settings-table:start -->\n", "\n<!-- settings-table:end -->"
    assert start in page and end in page, "docs/configuration.md lost its settings table markers"
    table = page.split(start, 1)[1].split(end, 1)[0]
    assert table == settings_table(), (
        "docs/configuration.md's table is stale: replace the lines between the settings-table markers "
        "with the output of `.venv/bin/tuneloop config --table`"
    )


def test_the_defaults_file_and_the_settings_model_agree() -> None:
    """One source of defaults: the file documents the model's defaults and never differs from
    them (a value changed in one place only would make the CLI, the DAG and the docs disagree)."""
    from tuneloop.config import Settings

    assert load_settings(None, env={}).model_dump(mode="json") == Settings().model_dump(mode="json")
