"""Rolling adapters out under load: failed requests, hybrid answers and latency per strategy.

Starts the REAL vLLM CPU server (``scripts/serve.sh``) on a tiny random Llama with two LoRA
adapters that answer differently (A and B, built here, no hub) and the REAL nginx gateway
(:mod:`tuneloop.serving.gateway`), then runs the same client load through these phases in one
run, so every figure is compared with a baseline measured minutes apart on the same machine:

1. ``baseline``: ``--clients`` threads call the stable name on vLLM directly, no rollout;
2. ``baseline-gw``: the same load through the gateway (alias -> one version name): the
   gateway's own overhead (the two baselines run in alternating thirds of ``--baseline-s``);
3. ``inplace``: direct, while ``--rollouts`` verified in-place rollouts run
   (:func:`tuneloop.serving.deploy.deploy_adapter`, alternating A and B);
4. ``switch``: through the gateway, while ``--rollouts`` rollouts load each new version under
   its own name, verify it, flip the alias and retire the old one
   (:func:`tuneloop.serving.rollout.rollout_version`);
5. ``canary``: the same with weights 10 -> 50 -> 100, each step baked on the gateway's log
   (errors, p99, validity of sampled answers).

Every answer is checked against the reference answer of the adapter that served it: in the
gateway phases the version named in the response's ``model`` field; in the direct phases,
whichever adapter's answer it equals ("hybrid" if neither: a request that began on one
adapter's weights and finished on the other's).

    .venv-ml/bin/python bench/swap_under_load.py                     # 50 rollouts each, 4 clients
    .venv-ml/bin/python bench/swap_under_load.py --rollouts 10 --strategies switch --json out.json
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
from collections.abc import Callable
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
    latencies: list[float] = field(default_factory=list)  # seconds of each success
    failures: list[str] = field(default_factory=list)
    answered_by: Counter[str] = field(default_factory=Counter)  # adapter (A/B) or "hybrid"
    wrong: list[str] = field(default_factory=list)  # answers that are not the serving version's reference
    rollouts: list[float] = field(default_factory=list)
    rollout_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] * 1000

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies) + len(self.failures),
            "failed": len(self.failures),
            "failures": self.failures[:5],
            "wrong_for_version": len(self.wrong),
            "wrong_examples": self.wrong[:3],
            "requests_per_s": round(len(self.latencies) / self.seconds, 1) if self.seconds else None,
            "p50_ms": round(self.percentile(0.50), 1),
            "p95_ms": round(self.percentile(0.95), 1),
            "p99_ms": round(self.percentile(0.99), 1),
            "answered_by": dict(self.answered_by),
            "rollouts": len(self.rollouts),
            "rollout_errors": self.rollout_errors[:5],
            "rollout_seconds_median": round(statistics.median(self.rollouts), 3) if self.rollouts else None,
        }


def run_clients(
    url: str,
    model: str,
    n_clients: int,
    phase: Phase,
    answers: dict[str, list[str]],
    adapter_of: Callable[[str], str | None],
    stop: threading.Event,
) -> list[threading.Thread]:
    """``n_clients`` threads asking ``model`` back to back until ``stop``. ``adapter_of(name)``
    gives the adapter (A/B) a version name serves, None for the stable name of a direct phase."""
    import httpx

    lock = threading.Lock()

    def loop(index: int) -> None:
        p = index % len(PROMPTS)
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[p]}], "max_tokens": MAX_TOKENS, "temperature": 0.0}
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.post(url + "/v1/chat/completions", json=body)
                    response.raise_for_status()
                    reply = response.json()
                    answer = reply["choices"][0]["message"]["content"] or ""
                except Exception as err:  # every failure counts, whatever its kind
                    with lock:
                        phase.failures.append(f"{type(err).__name__}: {str(err)[:200]}")
                    continue
                took = time.perf_counter() - started
                served = str(reply.get("model"))
                adapter = adapter_of(served)
                matches = next((name for name, said in answers.items() if said[p] == answer), "hybrid")
                with lock:
                    phase.latencies.append(took)
                    phase.answered_by[matches] += 1
                    if adapter is not None and answers[adapter][p] != answer:
                        phase.wrong.append(f"{served} ({adapter}) answered {answer!r}, its reference is {answers[adapter][p]!r}")
                    elif adapter is None and matches == "hybrid":
                        phase.wrong.append(f"{served} answered {answer!r}: neither adapter's answer")

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n_clients)]
    for thread in threads:
        thread.start()
    return threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=50, help="verified rollouts per strategy (default 50)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--baseline-s", type=float, default=30.0, help="seconds of each baseline phase (default 30)")
    parser.add_argument("--strategies", default="inplace,switch,canary", help="comma-separated, in order (default inplace,switch,canary)")
    parser.add_argument("--bake-s", type=float, default=1.0, help="canary: seconds baked per step (default 1)")
    parser.add_argument("--grace-s", type=float, default=0.5, help="switch/canary: seconds before the old version is unloaded (default 0.5)")
    parser.add_argument("--pause-s", type=float, default=0.0, help="seconds between rollouts (default 0: back to back, a stress test; real rollouts are weeks apart)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]

    from fixtures_vllm import (
        build_lora_adapter,
        build_tiny_llama,
        free_port,
        golden_of,
        serve_sh,
        staged_answers,
    )

    from tuneloop.serving.deploy import deploy_adapter
    from tuneloop.serving.gateway import NginxGateway, version_name
    from tuneloop.serving.rollout import RolloutPolicy, rollout_version
    from tuneloop.serving.vllm_client import VllmClient

    root = Path(tempfile.mkdtemp(prefix="tuneloop-swap-bench-"))
    print(f"[bench] building a tiny Llama and two LoRA adapters in {root}", flush=True)
    base = build_tiny_llama(root / "base")
    adapters = {name: build_lora_adapter(base, root / "adapters" / name, seed=seed) for name, seed in (("A", 1), ("B", 2))}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_dir = root / "run"
    started = time.monotonic()
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    print(f"[bench] vLLM CPU server up on {url} in {time.monotonic() - started:.0f} s", flush=True)
    gateway = NginxGateway(root / "gateway", port=free_port())
    phases: list[Phase] = []
    version_adapter: dict[str, str] = {}  # version name -> A/B
    try:
        gateway.start()
        gateway.routes.set_upstreams([url])
        print(f"[bench] nginx gateway up on {gateway.url}", flush=True)
        answers = staged_answers(url, adapters)
        del answers["base"]
        golden = {name: golden_of(said) for name, said in answers.items()}
        valid_answers = {a for said in answers.values() for a in said}

        def inplace(adapter: str, previous: str | None) -> float:
            return deploy_adapter(
                [url], adapters[adapter], served_name=SERVED, golden=golden[adapter],
                previous_adapter_dir=adapters[previous] if previous else None, max_lora_rank=16, base_model=base,
                verify_min_agreement=1.0, max_tokens=MAX_TOKENS, timeout_s=120, progress=lambda _m: None,
            ).seconds

        counter = [0]

        def versioned(adapter: str, policy: RolloutPolicy) -> float:
            counter[0] += 1
            version = f"v{counter[0]}"
            version_adapter[version_name(SERVED, version)] = adapter
            return rollout_version(
                [url], adapters[adapter], routes=gateway.routes, access_log=gateway.access_log, served_name=SERVED,
                version=version, golden=golden[adapter], policy=policy, max_lora_rank=16, max_loras=2, base_model=base,
                validity=lambda answer: answer in valid_answers, verify_min_agreement=1.0, max_tokens=MAX_TOKENS,
                timeout_s=120, progress=lambda _m: None,
            ).seconds

        def phase(
            name: str, target: str, model: str, rollout: Callable[[str], float] | None, adapter_of: Callable[[str], str | None], seconds: float = 0.0
        ) -> None:
            current = phase_state["adapter"]
            record = next((p for p in phases if p.name == name), None) or Phase(name)
            stop = threading.Event()
            print(f"[bench] {name}: {args.clients} clients " + (f"while {args.rollouts} rollouts run" if rollout else f"for {seconds:.0f} s"), flush=True)
            t0 = time.perf_counter()
            threads = run_clients(target, model, args.clients, record, answers, adapter_of, stop)
            if rollout is None:
                time.sleep(seconds)
            else:
                time.sleep(1.0)
                for i in range(args.rollouts):
                    nxt = "B" if current == "A" else "A"
                    try:
                        record.rollouts.append(rollout(nxt))
                        current = nxt
                    except Exception as err:
                        record.rollout_errors.append(f"{type(err).__name__}: {err}")
                    time.sleep(args.pause_s)
                    if (i + 1) % 10 == 0:
                        print(f"[bench]   {i + 1}/{args.rollouts} rollouts, {len(record.failures)} failed requests, {len(record.wrong)} wrong answers so far", flush=True)
                time.sleep(1.0)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            record.seconds += time.perf_counter() - t0
            phase_state["adapter"] = current
            if record not in phases:
                phases.append(record)

        phase_state = {"adapter": "A"}
        inplace("A", None)
        warm = Phase("warm-up")  # not reported: the first seconds of load are slower on either path
        stop_warm = threading.Event()
        for _thread in run_clients(url, SERVED, args.clients, warm, answers, lambda _s: None, stop_warm):
            time.sleep(min(5.0, args.baseline_s) / args.clients)
        stop_warm.set()
        switch = RolloutPolicy(strategy="switch", bake_s=0, grace_s=args.grace_s)
        canary = RolloutPolicy(strategy="canary", steps=(10, 50, 100), bake_s=args.bake_s, poll_s=min(0.5, args.bake_s), grace_s=args.grace_s, min_requests=5)
        versioned("A", switch)
        for _ in range(3):  # the two baselines in alternating thirds: neither gains from going first
            phase("baseline", url, SERVED, None, lambda _served: None, args.baseline_s / 3)
            phase("baseline-gw", gateway.url, SERVED, None, version_adapter.get, args.baseline_s / 3)
        for strategy in strategies:
            if strategy == "inplace":
                phase_state["adapter"] = "A"
                inplace("A", None)

                def run_inplace(adapter: str) -> float:
                    return inplace(adapter, "B" if adapter == "A" else "A")

                phase("inplace", url, SERVED, run_inplace, lambda _served: None)
            else:
                policy = switch if strategy == "switch" else canary
                phase(strategy, gateway.url, SERVED, lambda adapter, policy=policy: versioned(adapter, policy), version_adapter.get)
        with VllmClient(url) as client:
            loaded = sorted(client.adapters())
    finally:
        gateway.stop()
        serve_sh("stop", "--run-dir", str(run_dir))

    summaries = {p.name: p.summary() for p in phases}
    base_p99 = summaries["baseline"]["p99_ms"]
    gw_p99 = summaries["baseline-gw"]["p99_ms"]
    results: dict[str, Any] = {
        "clients": args.clients,
        "rollouts_per_strategy": args.rollouts,
        "pause_s": args.pause_s,
        "phases": summaries,
        "gateway_overhead": {
            "p50_ratio": round(summaries["baseline-gw"]["p50_ms"] / summaries["baseline"]["p50_ms"], 2),
            "p99_ratio": round(gw_p99 / base_p99, 2),
        },
        "p99_ratio_vs_own_baseline": {
            p.name: round(summaries[p.name]["p99_ms"] / (gw_p99 if p.name in ("switch", "canary") else base_p99), 2)
            for p in phases
            if p.rollouts or p.rollout_errors
        },
        "adapters_loaded_at_end": loaded,
    }
    print()
    print(f"{'phase':<12} {'requests':>9} {'failed':>7} {'wrong':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'rollouts':>9} {'median s':>9}  answered by")
    for name, s in summaries.items():
        print(
            f"{name:<12} {s['requests']:>9} {s['failed']:>7} {s['wrong_for_version']:>6} {s['requests_per_s']:>7} {s['p50_ms']:>8} "
            f"{s['p95_ms']:>8} {s['p99_ms']:>8} {s['rollouts']:>9} {s['rollout_seconds_median'] or '-':>9}  {s['answered_by']}"
        )
    print(
        f"\ngateway overhead (baseline-gw / baseline): p50 {results['gateway_overhead']['p50_ratio']}x, p99 {results['gateway_overhead']['p99_ratio']}x"
    )
    print("p99 during rollouts / the baseline of the same path (direct for inplace, gateway for switch and canary): "
          + ", ".join(f"{k} {v}x" for k, v in results["p99_ratio_vs_own_baseline"].items()))
    for name, s in summaries.items():
        for example in s["wrong_examples"]:
            print(f"  {name}: {example}")
        for error in s["rollout_errors"]:
            print(f"  {name} rollout error: {error}")
    print(f"adapters loaded at the end: {loaded}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = all(s["failed"] == 0 and not s["rollout_errors"] for s in summaries.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
