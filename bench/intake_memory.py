"""Peak memory of reading a large labelled file into intake, streamed vs read whole.

    .venv/bin/python bench/intake_memory.py --mb 256            # writes a 256 MB JSONL file in a temp dir
    .venv/bin/python bench/intake_memory.py --mb 2048 --keep    # the 2 GB case (needs ~2 GB of disk)

Each measurement runs in a fresh interpreter and reports its peak RSS (``ru_maxrss``):

- ``whole``: the old read path, ``split_lines(path.read_bytes())`` then the row checks (the
  baseline);
- ``streamed``: ``LocalStore.open_read`` + ``iter_lines`` (1 MiB chunks) then the row checks,
  as ``tuneloop pull`` and ``tuneloop validate`` read now;
- ``streamed, rows dropped``: the same, keeping no accepted row: what the read itself costs.

The row checks keep every accepted record (the intake checks and the snapshot need them all),
so ``streamed`` still grows with the accepted rows; the ratio to ``whole`` is what streaming
the read saves. Memory only: not a pass/fail test.
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
import json, resource, sys, time
from pathlib import Path
from tuneloop.config import TaskSettings
from tuneloop.intake.rows import check_line, check_lines, iter_lines, split_lines
from tuneloop.storage import LocalStore
from tuneloop.tasks import TaskSpec

mode, path = sys.argv[1], Path(sys.argv[2])
spec = TaskSpec(TaskSettings(format="prompt_completion"))
started = time.perf_counter()
if mode == "whole":
    lines = ((path.name, n, raw) for n, raw in enumerate(split_lines(path.read_bytes()), 1))
    batch = check_lines(lines, spec)
    total, accepted = batch.total, len(batch.accepted)
else:
    store = LocalStore(path.parent)
    with store.open_read(path.name) as handle:
        lines = ((path.name, n, raw) for n, raw in enumerate(iter_lines(handle), 1))
        if mode == "streamed":
            batch = check_lines(lines, spec)
            total, accepted = batch.total, len(batch.accepted)
        else:
            total = accepted = 0
            for _, _, raw in lines:
                total += 1
                accepted += check_line(raw, spec)[0] is not None
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
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="tuneloop-intake-mem-"))
    path = scratch / "labelled.jsonl"
    started = time.perf_counter()
    rows = write_file(path, args.mb)
    size_mb = path.stat().st_size / 1024 / 1024
    print(f"file: {size_mb:.0f} MB, {rows:,} rows, written in {time.perf_counter() - started:.0f} s")
    results = {}
    for mode in ("streamed, rows dropped", "streamed", *(() if args.skip_whole else ("whole",))):
        results[mode] = measure(mode.split(",")[0] if mode != "streamed, rows dropped" else "drop", path)
        r = results[mode]
        print(f"{mode:>24}: peak RSS {r['peak_rss_mb']:7.0f} MB ({r['peak_rss_mb'] / size_mb:.2f} x the file), {r['lines']:,} lines in {r['seconds']:.0f} s")
    if "whole" in results:
        print(f"streamed / whole peak RSS: {results['streamed']['peak_rss_mb'] / results['whole']['peak_rss_mb']:.2f}x")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
