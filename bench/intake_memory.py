"""Peak memory of intake on a large labelled file: chunked (what ``tuneloop pull``, ``validate``
and the DAG run) against holding the batch in memory (what intake did before).

    .venv/bin/python bench/intake_memory.py --mb 256            # writes a 256 MB JSONL file in a temp dir
    .venv/bin/python bench/intake_memory.py --mb 2048 --skip-whole   # the 2 GB case (~2 GB of disk for the
                                                                      # file, ~2 GB more for the spill)

Each measurement runs in a fresh interpreter and reports its peak RSS (``ru_maxrss``):

- ``read only``: ``LocalStore.open_read`` + ``iter_lines`` + the row check of each line, keeping
  nothing: the floor;
- ``chunked, all checks``: :func:`tuneloop.intake.stream.run_intake` with the intake checks
  (tokens, PII, labels, near-duplicates, eval leakage) and the Great Expectations suite, chunks of
  ``data.chunk_rows`` (50,000) rows;
- ``in memory, row checks``: every accepted row held as a parsed record (the row checks alone):
  a lower bound of the in-memory path;
- ``in memory, all checks`` (skipped with ``--skip-whole``): the row checks, intake checks and GX
  suite on the whole batch in memory, as intake ran before.

Memory only: not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
from tuneloop.config import TaskSettings
from tuneloop.intake.checks import IntakeOptions, run_intake_checks
from tuneloop.intake.expectations import QualitySuite, run_quality_gate
from tuneloop.intake.pull import is_eval_id
from tuneloop.intake.rows import check_line, check_lines, iter_lines
from tuneloop.intake.stream import run_intake
from tuneloop.storage import LocalStore
from tuneloop.tasks import TaskSpec

mode, path = sys.argv[1], Path(sys.argv[2])
spec = TaskSpec(TaskSettings(format="prompt_completion"))
options = IntakeOptions(max_tokens=4096)
started = time.perf_counter()
store = LocalStore(path.parent)
with store.open_read(path.name) as handle:
    lines = ((path.name, n, raw) for n, raw in enumerate(iter_lines(handle), 1))
    if mode == "read":
        total = accepted = 0
        for _, _, raw in lines:
            total += 1
            accepted += check_line(raw, spec)[0] is not None
    elif mode == "rows":
        batch = check_lines(lines, spec)
        total, accepted = batch.total, len(batch.accepted)
    elif mode == "whole":
        batch = check_lines(lines, spec)
        intake = run_intake_checks(batch, options, spec, is_eval=lambda i: is_eval_id(i, 0.2))
        run_quality_gate(batch, max_quarantine_rate=1, min_accepted_rows=1, spec=spec, intake=intake)
        total, accepted = batch.total, len(batch.accepted)
    else:
        with tempfile.TemporaryDirectory(dir=path.parent) as spill:
            run = run_intake(lines, spec, Path(spill), options=options, is_eval=lambda i: is_eval_id(i, 0.2), quality=QualitySuite(spec=spec, intake_ran=True))
            total, accepted = run.total, run.accepted
seconds = time.perf_counter() - started
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lines": total, "accepted": accepted, "seconds": seconds}))
"""

WORDS = "invoice order ticket refund login password account billing shipping delay error crash export report team owner".split()


def write_file(path: Path, megabytes: int, seed: int = 0) -> int:
    """Prompt/completion rows of ~600 bytes each, distinct, until the file has ``megabytes`` MB."""
    rng = random.Random(seed)
    target, written, rows = megabytes * 1024 * 1024, 0, 0
    with open(path, "wb") as out:
        while written < target:
            block = []
            for _ in range(1000):
                prompt = " ".join(rng.choice(WORDS) for _ in range(70)) + f" #{rows}"
                block.append(json.dumps({"id": f"r{rows}", "prompt": prompt, "completion": rng.choice(WORDS)}) + "\n")
                rows += 1
            data = "".join(block).encode()
            out.write(data)
            written += len(data)
    return rows


def measure(mode: str, path: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "include")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, env=env, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the generated file in MB (default 256)")
    parser.add_argument("--dir", default=None, help="where to write it (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--skip-whole", action="store_true", help="skip the baseline (it needs several times the file size in RAM)")
    parser.add_argument("--only", choices=["read", "chunked", "rows", "whole"], action="append", help="measure only these (repeatable)")
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="tuneloop-intake-mem-"))
    path = scratch / "labelled.jsonl"
    started = time.perf_counter()
    rows = write_file(path, args.mb) if not (args.keep and path.exists()) else sum(1 for _ in open(path, "rb"))
    size_mb = path.stat().st_size / 1024 / 1024
    print(f"file: {size_mb:.0f} MB, {rows:,} rows, written in {time.perf_counter() - started:.0f} s")
    results = {}
    modes = {"read only": "read", "chunked, all checks": "chunked", "in memory, row checks": "rows"}
    if not args.skip_whole:
        modes["in memory, all checks"] = "whole"
    if args.only:
        modes = {name: mode for name, mode in {**modes, "in memory, all checks": "whole"}.items() if mode in args.only}
    for name, mode in modes.items():
        results[name] = r = measure(mode, path)
        print(f"{name:>24}: peak RSS {r['peak_rss_mb']:7.0f} MB ({r['peak_rss_mb'] / size_mb:.2f} x the file), "
              f"{r['lines']:,} lines, {r['accepted']:,} accepted, in {r['seconds']:.0f} s", flush=True)
    chunked = results.get("chunked, all checks", {}).get("peak_rss_mb")
    for name in ("in memory, row checks", "in memory, all checks"):
        if chunked and name in results:
            print(f"chunked / {name} peak RSS: {chunked / results[name]['peak_rss_mb']:.2f}x")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
