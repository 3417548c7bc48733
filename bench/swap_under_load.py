"""Hot-swapping adapters under load: failed requests and latency, with and without swaps.

Starts the REAL vLLM CPU server (``scripts/serve.sh``) on a tiny random Llama with two LoRA
adapters that answer differently (built here, no hub), then runs the same client load twice
in one run:

1. **baseline**: ``--clients`` threads call the stable served name back to back for
   ``--baseline-s`` seconds, no swap;
2. **swaps**: the same load while ``--swaps`` full rollouts run one after another
   (``tuneloop.serving.deploy.deploy_adapter``, alternating v1 and v2: validate, load staging,
   verify on golden prompts, load the stable name in place, verify, the same path the
   refresh DAG takes).

It prints the failed requests of each phase (the goal is 0), p50/p95/p99 latency, the ratio
of the swap phase's p99 to the baseline's, the p99 of the requests that overlapped an
in-place load of the stable name, and which adapter answered (both must appear).

    .venv-ml/bin/python bench/swap_under_load.py                 # 50 swaps, 4 clients
    .venv-ml/bin/python bench/swap_under_load.py --swaps 100 --clients 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the tiny-model builders
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_vllm import MAX_TOKENS, PROMPTS, SERVED  # noqa: E402


@dataclass
class Phase:
    """What the clients saw during one phase."""

    name: str
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds) of each success
    mixed: list[tuple[float, float]] = field(default_factory=list)  # the same for answers neither adapter gives
    failures: list[str] = field(default_factory=list)
    answered_by: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def percentile(self, q: float, only: list[float] | None = None) -> float:
        values = sorted(only if only is not None else [s for _, s in self.latencies])
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]

    def summary(self) -> dict[str, Any]:
        ms = [s * 1000 for _, s in self.latencies]
        return {
            "requests": len(ms) + len(self.failures),
            "failed": len(self.failures),
            "failures": self.failures[:5],
            "requests_per_s": round(len(ms) / self.seconds, 1) if self.seconds else None,
            "p50_ms": round(self.percentile(0.50, ms), 1),
            "p95_ms": round(self.percentile(0.95, ms), 1),
            "p99_ms": round(self.percentile(0.99, ms), 1),
            "max_ms": round(max(ms), 1) if ms else None,
            "answered_by": dict(self.answered_by),
        }


def run_clients(url: str, n_clients: int, phase: Phase, answers: dict[str, list[str]], stop: threading.Event) -> list[threading.Thread]:
    from tuneloop.serving.vllm_client import VllmClient

    lock = threading.Lock()

    def loop(index: int) -> None:
        p = index % len(PROMPTS)
        with VllmClient(url, timeout_s=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    answer = client.chat(SERVED, PROMPTS[p], max_tokens=MAX_TOKENS)
                except Exception as err:  # every failure counts, whatever its kind
                    with lock:
                        phase.failures.append(f"{type(err).__name__}: {err}")
                    continue
                took = time.perf_counter() - started
                kind = next((name for name, said in answers.items() if said[p] == answer), "mixed")
                with lock:
                    phase.latencies.append((started, took))
                    phase.answered_by[kind] += 1
                    if kind == "mixed":
                        phase.mixed.append((started, took))

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n_clients)]
    for thread in threads:
        thread.start()
    return threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=50, help="full verified rollouts in the swap phase (default 50)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--baseline-s", type=float, default=30.0, help="seconds of load without swaps (default 30)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()

    from fixtures_vllm import (
        build_lora_adapter,
        build_tiny_llama,
        free_port,
        golden_of,
        serve_sh,
        staged_answers,
    )

    from tuneloop.serving.deploy import deploy_adapter

    root = Path(tempfile.mkdtemp(prefix="tuneloop-swap-bench-"))
    print(f"[bench] building a tiny Llama and two LoRA adapters in {root}", flush=True)
    base = build_tiny_llama(root / "base")
    adapters = {name: build_lora_adapter(base, root / "adapters" / name, seed=seed) for name, seed in (("v1", 1), ("v2", 2))}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_dir = root / "run"
    started = time.monotonic()
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    print(f"[bench] vLLM CPU server up on {url} in {time.monotonic() - started:.0f} s", flush=True)
    try:
        answers = staged_answers(url, adapters)
        del answers["base"]  # clients classify answers as v1, v2 or mixed
        golden = {name: golden_of(said) for name, said in answers.items()}

        stable_loaded: list[float] = []  # when each in-place load of the stable name returned

        def note(message: str) -> None:
            if " load_stable ok " in message:
                stable_loaded.append(time.perf_counter())

        def rollout(name: str, previous: str | None) -> Any:
            return deploy_adapter(
                [url],
                adapters[name],
                served_name=SERVED,
                golden=golden[name],
                previous_adapter_dir=adapters[previous] if previous else None,
                max_lora_rank=16,
                base_model=base,
                verify_min_agreement=1.0,
                max_tokens=MAX_TOKENS,
                timeout_s=120,
                progress=note,
            )

        rollout("v1", None)

        baseline = Phase("baseline")
        stop = threading.Event()
        print(f"[bench] baseline: {args.clients} clients, {args.baseline_s:.0f} s, no swaps", flush=True)
        t0 = time.perf_counter()
        threads = run_clients(url, args.clients, baseline, answers, stop)
        time.sleep(args.baseline_s)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        baseline.seconds = time.perf_counter() - t0

        swaps = Phase("swaps")
        stop = threading.Event()
        windows: list[tuple[float, float]] = []  # (start, end) of each in-place load of the stable name
        deploy_seconds: list[float] = []
        deploy_errors: list[str] = []
        print(f"[bench] swaps: {args.clients} clients while {args.swaps} verified rollouts run", flush=True)
        t0 = time.perf_counter()
        threads = run_clients(url, args.clients, swaps, answers, stop)
        time.sleep(1.0)
        current = "v1"
        for i in range(args.swaps):
            target = "v2" if current == "v1" else "v1"
            try:
                report = rollout(target, current)
            except Exception as err:
                deploy_errors.append(f"{type(err).__name__}: {err}")
                continue
            current = target
            deploy_seconds.append(report.seconds)
            swap = report.endpoints[0].swap_seconds or 0.0
            windows.append((stable_loaded[-1] - swap, stable_loaded[-1]))
            if (i + 1) % 10 == 0:
                print(f"[bench]   {i + 1}/{args.swaps} rollouts, {len(swaps.failures)} failed requests so far", flush=True)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        swaps.seconds = time.perf_counter() - t0
    finally:
        serve_sh("stop", "--run-dir", str(run_dir))

    def overlaps(start: float, took: float) -> bool:
        return any(start < w_end and start + took > w_start for w_start, w_end in windows)

    overlapping = [s * 1000 for start, s in swaps.latencies if overlaps(start, s)]
    mixed_in_window = sum(overlaps(start, took) for start, took in swaps.mixed)
    b, w = baseline.summary(), swaps.summary()
    results = {
        "clients": args.clients,
        "swaps_requested": args.swaps,
        "swaps_done": len(deploy_seconds),
        "deploy_errors": deploy_errors[:5],
        "rollout_seconds_median": round(statistics.median(deploy_seconds), 3) if deploy_seconds else None,
        "baseline": b,
        "swaps": w,
        "overlapping_stable_load": {"requests": len(overlapping), "p99_ms": round(swaps.percentile(0.99, overlapping), 1)},
        "mixed_answers": {"total": len(swaps.mixed), "overlapping_stable_load": mixed_in_window},
        "p99_ratio_swaps_vs_baseline": round(w["p99_ms"] / b["p99_ms"], 2) if b["p99_ms"] else None,
        "p50_ratio_swaps_vs_baseline": round(w["p50_ms"] / b["p50_ms"], 2) if b["p50_ms"] else None,
    }
    print()
    print(f"{'phase':<10} {'requests':>9} {'failed':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}  answered by")
    for name, s in (("baseline", b), ("swaps", w)):
        print(f"{name:<10} {s['requests']:>9} {s['failed']:>7} {s['requests_per_s']:>7} {s['p50_ms']:>8} {s['p95_ms']:>8} {s['p99_ms']:>8} {s['max_ms']:>8}  {s['answered_by']}")
    print(
        f"\n{len(deploy_seconds)} verified rollouts (median {results['rollout_seconds_median']} s each), "
        f"{len(deploy_errors)} rollout errors; failed requests: {b['failed']} without swaps, {w['failed']} with"
    )
    print(
        f"p99 with swaps / without: {results['p99_ratio_swaps_vs_baseline']}x  "
        f"(p50 {results['p50_ratio_swaps_vs_baseline']}x); requests overlapping an in-place load of the "
        f"stable name: {len(overlapping)}, p99 {results['overlapping_stable_load']['p99_ms']} ms"
    )
    if swaps.mixed:
        print(
            f"{len(swaps.mixed)} answers match neither adapter's: requests in flight while the stable name was "
            f"loaded in place, finished on the new weights ({mixed_in_window} of them overlapped an in-place load)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = w["failed"] == 0 and b["failed"] == 0 and not deploy_errors and len(w["answered_by"]) >= 2
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
