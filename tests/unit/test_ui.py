"""The tuneloop view (include/tuneloop/ui.py): the page built from a store that the package's
own steps populated (drift checks on a small demo world, registry versions, gate results
written by ``steps: gate_step``), the empty state, escaping, and store errors as a page that
names the cause. No Airflow, no browser: the plugin and Chromium are tested in
tests/integration/test_ui_chromium.py."""

from __future__ import annotations

import base64
import json
import random
import re
import struct
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from tuneloop import ui
from tuneloop.config import ConfigError
from tuneloop.demo.invoices import generate_world
from tuneloop.steps.gate import gate_step
from tuneloop.steps.loop import Loop, open_loop
from tuneloop.steps.monitor import check_drift
from tuneloop.steps.serve import record_step
from tuneloop.storage import LocalStore, Store, write_snapshot

pytestmark = pytest.mark.unit

START = date(2026, 1, 1)
DRIFT_START = START + timedelta(days=14)
BASE_MODEL = "/home/ops/tuneloop/.tuneloop/models/demo-base"


def _scores(means: dict[str, float], seed: int, n: int = 40) -> bytes:
    """Per-example scores like evaluate writes: field accuracy over 7 fields per example. A
    field's difficulty depends on the example only, so two models' scores are paired."""
    noise = random.Random(seed)
    rows = []
    for slice_name, mean in means.items():
        for index in range(n):
            example = random.Random(f"{slice_name}-{index}")
            score = sum(example.random() + noise.uniform(-0.1, 0.1) < mean for _ in range(7)) / 7
            rows.append({"id": f"{slice_name}-{index:03d}", "slice": slice_name, "score": score})
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _snapshot(store: Store, trained_on: str) -> str:
    prompts = "".join(json.dumps({"id": f"r{i}", "prompt": f"invoice {i}", "completion": "{}", "domain": trained_on}) + "\n" for i in range(5))
    return write_snapshot(
        store, "snapshots", {"train.jsonl": prompts.encode(), "eval.jsonl": prompts.encode()},
        {"domains": {"train": {trained_on: 5}}},
    )


def refresh(loop: Loop, version: str, *, snapshot: str, baseline: dict[str, float], candidate: dict[str, float], seed: int) -> dict[str, Any]:
    """What tuneloop_refresh records for one candidate, with the training and scoring (ML env)
    replaced by their outputs: register, point ``candidate`` at it, the real gate step, and on
    PROMOTE the real record step."""
    loop.run_id = f"manual__2026-03-0{seed}T10-00-00"
    production = loop.registry.aliases().get("production")
    train = {"final_loss": 0.41 - seed / 100, "first_loss": 2.9, "steps": 150, "seconds": 312.4, "device": "cpu", "init_from": production}
    loop.registry.register(version, adapter_key=f"adapters/{version}", snapshot=snapshot, base_model=BASE_MODEL, metrics={"train": train}, run_id=loop.run_id)
    loop.registry.move_aliases({"candidate": version}, reason=f"trained on snapshot {snapshot[:12]}", run_id=loop.run_id)
    evaluation: dict[str, Any] = {"version": version, "snapshot": snapshot, "production": production}
    for role, means in (("production", baseline), ("candidate", candidate)):
        key = f"evals/{version}/{loop.run_key}/{role}/scores.jsonl"
        loop.store.put_bytes(key, _scores(means, seed * 10 + (role == "candidate")))
        evaluation[f"{role}_eval"] = {"scores_key": key}
    result = gate_step(loop, evaluation)
    if result["promote"]:
        record_step(loop, version, result)
    return result


@dataclass
class Populated:
    store: Store
    drift_only: ui.Page  # the page after the drift checks, before any version


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Populated:
    tmp = tmp_path_factory.mktemp("ui")
    config = tmp / "tuneloop.yaml"
    config.write_text(f"store:\n  uri: {tmp / 'store'}\ndrift:\n  current_days: 3\n  performance: false\n")
    loop = open_loop(str(config), run_id="ui-test", progress=lambda message: None)
    generate_world(loop.store, START, 20, drift_start=DRIFT_START, traffic_per_day=30, labelled_per_day=6)
    for offset in (9, 16, 19):  # calm, then drifted
        check_drift(loop, as_of=(START + timedelta(days=offset)).isoformat())
    drift_only = ui.build_page(lambda: (loop.store, "test"), base="/tuneloop-ui")
    first, second = _snapshot(loop.store, "original"), _snapshot(loop.store, "drifted")
    verdicts = [
        refresh(loop, "v1", snapshot=first, baseline={"original": 0.2, "drifted": 0.15}, candidate={"original": 0.75, "drifted": 0.3}, seed=1),
        refresh(loop, "v2", snapshot=second, baseline={"original": 0.75, "drifted": 0.3}, candidate={"original": 0.75, "drifted": 0.8}, seed=2),
        refresh(loop, "v3", snapshot=second, baseline={"original": 0.75, "drifted": 0.8}, candidate={"original": 0.45, "drifted": 0.82}, seed=3),
    ]
    assert [v["promote"] for v in verdicts] == [True, True, False], [v["reasons"] for v in verdicts]
    return Populated(store=loop.store, drift_only=drift_only)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _inline_image(page: str, element_id: str) -> bytes:
    match = re.search(rf'<img id="{element_id}" [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, f"no inline PNG #{element_id}"
    return base64.b64decode(match.group(1))


def _row(page: str, version: str) -> str:
    match = re.search(rf'<tr class="version" data-version="{version}">(.*?)</tr>\s*(?=<tr class="version"|</tbody>)', page, re.S)
    assert match, f"no registry row for {version}"
    return match.group(1)


def test_the_page_shows_the_registry_with_lineage_metrics_and_gate_decisions(populated: Populated) -> None:
    page = ui.build_page(lambda: (populated.store, "test"), base="/tuneloop-ui/")
    assert page.status == 200
    html = page.html
    assert re.findall(r'data-version="(v\d+)"', html) == ["v3", "v2", "v1"]  # newest first
    assert 'production <b>v2</b>' in html and 'previous <b>v1</b>' in html and 'candidate <b>v3</b>' in html

    v1, v2, v3 = (_row(html, v) for v in ("v1", "v2", "v3"))
    assert '<span class="badge production">production</span>' in v2
    assert '<span class="badge previous">previous</span>' in v1
    assert '<span class="badge candidate">candidate</span>' in v3
    record = populated.store.get_json("registry/versions/v2.json")
    assert f'<code title="{record["snapshot"]}">{record["snapshot"][:12]}</code>' in v2
    assert f'title="{BASE_MODEL}">.../models/demo-base</code>' in v2
    assert "loss 2.900 &rarr; 0.390" in v2 and "150 steps, 312 s, cpu" in v2 and "warm start from v1" in v2
    assert "fresh LoRA weights" in v1

    gate = populated.store.get_json("reports/v2/gate.json")
    drifted = gate["slices"]["drifted"]
    assert f"{drifted['baseline_mean']:.3f} &rarr; <b>{drifted['candidate_mean']:.3f}</b>" in v2
    assert f"{drifted['delta']:+.3f} <span class=\"muted\">[{drifted['ci_low']:+.3f}, {drifted['ci_high']:+.3f}]</span>" in v2
    assert "improve, n=40" in v2 and "non-inferior, n=40" in v2
    assert "PROMOTE</span> <span class=\"muted small\">vs v1" in v2
    assert "PROMOTE</span> <span class=\"muted small\">vs base model" in v1
    rejected = populated.store.get_json("reports/v3/gate.json")
    assert rejected["promote"] is False
    assert "REJECT" in v3 and '<td class="fail">FAIL</td>' in v3
    for reason in rejected["reasons"]:
        assert f"<li>{reason}</li>" in v3.replace("&#x27;", "'")
    assert 'href="/tuneloop-ui/reports/v3/gate.html"' in v3

    assert "rollback" not in html and "refresh: gate passed, deployed and verified" in html  # alias moves
    assert html.count("<tr><td class=\"num\">") == 5  # 3 candidate moves + 2 promotions


def test_the_page_embeds_the_drift_and_eval_history_plots(populated: Populated) -> None:
    html = ui.build_page(lambda: (populated.store, "test")).html
    drift = _inline_image(html, "drift-plot")
    assert drift == populated.store.get_bytes("drift/history.png")  # what the drift monitor drew
    assert _png_size(drift)[0] > 500
    width, height = _png_size(_inline_image(html, "eval-plot"))
    assert (width, height) == (880, 616)
    checks = [json.loads(populated.store.get_text(k)) for k in populated.store.list("drift/checks/")]
    newest = checks[-1]
    assert "3 check(s). Newest: as of <b>2026-01-20</b>" in html
    assert newest["drift"] and '<b class="fail">drift</b>' in html


def test_without_a_stored_plot_the_drift_history_is_redrawn_from_the_checks(populated: Populated, tmp_path: Path) -> None:
    copy = LocalStore(tmp_path / "copy")
    for key in populated.store.list("drift/checks/"):
        copy.put_bytes(key, populated.store.get_bytes(key))
    view = ui.load_view(copy)
    assert view.drift_png is not None and _png_size(view.drift_png)[0] > 500
    assert not copy.exists("drift/history.png")  # reading never writes


def test_drift_checks_without_versions_show_the_registry_empty_and_the_drift_plot(populated: Populated) -> None:
    page = populated.drift_only
    assert page.status == 200
    assert ui.EMPTY_MESSAGE in page.html and 'id="registry-empty"' in page.html
    _inline_image(page.html, "drift-plot")
    assert 'id="eval-plot"' not in page.html and "no gate results yet" in page.html


def test_an_empty_store_shows_how_to_fill_it(tmp_path: Path) -> None:
    page = ui.build_page(lambda: (LocalStore(tmp_path / "empty"), "test"))
    assert page.status == 200
    assert 'id="empty-state"' in page.html
    assert "no versions yet: run make demo / trigger tuneloop_refresh" in page.html
    assert "<img" not in page.html and "<table" not in page.html


def test_the_gate_report_is_served_from_the_store_and_nothing_else_is(populated: Populated) -> None:
    data, content_type = ui.report_file(populated.store, "v2", "gate.html")
    assert content_type == "text/html; charset=utf-8" and b"<html" in data[:300].lower()
    assert b"Gate: candidate v2 vs production v1" in data
    png, png_type = ui.report_file(populated.store, "v2", "gate.png")
    assert png_type == "image/png" and _png_size(png)[0] > 0
    assert ui.report_file(populated.store, "v2", "gate.md")[1] == "text/plain; charset=utf-8"
    for version, name in (("v2", "../../registry/aliases.json"), ("v2", "manifest.json"), ("..", "gate.html"), ("v2/../v1", "gate.html"), ("v2", "gate.exe")):
        with pytest.raises(ui.ViewNotFoundError, match="serves reports"):
            ui.report_file(populated.store, version, name)
    with pytest.raises(ui.ViewNotFoundError, match="not in"):
        ui.report_file(populated.store, "v9", "gate.html")


def test_text_from_the_store_is_escaped(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    from tuneloop.registry import Registry

    evil = '<script>alert("x")</script>'
    registry = Registry(store)
    registry.register("v1", adapter_key="adapters/v1", snapshot=evil, base_model=evil, metrics={"train": {"device": evil, "init_from": evil}}, run_id=evil)
    registry.move_aliases({"production": "v1"}, reason=evil, run_id=evil)
    slice_stats = {"n": 31, "baseline_mean": 0.5, "candidate_mean": 0.6, "delta": 0.1, "ci_low": 0.01, "ci_high": 0.2, "p_value": 0.01, "rule": evil, "passed": True}
    store.put_json("reports/v1/gate.json", {
        "promote": True, "reasons": [evil], "slices": {evil: slice_stats}, "improve_slices": [evil], "margin": 0.05,
        "alpha": 0.05, "ci_level": 0.95, "baseline": evil, "report": {"html": "reports/v1/../../x.html"},
    })
    store.put_json("drift/checks/2026-01-01__r.json", {
        "as_of": evil, "drift": True, "emit": False, "statistic": 0.7, "p_value": 0.001, "decision": evil,
        "current_window": [evil], "report": {"alpha": 0.05},
    })
    page = ui.build_page(lambda: (store, evil)).html
    assert "<script" not in page and evil not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 8
    assert "x.html" not in page  # a report key outside reports/v1/ is never linked


def test_a_store_that_cannot_be_read_gives_a_page_naming_the_cause(tmp_path: Path) -> None:
    def refuse() -> tuple[Store, str]:
        raise ConfigError("invalid tuneloop settings:\n  store.uri = 'ftp://x': only local paths")

    page = ui.build_page(refuse)
    assert page.status == 503
    assert 'id="store-error"' in page.html and "ConfigError: invalid tuneloop settings" in page.html
    assert "ftp://x" in page.html and "Traceback" not in page.html

    store = LocalStore(tmp_path / "store")
    store.put_bytes("registry/versions/v1.json", b"{not json")
    page = ui.build_page(lambda: (store, "test"))
    assert page.status == 503
    assert "registry/versions/v1.json" in page.html and "not valid JSON" in page.html
    assert f"Cannot read the tuneloop store <code>{store.uri}</code>" in page.html


def test_an_unreadable_gate_result_is_named_in_its_row(populated: Populated, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for key in populated.store.list("registry/"):
        store.put_bytes(key, populated.store.get_bytes(key))
    store.put_bytes("reports/v2/gate.json", b"<html>")
    page = ui.build_page(lambda: (store, "test"))
    assert page.status == 200
    assert "reports/v2/gate.json" in _row(page.html, "v2") and "not valid JSON" in _row(page.html, "v2")
    assert "not gated yet" in _row(page.html, "v1")


def test_the_store_comes_from_the_settings_or_tuneloop_ui_store(tmp_path: Path) -> None:
    config = tmp_path / "tuneloop.yaml"
    config.write_text(f"store:\n  uri: {tmp_path / 'configured'}\n")
    store, source = ui.open_view_store(env={"TUNELOOP_CONFIG": str(config)})
    assert store.uri.endswith("/configured") and source == f"config {config}"
    store, source = ui.open_view_store(env={}, config_variable=lambda: str(config))
    assert store.uri.endswith("/configured")
    store, source = ui.open_view_store(env={"TUNELOOP_CONFIG": str(tmp_path / "missing.yaml")})
    assert source == "embedded defaults"
    store, source = ui.open_view_store(env={"TUNELOOP_CONFIG": str(config), ui.STORE_ENV: "relative/demo-store"})
    assert source == "$TUNELOOP_UI_STORE"
    assert store.uri == f"file://{Path('relative/demo-store').resolve()}"


def test_the_dags_whose_read_access_the_view_asks_for_are_the_project_dags() -> None:
    """The plugin asks Airflow's auth manager for read access to these DAG ids: a renamed DAG
    would make the check ask about a DAG nobody can be granted."""
    from tuneloop_airflow.loops import SINGLE

    dags_folder = Path(__file__).resolve().parents[2] / "dags"
    stages = {m for path in dags_folder.glob("*.py") for m in re.findall(r"^    (\w+)_dag\(doc=__doc__\)$", path.read_text(), re.M)}
    dag_ids = {SINGLE.dag_id(stage) for stage in stages}
    assert set(ui.VIEW_DAG_IDS) <= dag_ids
    assert {"tuneloop_refresh", "tuneloop_drift_monitor", "tuneloop_rollback"} == set(ui.VIEW_DAG_IDS)
    message = ui.forbidden_message("viewer", ["tuneloop_rollback"])
    assert message.startswith("user 'viewer' may not read the Airflow DAG(s) tuneloop_rollback: ")
    assert "read access to tuneloop_refresh, tuneloop_drift_monitor, tuneloop_rollback" in message
