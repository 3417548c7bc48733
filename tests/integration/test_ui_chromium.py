"""The tuneloop view (plugins/tuneloop_ui.py) in a real headless Chromium, served by a real
Airflow API server.

One throwaway Airflow API server for the module (SQLite in a temporary AIRFLOW_HOME, simple
auth manager with an admin, a viewer and a user without a role, the project's plugins folder), showing a store populated as a
demo run leaves it, by the package's own functions: a demo world, dataset snapshots, drift
checks (``steps: check_drift``), two adapter versions with the real gate step and alias
moves (training and scoring, which need the ML env, are replaced by their outputs). Chromium
signs in, opens the view through the UI's navigation item (the external view, an iframe) and
directly at ``/tuneloop-ui/``, checks the registry rows and that both plots decoded, and saves
screenshots (paths printed; copies in ``$TUNELOOP_SCREENSHOT_DIR`` or .tuneloop/screenshots/).

``TUNELOOP_UI_STORE=/path/to/.tuneloop/store`` shows that store instead (e.g. after
``make demo``); ``scripts/screenshot_ui.py`` runs this test that way.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from processes import free_port, stop_process_tree

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tuneloop.steps.loop import Loop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
START_TIMEOUT_S = 150
UI_TIMEOUT_MS = 60_000
PREFIX = "/tuneloop-ui"
# Simple auth manager users (password = name): a role-less user is signed in but may read nothing.
USERS = {"admin": "admin", "viewer": "viewer", "nobody": ""}

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent: scripts/setup.sh installs Debian's chromium", allow_module_level=True)


# --- a store as a demo run leaves it --------------------------------------------------------

WORLD_START = date(2026, 1, 1)
DRIFT_START = date(2026, 2, 12)


def _scores(means: dict[str, float], seed: int, n: int = 150) -> bytes:
    """Per-example scores as ``tuneloop evaluate`` writes them (field accuracy over 7 fields).
    A field's difficulty depends on the example only, so two models' scores are paired as
    real ones are: the better model mostly gets right what the worse one got right."""
    noise = random.Random(seed)
    rows = []
    for name, mean in means.items():
        for i in range(n):
            example = random.Random(f"{name}-{i}")
            correct = sum(example.random() + noise.uniform(-0.15, 0.15) < mean for _ in range(7))
            rows.append({"id": f"heldout-{name}-{i:04d}", "slice": name, "score": correct / 7})
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _snapshot(loop: Loop, since: date | None, until: date) -> str:
    """pull + row checks + the dataset snapshot (the Great Expectations suite left out)."""
    from tuneloop.intake.pull import pull_snapshot

    return str(pull_snapshot(loop.store, since=since, until=until, spec=loop.spec, eval_fraction=loop.settings.data.eval_fraction)["snapshot"])


def _refresh(loop: Loop, version: str, snapshot: str, baseline: dict[str, float], candidate: dict[str, float], *, day: str, seed: int) -> None:
    """What tuneloop_refresh records for one candidate, training and scoring replaced by their
    outputs: register + candidate alias (train step), the real gate step, the record step."""
    from tuneloop.steps.gate import gate_step
    from tuneloop.steps.loop import base_model_ref
    from tuneloop.steps.serve import record_step

    loop.run_id = f"scheduled__{day}T00:00:00+00:00"
    production = loop.registry.aliases().get("production")
    train = {
        "final_loss": 0.27 if production else 0.34, "first_loss": 0.52 if production else 3.41, "steps": 150, "epochs": 1.6,
        "seconds": 318.0, "tokens_per_second": 1480.0, "device": "cpu", "dtype": "float32", "trainable_params": 1_310_720,
        "init_from": production,
    }
    loop.registry.register(
        version, adapter_key=f"adapters/{version}", snapshot=snapshot, base_model=base_model_ref(loop.settings),
        metrics={"train": train}, run_id=loop.run_id,
    )
    loop.registry.move_aliases({"candidate": version}, reason=f"trained on snapshot {snapshot[:12]}", run_id=loop.run_id)
    evaluation: dict[str, Any] = {"version": version, "snapshot": snapshot, "production": production}
    for offset, (role, means) in enumerate((("production", baseline), ("candidate", candidate))):
        key = f"evals/{version}/{loop.run_key}/{role}/scores.jsonl"
        loop.store.put_bytes(key, _scores(means, seed * 10 + offset))
        evaluation[f"{role}_eval"] = {"adapter": production if role == "production" else version, "scores_key": key}
    result = gate_step(loop, evaluation)
    assert result["promote"], result["reasons"]
    record_step(loop, version, result)


def build_demo_like_store(root: Path) -> Path:
    """``make demo``'s story in a store under ``root``: 42 calm days, v1 trained on them and
    promoted over the base model; 21 days in which drifted documents ramp up; a drift check
    every third day; v2 trained on the new data and promoted over v1."""
    from tuneloop.demo.invoices import generate_world
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.monitor import check_drift

    config = root / "tuneloop.yaml"
    store = root / "store"
    # performance checks score production in the ML env: left out here
    config.write_text(f"store:\n  uri: {store}\ndrift:\n  performance: false\ntask:\n  slice_field: domain\ngate:\n  improve_slices: [drifted]\n")
    loop = open_loop(str(config), run_id="ui-demo", progress=lambda message: None)
    generate_world(loop.store, WORLD_START, 42, traffic_per_day=60, labelled_per_day=36, bad_row_rate=0.02)
    first = _snapshot(loop, None, DRIFT_START - timedelta(days=1))
    _refresh(loop, "v1", first, {"original": 0.18, "drifted": 0.12}, {"original": 0.71, "drifted": 0.24}, day="2026-02-12", seed=1)
    generate_world(loop.store, DRIFT_START, 21, drift_start=DRIFT_START, traffic_per_day=60, labelled_per_day=36, bad_row_rate=0.03)
    for offset in range(1, 22, 3):
        check_drift(loop, as_of=(DRIFT_START + timedelta(days=offset)).isoformat())
    second = _snapshot(loop, DRIFT_START, DRIFT_START + timedelta(days=20))
    _refresh(loop, "v2", second, {"original": 0.71, "drifted": 0.24}, {"original": 0.70, "drifted": 0.66}, day="2026-03-05", seed=2)
    return store


# --- a local Airflow API server --------------------------------------------------------------


@dataclass
class LocalAirflow:
    url: str
    home: Path
    store: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.home.glob("*.out")))


def _start_script(home: Path, port: int, store: Path) -> str:
    q = shlex.quote
    return f"""
set -euo pipefail
export AIRFLOW_HOME={q(str(home))} TUNELOOP_AIRFLOW_PORT={port} AIRFLOW__CORE__PARALLELISM=2
source {q(str(ROOT / "scripts/airflow_env.sh"))}
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///{q(str(home))}/airflow.db
export AIRFLOW__API_AUTH__JWT_SECRET={secrets.token_hex(32)}
export TUNELOOP_UI_STORE={q(str(store))}
unset TUNELOOP_CONFIG
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS={q(",".join(f"{user}:{role}" for user, role in USERS.items()))}
printf '%s\\n' {q(json.dumps({user: user for user in USERS}))} > "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
airflow db migrate > {q(str(home))}/migrate.out 2>&1
exec airflow api-server -H 127.0.0.1 -p {port} -w 1 > {q(str(home))}/api-server.out 2>&1
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("TUNELOOP_UI_STORE")
    if given:
        path = Path(given).resolve()
        assert (path / "registry").is_dir(), f"TUNELOOP_UI_STORE={given} holds no registry/ (run make demo first)"
        return path
    return build_demo_like_store(tmp_path_factory.mktemp("ui-demo"))


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Iterator[LocalAirflow]:
    home = tmp_path_factory.mktemp("ui-airflow")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "TUNELOOP__"))}
    process = subprocess.Popen(["bash", "-c", _start_script(home, port, store)], cwd=home, env=env, start_new_session=True)
    running = LocalAirflow(url=f"http://127.0.0.1:{port}", home=home, store=store)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"Airflow exited with {process.returncode}\n{running.logs()}"
            try:
                if httpx.get(f"{running.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API server did not start in {START_TIMEOUT_S} s\n{running.logs()}"
            time.sleep(1)
        yield running
    finally:
        stop_process_tree(process)


@pytest.fixture(scope="module")
def screenshot_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Where screenshots go: pytest's temporary directory, and a copy users can find."""
    keep = Path(os.environ.get("TUNELOOP_SCREENSHOT_DIR") or ROOT / ".tuneloop" / "screenshots")
    keep.mkdir(parents=True, exist_ok=True)
    return tmp_path_factory.mktemp("screenshots"), keep


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _expected(store: Path) -> tuple[list[str], dict[str, str | None]]:
    from tuneloop.registry import Registry
    from tuneloop.storage import LocalStore

    registry = Registry(LocalStore(store))
    return [r["version"] for r in registry.versions()], registry.aliases()


def _save(page: Any, name: str, dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], **options: Any) -> Path:
    shot = dirs[0] / name
    page.screenshot(path=str(shot), **options)
    kept = dirs[1] / name
    shutil.copyfile(shot, kept)
    with capsys.disabled():
        print(f"\nscreenshot: {shot}\n      copy: {kept}")
    return kept


def _check_view(frame: Any, versions: list[str], aliases: dict[str, str | None]) -> None:
    """The registry rows (newest first) with their aliases, and both plots decoded."""
    from playwright.sync_api import expect

    rows = frame.locator("#registry tr.version")
    expect(rows).to_have_count(len(versions), timeout=UI_TIMEOUT_MS)
    assert [rows.nth(i).get_attribute("data-version") for i in range(len(versions))] == versions[::-1]
    for alias, version in aliases.items():
        if version:
            badge = frame.locator(f'#registry tr[data-version="{version}"] .badge.{alias}')
            expect(badge).to_be_visible()
    for row in range(len(versions)):
        expect(rows.nth(row).locator(".badge.promote, .badge.reject, td.gate .muted")).not_to_have_count(0)
    for plot in ("#drift-plot", "#eval-plot"):
        image = frame.locator(plot)
        expect(image).to_be_visible()
        image.scroll_into_view_if_needed()
        width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width > 0, f"{plot} did not decode"
        assert image.bounding_box()["width"] > 300, f"{plot} is drawn too small"


def test_the_view_opens_from_the_airflow_navigation_after_login(
    airflow: LocalAirflow, browser: Any, screenshot_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    versions, aliases = _expected(airflow.store)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    try:
        page.goto(airflow.url + "/", timeout=UI_TIMEOUT_MS)
        page.locator("input[name=username]").fill("admin", timeout=UI_TIMEOUT_MS)
        page.locator("input[name=password]").fill("admin")
        page.locator("button[type=submit]").click()
        link = page.locator('a[href$="/plugin/tuneloop"]')
        expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
        link.click()
        page.wait_for_url("**/plugin/tuneloop**", timeout=UI_TIMEOUT_MS)
        frame = page.frame_locator('iframe[title="tuneloop"]')
        _check_view(frame, versions, aliases)
        frame.locator("h1").scroll_into_view_if_needed()
        _save(page, "airflow-ui-tuneloop-nav.png", screenshot_dirs, capsys)
    except Exception:
        (screenshot_dirs[1] / "failure-nav.html").write_text(page.content())
        page.screenshot(path=str(screenshot_dirs[1] / "failure-nav.png"))
        raise
    finally:
        context.close()


def test_the_view_at_its_own_url_shows_registry_plots_and_the_gate_report(
    airflow: LocalAirflow, browser: Any, screenshot_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:

    versions, aliases = _expected(airflow.store)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    try:
        page.goto(f"{airflow.url}{PREFIX}/", timeout=UI_TIMEOUT_MS)  # not signed in: to the login page
        page.locator("input[name=username]").fill("admin", timeout=UI_TIMEOUT_MS)
        page.locator("input[name=password]").fill("admin")
        page.locator("button[type=submit]").click()
        page.wait_for_url(f"**{PREFIX}/", timeout=UI_TIMEOUT_MS)  # ...and back
        _check_view(page, versions, aliases)
        _save(page, "tuneloop-view.png", screenshot_dirs, capsys, full_page=True)

        newest = versions[-1]
        report = page.locator(f'#registry tr[data-version="{newest}"] a.report')
        href = report.get_attribute("href")
        assert href == f"{PREFIX}/reports/{newest}/gate.html"
        reply = context.request.get(airflow.url + href)
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
        assert f"Gate: candidate {newest}" in reply.text()
        assert context.request.get(f"{airflow.url}{PREFIX}/reports/{newest}/..%2F..%2Fregistry%2Faliases.json").status == 404
    except Exception:
        (screenshot_dirs[1] / "failure-direct.html").write_text(page.content())
        page.screenshot(path=str(screenshot_dirs[1] / "failure-direct.png"), full_page=True)
        raise
    finally:
        context.close()


def test_without_a_login_the_view_and_reports_are_refused(airflow: LocalAirflow) -> None:
    newest = _expected(airflow.store)[0][-1]
    for path in (f"{PREFIX}/", f"{PREFIX}/reports/{newest}/gate.html"):
        refused = httpx.get(airflow.url + path, timeout=30)
        assert refused.status_code == 401 and "sign in to Airflow" in refused.text, refused.text
        browser_like = httpx.get(airflow.url + path, headers={"Accept": "text/html"}, timeout=30)
        assert browser_like.status_code in (302, 307) and "/auth/login" in browser_like.headers["location"]
    login = httpx.post(f"{airflow.url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=30)
    token = login.json()["access_token"]
    page = httpx.get(f"{airflow.url}{PREFIX}/", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert page.status_code == 200 and 'id="registry"' in page.text
    assert "frame-ancestors 'self'" in page.headers["content-security-policy"]
    ui_plugins = httpx.get(f"{airflow.url}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    views = [v for p in ui_plugins["plugins"] if p["name"] == "tuneloop_ui" for v in p["external_views"]]
    assert views and views[0]["url_route"] == "tuneloop" and views[0]["href"] == f"{PREFIX}/"


def test_the_view_needs_read_access_to_the_tuneloop_dags(airflow: LocalAirflow) -> None:
    """A viewer may read the DAGs, so it sees the page (which offers no action); a signed-in
    user whom the auth manager grants nothing gets 403 naming the DAGs, for the page and the
    reports alike, and is not sent back to the login page it just came from."""
    newest = _expected(airflow.store)[0][-1]
    for user, expected in (("admin", 200), ("viewer", 200), ("nobody", 403)):
        login = httpx.post(f"{airflow.url}/auth/token", json={"username": user, "password": user}, timeout=30)
        assert login.status_code == 201, login.text
        for path in (f"{PREFIX}/", f"{PREFIX}/reports/{newest}/gate.html"):
            for accept in ("*/*", "text/html"):
                headers = {"Authorization": f"Bearer {login.json()['access_token']}", "Accept": accept}
                reply = httpx.get(airflow.url + path, headers=headers, timeout=60)
                assert reply.status_code == expected, (user, path, accept, reply.text[:300])
        if expected == 403:
            assert reply.text.startswith(
                "user 'nobody' may not read the Airflow DAG(s) tuneloop_refresh, tuneloop_drift_monitor, tuneloop_rollback:"
            ), reply.text
            assert "Ask an Airflow admin" in reply.text and reply.headers["cache-control"] == "no-store"
