"""The compose files: docker-compose.override.yml (merged by `astro dev start` into the Astro
CLI's project) and docker/compose.gpu.yaml. No Docker engine runs on the development machine,
so `docker compose config` cannot check them here: these tests read them with yaml and check
what a broken `astro dev start` would trip on: paths that do not exist, variables the settings
model does not know, ports Astro already uses, unpinned images, services off Astro's network."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneloop.config import CONFIG_ENV, ENV_PREFIX, HOME_ENV, load_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = ROOT / "docker-compose.override.yml"
GPU = ROOT / "docker" / "compose.gpu.yaml"
COMPOSE_FILES = [OVERRIDE, GPU]
# Astro Runtime 3's compose project (astro-cli airflow/include/airflow3/composeyml.go.tmpl)
ASTRO_SERVICES = {"postgres", "db-migration", "scheduler", "dag-processor", "api-server", "triggerer"}
ASTRO_NETWORK = "airflow"
ASTRO_HOST_PORTS = {8080, 5432}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{path.name}: no services"
    return data


def interpolate(value: Any) -> str:
    """What compose makes of a value with no variables set: ``${X:-default}`` -> default,
    ``${X:?message}`` -> a placeholder (compose refuses to start without it), ``$$`` -> ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match["op"] in (":-", "-"):
            return match["arg"]
        return f"<{match['name']}>" if match["op"] else ""

    return _VARIABLE.sub(substitute, str(value)).replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(v) for k, v in env.items()}


def host_ports(service: dict[str, Any]) -> list[int]:
    ports = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
        else:
            parts = interpolate(entry).split("/")[0].split(":")
            published = parts[-2] if len(parts) >= 2 else None  # "ip:host:container" or "host:container"
        if published is not None:
            ports.append(int(published))
    return ports


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_parses_and_declares_its_named_volumes(path: Path) -> None:
    compose = load(path)
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"{path.name}: {name} mounts volume {source!r}, not declared under volumes:"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_build_contexts_dockerfiles_and_bind_mounts_exist(path: Path) -> None:
    base = path.parent  # compose resolves relative paths against the file's directory
    for name, service in load(path)["services"].items():
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = (base / build.get("context", ".")).resolve()
            assert context.is_dir(), f"{path.name}: {name} build context {context} does not exist"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{path.name}: {name} dockerfile {dockerfile} does not exist"
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith("$"):
                continue  # a user-supplied directory (e.g. ${MODELS_DIR:-./models}): theirs to provide
            if source.startswith((".", "/")):
                assert (base / source).exists(), f"{path.name}: {name} mounts {source}, which does not exist"


def test_dockerfile_copy_sources_exist_and_are_not_docker_ignored() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for dockerfile in [ROOT / "docker" / "vllm-cpu.Dockerfile", ROOT / "docker" / "trainer.Dockerfile"]:
        for line in re.findall(r"^COPY\s+(.+)$", dockerfile.read_text(), flags=re.M):
            sources = [part for part in line.split()[:-1] if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the build context"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{dockerfile.name}: {source} is in .dockerignore"
    # the multi-GB local environments never enter a build context
    for heavy in (".venv", ".venv-ml", ".tuneloop"):
        assert heavy in ignored


def test_override_only_extends_astro_services_and_its_own_join_astro_s_network() -> None:
    services = load(OVERRIDE)["services"]
    added = {name for name, service in services.items() if "image" in service or "build" in service}
    assert added == {"minio", "minio-init", "vllm"}
    for name in set(services) - added:
        assert name in ASTRO_SERVICES, f"{name} is neither an Astro service nor a complete service of its own"
    for name in added:
        assert ASTRO_NETWORK in services[name].get("networks", []), f"{name} is not on Astro's network {ASTRO_NETWORK!r}"
    # the tasks run in the scheduler (LocalExecutor): it needs the settings and the shared volume
    assert any(str(v).startswith("tuneloop-shared:/shared") for v in services["scheduler"]["volumes"])


def test_override_environment_is_settings_the_model_knows_and_agrees_with_the_services() -> None:
    services = load(OVERRIDE)["services"]
    for name, service in services.items():
        for key in environment(service):
            if key.startswith("TUNELOOP") and not key.startswith(ENV_PREFIX):
                assert key in (HOME_ENV, CONFIG_ENV), f"{name}: {key} is no variable tuneloop reads (a typo of {ENV_PREFIX}...?)"
    env = environment(services["scheduler"])
    for name in ASTRO_SERVICES & set(services):
        assert environment(services[name]) == env, f"{name} sees other tuneloop settings than the scheduler"
    settings = load_settings(env={k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})  # unknown keys raise

    bucket = settings.store.uri.removeprefix("s3://").split("/")[0]
    assert settings.store.uri.startswith("s3://") and settings.store.endpoint_url == "http://minio:9000"
    assert f"tuneloop/{bucket}" in " ".join(services["minio-init"]["command"]), "minio-init creates another bucket"
    minio = environment(services["minio"])
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter passwords

    vllm = environment(services["vllm"])
    assert settings.vllm.endpoints == ["http://vllm:8000"]
    assert vllm["BASE_MODEL"] == settings.model.demo_model_dir and settings.model.base_model == "demo"
    assert vllm["ADAPTER_DIR"] == settings.vllm.adapter_dir
    assert vllm["SERVED_MODEL_NAME"] == settings.model.served_model_name
    assert int(vllm["MAX_LORA_RANK"]) == settings.vllm.max_lora_rank
    assert settings.vllm.api_key is not None and vllm["VLLM_API_KEY"] == settings.vllm.api_key.get_secret_value()
    # the deploy hands vLLM a path: adapters and model must sit on the volume both mount at /shared
    assert settings.vllm.adapter_dir.startswith("/shared/") and settings.model.demo_model_dir.startswith("/shared/")
    assert "tuneloop-shared:/shared" in services["vllm"]["volumes"]
    assert not settings.notify.enabled  # notifications stay opt-in


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_published_ports_are_unique_and_leave_astro_s_alone(path: Path) -> None:
    ports = [port for service in load(path)["services"].values() for port in host_ports(service)]
    assert ports, path.name
    assert len(ports) == len(set(ports)), f"{path.name}: a host port is published twice: {sorted(ports)}"
    assert not set(ports) & ASTRO_HOST_PORTS, f"{path.name}: collides with Astro's api-server/postgres ports"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_images_are_pinned(path: Path) -> None:
    for name, service in load(path)["services"].items():
        image = service.get("image")
        if image is None:
            continue
        image = interpolate(image)
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{path.name}: {name} image {image} is not pinned"
