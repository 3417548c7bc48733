"""Screenshot the tuneloop view in the Airflow UI with headless Chromium.

    .venv/bin/python scripts/screenshot_ui.py                         # a demo-like store built on the fly
    .venv/bin/python scripts/screenshot_ui.py --store .tuneloop/store # the store `make demo` left
    .venv/bin/python scripts/screenshot_ui.py --out docs/img          # where the PNGs go

Runs tests/integration/test_ui_chromium.py with ``TUNELOOP_UI_STORE`` and
``TUNELOOP_SCREENSHOT_DIR`` set: a throwaway Airflow API server (temporary AIRFLOW_HOME,
SQLite, admin/admin) shows the store, Chromium signs in, opens the view from the UI's
navigation and at /tuneloop-ui/, checks the registry rows and both plots, and saves
``airflow-ui-tuneloop-nav.png`` (the view inside the Airflow UI) and ``tuneloop-view.png``
(the whole page). Default output: .tuneloop/screenshots/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "tests" / "integration" / "test_ui_chromium.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="local store directory to show (default: $TUNELOOP_UI_STORE, else a demo-like store)")
    parser.add_argument("--out", default=os.environ.get("TUNELOOP_SCREENSHOT_DIR", str(ROOT / ".tuneloop" / "screenshots")), help="where to save the PNGs")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    store = args.store or env.get("TUNELOOP_UI_STORE")
    if store:
        path = Path(store).resolve()
        if not (path / "registry").is_dir():
            parser.error(f"{path} holds no registry/: run make demo first, or leave --store out for a demo-like store")
        env["TUNELOOP_UI_STORE"] = str(path)
    else:
        env.pop("TUNELOOP_UI_STORE", None)
    out = Path(args.out).resolve()
    env["TUNELOOP_SCREENSHOT_DIR"] = str(out)
    command = [sys.executable, "-m", "pytest", str(TEST), "-q", "-p", "no:cacheprovider", "-k", "navigation or own_url"]
    started = time.time()
    code = subprocess.call(command, cwd=ROOT, env=env)
    shots = [out / name for name in ("airflow-ui-tuneloop-nav.png", "tuneloop-view.png")]
    if code == 0 and not all(shot.is_file() and shot.stat().st_mtime >= started for shot in shots):
        print("no screenshots taken (was the test skipped? it needs /usr/bin/chromium)", file=sys.stderr)
        return 1
    for shot in shots if code == 0 else []:
        print(f"saved {shot}")
    return code


if __name__ == "__main__":
    sys.exit(main())
