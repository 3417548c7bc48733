"""Throughput of the full intake validation (row checks + intake checks + GX suite) on N rows.

    .venv/bin/python bench/validate_throughput.py --rows 1000000

Rows are generated deterministically and fast: a pool of ``tuneloop.demo.invoices`` invoices is cut into
line blocks, and every row's document joins blocks of three different pool invoices, so rows are
distinct (not near-duplicates of each other) yet look like the real data. 1% of the rows are bad
in known ways (not JSON, duplicate id, near-duplicate, e-mail, card number, too long, label
disagreement). The baseline is a naive pure-Python pass (json.loads, required fields, the PII
regexes, exact-duplicate prompts) over the same lines; the ratio says what the full validation
costs on top. Timing only: not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from tuneloop.config import load_settings  # noqa: E402
from tuneloop.demo import invoice_task as task  # noqa: E402
from tuneloop.demo.invoices import make_labelled_record  # noqa: E402
from tuneloop.tasks import TaskSpec  # noqa: E402

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POOL = 4000


def generate(rows: int, seed: int = 0) -> list[bytes]:
    """``rows`` JSONL lines, the same for the same arguments."""
    rng = random.Random(seed)
    pool = [make_labelled_record(random.Random(f"{seed}-{i}"), ("original", "drifted")[i % 2], f"p{i}", NOW) for i in range(POOL)]
    blocks = []
    for record in pool:
        lines = record["prompt"].removeprefix(task.make_prompt("")).splitlines()
        blocks.append(["\n".join(lines[j : j + 3]) for j in range(0, len(lines), 3)])
    completions = [record["completion"] for record in pool]
    out: list[bytes] = []
    for i in range(rows):
        picks = rng.sample(range(POOL), 3)
        document = "\n".join(rng.choice(blocks[p]) for p in picks) + f"\nRef {i:07d}"
        row = {"id": f"b{i:07d}", "prompt": task.make_prompt(document), "completion": completions[picks[0]], "domain": "original", "labelled_at": "2026-01-02T10:00:00Z"}
        kind = i % 100
        if kind == 13:
            out.append(json.dumps(row).encode()[:40])  # not JSON
            continue
        if kind == 27 and i > 100:
            row["id"] = f"b{i - 1:07d}"  # duplicate id
        elif kind == 41 and i > 100:
            previous = json.loads(out[i - 1])
            row["prompt"] = previous["prompt"].replace("Ref", "Reference")  # near-duplicate
        elif kind == 55:
            row["prompt"] += "\nQuestions: billing.desk@example.com"
        elif kind == 69:
            row["prompt"] += "\nPaid by card 4539 1488 0343 6467"
        elif kind == 83:
            row["prompt"] += "\n" + " ".join(f"item{j} 19.99" for j in range(150))  # too many tokens
        elif kind == 97:
            row["labels"] = [row["completion"], row["completion"].replace('"currency":"', '"currency":"X', 1)]
        out.append(json.dumps(row, ensure_ascii=False).encode())
    return out


# e-mail and phone only: the old card regex (r"\b(?:\d[ -]?){13,16}\b") backtracks badly on
# digit-heavy invoices (~1 ms a row here), which would make any ratio flatter the full validation.
_PII = [re.compile(p) for p in (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", r"\+\d{1,3}[ -]?\(?\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}")]


def naive_baseline(lines: list[bytes]) -> tuple[int, int]:
    """What a 20-line validator does: parse, required fields, e-mail/phone regexes, exact duplicate prompts."""
    seen: set[str] = set()
    accepted = rejected = 0
    for raw in lines:
        try:
            record = json.loads(raw)
        except ValueError:
            rejected += 1
            continue
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not isinstance(record.get("completion"), str) or prompt in seen or any(p.search(prompt) for p in _PII):
            rejected += 1
            continue
        seen.add(prompt)
        accepted += 1
    return accepted, rejected


def full_validation(lines: list[bytes], model_dir: Path | None) -> dict[str, object]:
    from tuneloop.intake.checks import IntakeOptions, run_intake_checks
    from tuneloop.intake.expectations import run_quality_gate
    from tuneloop.intake.rows import check_lines

    settings = load_settings(str(Path(__file__).resolve().parents[1] / "examples/invoices/tuneloop.yaml"))
    spec = TaskSpec(settings.task)
    stages: dict[str, float] = {}
    clock = time.perf_counter()
    batch = check_lines((("bench.jsonl", n, raw) for n, raw in enumerate(lines, 1)), spec, progress=_say, expected=len(lines))
    stages["row_checks"] = time.perf_counter() - clock
    clock = time.perf_counter()
    intake = run_intake_checks(batch, IntakeOptions(max_tokens=384, model_dir=model_dir), spec, progress=_say)
    stages["intake_checks"] = time.perf_counter() - clock
    clock = time.perf_counter()
    quality = run_quality_gate(
        batch, max_quarantine_rate=0.2, min_accepted_rows=1, spec=spec, expectations_file=settings.data.expectations, intake=intake, progress=_say
    )
    stages["gx_suite"] = time.perf_counter() - clock
    assert quality.accepted + quality.quarantined == len(lines)
    return {
        "stages": stages,
        "intake_seconds": intake.summary()["seconds"],
        "reasons": quality.reasons,
        "accepted": quality.accepted,
        "near_duplicates": near_duplicate_recall(batch.quarantined, lines),
        "token_method": intake.token_method,
        "chat_template": intake.chat_template,
    }


def chunked_validation(lines: list[bytes], model_dir: Path | None, chunk_rows: int) -> dict[str, object]:
    """The path ``tuneloop pull``/``validate`` and the DAG take: every check in chunks, spilled to disk."""
    import tempfile
    from types import SimpleNamespace

    from tuneloop.intake.checks import IntakeOptions
    from tuneloop.intake.expectations import QualitySuite
    from tuneloop.intake.stream import run_intake

    settings = load_settings(str(Path(__file__).resolve().parents[1] / "examples/invoices/tuneloop.yaml"))
    spec = TaskSpec(settings.task)
    suite = QualitySuite(spec=spec, expectations_file=settings.data.expectations, intake_ran=True)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-") as spill:
        run = run_intake(
            (("bench.jsonl", n, raw) for n, raw in enumerate(lines, 1)), spec, Path(spill),
            options=IntakeOptions(max_tokens=384, model_dir=model_dir), quality=suite, chunk_rows=chunk_rows, progress=_say,
        )
        quality = suite.report(total=run.total, accepted=run.accepted, reasons=run.reasons, max_quarantine_rate=0.2, min_accepted_rows=1, intake=run.intake)
        quarantined = [SimpleNamespace(line=q["line"], reasons=q["reasons"], matched_id=q.get("matched_id")) for q in run.iter_quarantined()]
    assert quality.accepted + quality.quarantined == len(lines)
    return {"chunks": run.chunks, "reasons": quality.reasons, "accepted": quality.accepted, "near_duplicates": near_duplicate_recall(quarantined, lines)}


def near_duplicate_recall(quarantined: list[Any], lines: list[bytes]) -> dict[str, object]:
    """How many planted near-duplicates (row i copies row i-1's prompt) were quarantined as such,
    how many went first for another reason, and how many near_duplicate rows were not planted."""
    from tuneloop.intake.similarity import jaccard, shingle_set

    planted = {i + 1 for i in range(len(lines)) if i % 100 == 41 and i > 100}  # 1-based line numbers
    by_line = {q.line: q for q in quarantined}
    found = sum(1 for line in planted if line in by_line and "near_duplicate" in by_line[line].reasons and by_line[line].matched_id == f"b{line - 2:07d}")
    other: dict[str, int] = {}
    for line in planted:
        if line in by_line and "near_duplicate" not in by_line[line].reasons:
            key = ",".join(by_line[line].reasons)
            other[key] = other.get(key, 0) + 1
    kept = {"earlier_row_quarantined": 0, "jaccard_below_0.8": 0, "missed_by_lsh": 0}
    for line in sorted(planted - set(by_line)):
        if line - 1 in by_line:
            kept["earlier_row_quarantined"] += 1
        elif jaccard(shingle_set(json.loads(lines[line - 2])["prompt"], 3), shingle_set(json.loads(lines[line - 1])["prompt"], 3)) < 0.8:
            kept["jaccard_below_0.8"] += 1  # a short prompt: "Ref" -> "Reference" alone drops it under the threshold
        else:
            kept["missed_by_lsh"] += 1
    unplanted = sum(1 for q in quarantined if "near_duplicate" in q.reasons and q.line not in planted)
    return {"planted": len(planted), "found": found, "quarantined_for_another_reason": other, "kept": kept, "not_planted": unplanted}


def _say(message: str) -> None:
    print(f"  [validate] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=".tuneloop/models/demo-base", help="tokenizer/chat template dir ('' for none)")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="data.chunk_rows of the chunked run (default 50,000)")
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations  # noqa: F401 - import cost (~4 s) is not validation time

    clock = time.perf_counter()
    lines = generate(args.rows, args.seed)
    print(f"generated {len(lines)} rows ({sum(map(len, lines)) / 1e6:.0f} MB) in {time.perf_counter() - clock:.1f} s", flush=True)
    clock = time.perf_counter()
    naive_baseline(lines)
    baseline = time.perf_counter() - clock
    print(f"baseline (naive pure-Python pass): {baseline:.1f} s, {len(lines) / baseline:,.0f} rows/s", flush=True)
    model_dir = Path(args.model_dir) if args.model_dir and Path(args.model_dir).is_dir() else None
    clock = time.perf_counter()
    result = full_validation(lines, model_dir)
    elapsed = time.perf_counter() - clock
    print(f"full validation, whole batch in memory: {elapsed:.1f} s, {len(lines) / elapsed:,.0f} rows/s, {elapsed / baseline:.2f}x the baseline's time")
    print(json.dumps(result, indent=1, default=lambda v: round(v, 2) if isinstance(v, float) else str(v)), flush=True)
    clock = time.perf_counter()
    chunked = chunked_validation(lines, model_dir, args.chunk_rows)
    streamed = time.perf_counter() - clock
    print(f"full validation, chunked ({args.chunk_rows:,} rows, spilled; the product's path): {streamed:.1f} s, {len(lines) / streamed:,.0f} rows/s, "
          f"{streamed / elapsed:.2f}x the in-memory time; same outcome: {chunked['reasons'] == result['reasons'] and chunked['accepted'] == result['accepted']}")
    print(json.dumps(chunked, indent=1, default=str))
    print(f"cpu cores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f} (the machine is shared)")


if __name__ == "__main__":
    main()
