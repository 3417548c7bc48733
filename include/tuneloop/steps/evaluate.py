"""The evaluate step: candidate and production (or the bare base model) scored on the same
held-out rows, in the ML environment, with the eval suites."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from tuneloop.steps.loop import Loop

HELDOUT_PREFIX = layout.HELDOUT


def eval_sources(loop: Loop, snapshot: str) -> list[str]:
    """The held-out data both models are scored on: the snapshot's eval split + golden sets."""
    sources = [layout.snapshot_file(snapshot, "eval")]
    sources += [k for k in loop.store.list(f"{HELDOUT_PREFIX}/") if k.endswith(".jsonl")]
    return sources


def evaluate_step(loop: Loop, train: dict[str, Any]) -> dict[str, Any]:
    """Score candidate and production (or the bare base model) on the same held-out rows."""
    version, snapshot = train["version"], train["snapshot"]
    production = loop.registry.aliases().get("production")
    sources = eval_sources(loop, snapshot)
    results: dict[str, Any] = {}
    # Production first, so the candidate's golden block counts its regressions against it.
    for role, adapter in (("production_eval", production or "none"), ("candidate_eval", version)):
        prefix = layout.evaluation(version, loop.run_key, role.removesuffix("_eval"))
        loop.progress(f"evaluating {role} ({adapter}) on {', '.join(sources)}")
        compare = ["--compare", results["production_eval"]["scores_key"]] if role == "candidate_eval" else []
        summary = loop.run_ml(["evaluate", "--adapter", adapter, "--eval", *sources, "--upload", prefix, *compare])
        results[role] = {
            "adapter": adapter,
            "scores_key": f"{prefix}/scores.jsonl",
            "summary_key": f"{prefix}/summary.json",
            "slices": summary.get("slices", {}),
            "suites": {name: summary.get(name) for name in ("injection", "consistency", "golden", "latency")},
            "backend": summary.get("backend"),
        }
    evaluation = {"version": version, "snapshot": snapshot, "production": production, **results}
    loop.store.put_json(f"{layout.evaluations(version)}{loop.run_key}/evaluation.json", evaluation)  # what `tuneloop gate --version` reads
    return evaluation


def latest_evaluation(loop: Loop, version: str) -> dict[str, Any]:
    """The newest evaluation of ``version`` as a candidate (what :func:`evaluate_step` returned)."""
    keys = [k for k in loop.store.list(layout.evaluations(version)) if k.endswith("/evaluation.json")]
    if not keys:
        raise RuntimeError(f"no evaluation of {version} in {loop.store.uri}/evals/{version}/: the refresh's evaluate step writes one")
    return dict(loop.store.get_json(sorted(keys)[-1]))
