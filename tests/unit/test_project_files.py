"""The files we cannot run here (Docker images, compose, Astro settings) at least parse and agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tuneloop.config import load_settings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_parses_and_wires_store_and_gpu() -> None:
    compose = yaml.safe_load((ROOT / "docker/compose.gpu.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "vllm", "trainer"}
    for name in ("vllm", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        dockerfile = ROOT / "docker" / Path(services[name]["build"]["dockerfile"]).name
        assert dockerfile.is_file(), dockerfile
    # The trainer's TUNELOOP__ variables must be settings the model accepts.
    env = {k: v.replace("${BASE_MODEL}", "meta-llama/Llama-3.2-1B") for k, v in services["trainer"]["environment"].items() if k.startswith("TUNELOOP__")}
    settings = load_settings(env=env)
    assert settings.store.uri == "s3://tuneloop/prod"
    assert settings.store.endpoint_url == "http://minio:9000"


def test_images_are_pinned() -> None:
    for path in [ROOT / "Dockerfile", *sorted((ROOT / "docker").glob("*.Dockerfile"))]:
        froms = re.findall(r"^FROM\s+(\S+)", path.read_text(), flags=re.M)
        assert froms, path
        for image in froms:
            assert ":" in image and not image.endswith(":latest"), f"{path.name}: {image} is not pinned"


def test_vllm_image_enables_runtime_lora_with_api_key() -> None:
    text = (ROOT / "docker/vllm.Dockerfile").read_text()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in text
    assert "--enable-lora" in text and "--api-key" in text
    assert "--max-lora-rank" in text


def test_airflow_settings_has_gpu_pool_and_store_connection() -> None:
    settings = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]
    pools = {pool["pool_name"]: pool for pool in settings["pools"]}
    assert pools["gpu"]["pool_slot"] == 1
    assert {c["conn_id"] for c in settings["connections"]} >= {"tuneloop_store"}


def test_astro_requirements_cover_the_orchestration_lock() -> None:
    wanted = {re.split(r"[<>=\[ ]", line)[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")}
    locked = {line.split("==")[0].lower() for line in (ROOT / "requirements/airflow.lock").read_text().splitlines() if "==" in line}
    assert wanted <= locked, wanted - locked
