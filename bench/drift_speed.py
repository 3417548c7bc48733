"""Drift detection on 50k vs 50k texts: tuneloop's default method next to Evidently, same windows.

Part 1, **speed**: windows of ``--speed-n`` (50,000) texts each, timed once per method
after a small warm-up call (imports and first-call set-up are not counted):

* ``demo-world``: 50k US/UK invoice prompts vs 50k of which 20% are DE/FR/NL/ES invoices,
  the shape of the drift monitor's real input (all texts distinct);
* ``real-text``: 50k docstring paragraphs vs 50k others drawn independently; the docstring
  pool holds fewer than 100k texts, so the windows share over half of their texts, which
  makes this a timing on real text only (no verdict is read from it).

Methods, each called as a user would, with its defaults: tuneloop
``detect_drift(reference, current)`` (method "classifier": hashed n-grams, cross-fitted
logistic SGD, p-value, top terms and examples); Evidently's text-column drift, ``Report([
ValueDrift(column="text", method=M)])`` on ``DataDefinition(text_columns=["text"])``, with
both of its domain-classifier methods: ``abs_text_content_drift`` (its default above 1,000
reference rows: drift when the held-out ROC AUC of a TF-IDF + SGD classifier > 0.55) and
``perc_text_content_drift`` (drift when that AUC exceeds the 95th percentile of 1,000
random classifiers' AUCs: a one-split test at 5%). It prints seconds and the ratio
Evidently / tuneloop; the target is tuneloop under 30 s on 2 cores.

Part 2, **false alarms and power** on ``--pairs`` random pairs per setting, n = 2,000 per
window (null: both windows from one pool, disjoint; shift: 20% of the current window from
the other domain), the same windows for all three, drawn as in ``bench/drift_power.py``.

Evidently 0.7.23 fails to import with pandas 3 (which .venv has) and brings ~40 packages of
its own, so it lives in a separate bench environment rather than the Airflow one:

    bash scripts/setup.sh bench                       # builds .venv-bench from requirements/bench.lock
    .venv-bench/bin/python bench/drift_speed.py       # ~10 min on 2 cores
    .venv-bench/bin/python bench/drift_speed.py --pairs 10 --speed-n 10000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")

import drift_corpus  # noqa: E402  (bench/ is on sys.path when a bench script runs)
from drift_power import Outcomes, Setting, print_table, summarise  # noqa: E402

EVIDENTLY_METHODS = {
    "evidently abs (default)": "abs_text_content_drift",
    "evidently perc": "perc_text_content_drift",
}
TUNELOOP = "tuneloop classifier"
SPEED_TARGET_S = 30.0


def tuneloop_drift(
    reference: list[str], current: list[str], alpha: float, seed: int
) -> tuple[bool, float, float, float]:
    """(drift, p-value, AUC, seconds) from tuneloop's default method, all defaults on."""
    from tuneloop.drift import detect_drift

    started = time.perf_counter()
    report = detect_drift(reference, current, alpha=alpha, seed=seed)
    return report.drift, report.p_value, report.statistic, time.perf_counter() - started


def evidently_drift(
    reference: list[str], current: list[str], method: str
) -> tuple[bool, float, float]:
    """(drift, AUC, seconds) from Evidently's ValueDrift on a text column, timed end to end."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas SettingWithCopy noise from Evidently's internals
        definition = DataDefinition(text_columns=["text"])
        ref = Dataset.from_pandas(pd.DataFrame({"text": reference}), data_definition=definition)
        cur = Dataset.from_pandas(pd.DataFrame({"text": current}), data_definition=definition)
        snapshot = Report([ValueDrift(column="text", method=method)], include_tests=True).run(
            cur, ref
        )
        result = snapshot.dict()
    seconds = time.perf_counter() - started
    auc = float(result["metrics"][0]["value"])
    status = str(result["tests"][0]["status"])  # the drift test FAILs when drift is detected
    return status.endswith("FAIL"), auc, seconds


def evidently_version() -> str:
    from importlib.metadata import version

    return version("evidently")


# --- part 1: speed --------------------------------------------------------------------------


def speed_windows(
    corpus: str, n: int, pools: dict[str, list[str]], seed: int
) -> tuple[list[str], list[str], str]:
    """The 50k-vs-50k windows of one corpus and a note on how they were drawn."""
    if corpus == "demo-world":
        drifted = round(0.2 * n)
        originals = drift_corpus.invoice_texts("original", 2 * n - drifted)
        current = originals[n:] + drift_corpus.invoice_texts("drifted", drifted)
        return (
            originals[:n],
            current,
            f"all distinct; current 20% drifted ({drifted} DE/FR/NL/ES invoices)",
        )
    texts = pools["docstrings"]
    rng = np.random.default_rng([seed, 50])
    reference = [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]
    current = [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]
    shared = len(set(reference) & set(current))
    return reference, current, f"both from docstrings, {shared} texts in both windows: timing only"


def run_speed(
    corpora: list[str], n: int, pools: dict[str, list[str]], alpha: float, seed: int
) -> list[dict[str, Any]]:
    rows = []
    for corpus in corpora:
        started = time.perf_counter()
        reference, current, note = speed_windows(corpus, n, pools, seed)
        print(
            f"\n[speed] {corpus}: {len(reference)} vs {len(current)} texts ({note}); "
            f"drawn in {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        drift, p_value, auc, seconds = tuneloop_drift(reference, current, alpha, seed)
        print(
            f"  {TUNELOOP:<24} {seconds:6.1f} s  AUC {auc:.4f}  p={p_value:.3g}  drift={drift}",
            flush=True,
        )
        row: dict[str, Any] = {
            "corpus": corpus,
            "n": len(reference),
            "note": note,
            TUNELOOP: {"seconds": seconds, "auc": auc, "p_value": p_value, "drift": drift},
        }
        for label, method in EVIDENTLY_METHODS.items():
            ev_drift, ev_auc, ev_seconds = evidently_drift(reference, current, method)
            print(
                f"  {label:<24} {ev_seconds:6.1f} s  AUC {ev_auc:.4f}  drift={ev_drift}  "
                f"-> {ev_seconds / seconds:.2f}x tuneloop's time",
                flush=True,
            )
            row[label] = {
                "seconds": ev_seconds,
                "auc": ev_auc,
                "drift": ev_drift,
                "ratio_to_tuneloop": ev_seconds / seconds,
            }
        row["load_average_after"] = os.getloadavg()[0]
        rows.append(row)
    return rows


# --- part 2: false alarms and power ---------------------------------------------------------

_POOLS: dict[str, list[str]] = {}
_RUN: dict[str, Any] = {}


def _accuracy_one(
    task: tuple[Setting, int, int, int],
) -> tuple[Setting, int, dict[str, tuple[float, float, float]]]:
    """One pair through all three methods: {method: (p-value or drift 0/1, AUC, seconds)}."""
    setting, corpus_index, setting_index, k = task
    rng = np.random.default_rng([_RUN["seed"], 7, corpus_index, setting_index, k])
    pair = drift_corpus.draw_pair(
        _POOLS, drift_corpus.CORPORA[setting.corpus], _RUN["n"], setting.fraction, rng
    )
    reference, current = pair.texts(_POOLS)
    out: dict[str, tuple[float, float, float]] = {}
    _, p_value, auc, seconds = tuneloop_drift(reference, current, _RUN["alpha"], k)
    out[TUNELOOP] = (p_value, auc, seconds)
    for label, method in EVIDENTLY_METHODS.items():
        drift, ev_auc, ev_seconds = evidently_drift(reference, current, method)
        # Evidently gives a verdict, not a p-value: record 0 for "drift", 1 for "no drift", so
        # the shared table's "p < alpha" counts its verdicts.
        out[label] = (0.0 if drift else 1.0, ev_auc, ev_seconds)
    return setting, k, out


def run_accuracy(
    settings: list[Setting], pairs: int, jobs: int
) -> dict[str, dict[Setting, Outcomes]]:
    corpora = list(drift_corpus.CORPORA)
    tasks = [
        (s, corpora.index(s.corpus), i, k) for i, s in enumerate(settings) for k in range(pairs)
    ]
    methods = [TUNELOOP, *EVIDENTLY_METHODS]
    collected: dict[Setting, list[tuple[int, dict[str, tuple[float, float, float]]]]] = {
        s: [] for s in settings
    }
    started = time.perf_counter()
    pool = (
        ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))
        if jobs > 1
        else None
    )
    outputs = pool.map(_accuracy_one, tasks, chunksize=2) if pool else map(_accuracy_one, tasks)
    try:
        for done, (setting, k, out) in enumerate(outputs, 1):
            collected[setting].append((k, out))
            finished = collected[setting]
            if len(finished) % max(1, pairs // 5) == 0 or len(finished) == pairs:
                flagged = {m: sum(o[m][0] < _RUN["alpha"] for _, o in finished) for m in methods}
                print(
                    f"  {setting.label:<22} {len(finished):>3}/{pairs} pairs, flagged: "
                    + ", ".join(f"{m} {c}" for m, c in flagged.items())
                    + f"; {time.perf_counter() - started:.0f} s, {done}/{len(tasks)}",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.shutdown()
    results: dict[str, dict[Setting, Outcomes]] = {
        m: {s: Outcomes() for s in settings} for m in methods
    }
    for setting, rows in collected.items():
        for _, out in sorted(rows, key=lambda row: row[0]):
            for method, (p_value, auc, seconds) in out.items():
                results[method][setting].add(p_value, auc, seconds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--speed-n",
        type=int,
        default=50_000,
        help="texts per window in the speed part (0 skips it)",
    )
    parser.add_argument("--speed-corpora", default="demo-world,real-text")
    parser.add_argument(
        "--pairs", type=int, default=50, help="random pairs per setting in part 2 (0 skips it)"
    )
    parser.add_argument("--n", type=int, default=2000, help="texts per window in part 2")
    parser.add_argument("--corpora", default="real-text,demo-world", help="corpora of part 2")
    parser.add_argument(
        "--fraction", type=float, default=0.2, help="drifted share of the current window in part 2"
    )
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes in part 2"
    )
    parser.add_argument("--json-out", help="write the results here too")
    args = parser.parse_args()

    print(
        f"drift speed bench: tuneloop vs Evidently {evidently_version()}; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    corpora = [c for c in args.corpora.split(",") if c]
    speed_corpora = [c for c in args.speed_corpora.split(",") if c] if args.speed_n else []
    names = ["docstrings", "readmes"] if "real-text" in corpora + speed_corpora else []
    names += [
        p for c in corpora if c == "demo-world" for p in ("invoices-original", "invoices-drifted")
    ]
    pools = drift_corpus.load_pools(names)
    for line in drift_corpus.describe(pools):
        print("  " + line)
    _POOLS.update(pools)
    _RUN.update(seed=args.seed, n=args.n, alpha=args.alpha)

    # warm-up: imports and first-call set-up of both libraries, not timed
    sample = drift_corpus.invoice_texts("original", 400)
    tuneloop_drift(sample[:200], sample[200:], args.alpha, 0)
    evidently_drift(sample[:200], sample[200:], EVIDENTLY_METHODS["evidently abs (default)"])

    speed = (
        run_speed(speed_corpora, args.speed_n, pools, args.alpha, args.seed) if args.speed_n else []
    )

    accuracy: dict[str, dict[Setting, Outcomes]] = {}
    settings = [Setting(c, f) for c in corpora for f in (0.0, args.fraction)]
    if args.pairs:
        print(
            f"\n[accuracy] {args.pairs} random pairs per setting, n = {args.n} per window, {args.jobs} job(s)",
            flush=True,
        )
        accuracy = run_accuracy(settings, args.pairs, max(1, args.jobs))
        rows = [(s.label, m, accuracy[m][s]) for s in settings for m in accuracy]
        print_table(
            f"false alarms (null) and power (shift) over {args.pairs} pairs, n = {args.n}",
            rows,
            args.alpha,
        )
        print(
            "  (Evidently gives a verdict, not a p-value: its p<0.01 and p<0.10 columns repeat its verdict;"
            " s/test is per pair with two pairs running at once)"
        )

    if speed:
        print(
            f"\nspeed, {args.speed_n} vs {args.speed_n} texts (one timed call each, after a warm-up):"
        )
        for row in speed:
            ours = row[TUNELOOP]["seconds"]
            target = ""
            if row["n"] >= 50_000:
                verdict = "under" if ours < SPEED_TARGET_S else "OVER"
                target = f" ({verdict} the {SPEED_TARGET_S:.0f} s target)"
            print(
                f"  {row['corpus']:<11} tuneloop {ours:5.1f} s{target}; "
                + "; ".join(
                    f"{label} {row[label]['seconds']:5.1f} s = {row[label]['ratio_to_tuneloop']:.2f}x"
                    for label in EVIDENTLY_METHODS
                )
            )
    if args.json_out:
        payload = {
            "args": vars(args),
            "evidently": evidently_version(),
            "speed": speed,
            "accuracy": {
                m: [{"setting": s.label, **summarise(o, args.alpha)} for s, o in by.items()]
                for m, by in accuracy.items()
            },
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
