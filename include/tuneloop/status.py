"""What the loop did last: drift, intake, training, gate, registry and what vLLM serves now.

``tuneloop status`` prints this; ``make demo`` ends with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from tuneloop.config import Settings
    from tuneloop.storage import Store
    from tuneloop.tasks import Example


def _latest(store: Store, prefix: str) -> dict[str, Any] | None:
    keys = [k for k in store.list(prefix) if k.endswith(".json")]
    return store.get_json(keys[-1]) if keys else None


def collect_status(settings: Settings, store: Store, *, ask_vllm: bool = True) -> dict[str, Any]:
    from tuneloop.intake.pull import latest_snapshot
    from tuneloop.registry import Registry
    from tuneloop.storage import StoreKeyError, read_snapshot_manifest

    registry = Registry(store)
    aliases = registry.aliases()
    status: dict[str, Any] = {"store": store.uri, "aliases": aliases, "versions": [v["version"] for v in registry.versions()]}
    status["drift"] = _latest(store, f"{layout.DRIFT_CHECKS}/")
    snapshot = latest_snapshot(store)
    if snapshot:
        manifest = read_snapshot_manifest(store, layout.SNAPSHOTS, snapshot)
        status["snapshot"] = {"hash": snapshot, **{k: manifest.get(k) for k in ("partitions", "counts", "reasons", "slices")}}
    newest = status["versions"][-1] if status["versions"] else None
    if newest:
        status["newest_version"] = registry.get(newest)
        try:
            status["gate"] = store.get_json(layout.gate_decision(newest))
            status["gate_report"] = f"{store.uri}/reports/{newest}/gate.md"
        except StoreKeyError:
            status["gate"] = None
    if ask_vllm:
        status["served"] = _ask_vllm(settings, store, status["drift"])
    return status


def _ask_vllm(settings: Settings, store: Store, status_drift: dict[str, Any] | None = None) -> dict[str, Any]:
    from tuneloop.serving.vllm_client import VllmClient, VllmError

    endpoint = settings.vllm.endpoints[0]
    api_key = settings.vllm.key
    client = VllmClient(endpoint, api_key=api_key, timeout_s=settings.vllm.timeout_s)
    name = settings.model.served_model_name
    try:
        models = {m["id"]: m for m in client.models()}
    except VllmError as err:
        return {"endpoint": endpoint, "error": str(err)}
    root = models.get(name, {}).get("root")
    served_version = Path(root).name if root else None
    result: dict[str, Any] = {"endpoint": endpoint, "name": name, "root": root, "version": served_version}
    example = _held_out_example(settings, store, (status_drift or {}).get("drift_slices") or [])
    if example is not None and root:
        result["slice"] = example.slice
        result["prompt"] = example.input_text
        result["expected"] = example.target
        result["answer"] = client.chat(name, example.context, max_tokens=settings.eval.max_new_tokens)
    return result


def _held_out_example(settings: Settings, store: Store, prefer: list[str]) -> Example | None:
    """The first row of a held-out set, from a slice where drift was found when there is one."""
    from tuneloop.tasks import TaskRowError, TaskSpec

    spec = TaskSpec(settings.task)
    keys = sorted(k for k in store.list("heldout/") if k.endswith(".jsonl"))
    keys.sort(key=lambda k: Path(k).stem not in prefer)
    for key in keys:
        for record in store.iter_jsonl(key):
            try:
                return spec.example(record)
            except TaskRowError:
                continue
    return None


def format_status(status: dict[str, Any]) -> str:
    lines = [f"tuneloop status ({status['store']})"]
    drift = status.get("drift")
    if drift:
        lines.append(
            f"  drift     as of {drift['as_of']}: AUC {drift['statistic']:.3f}, p={drift['p_value']:.3g}, "
            f"drift={drift['drift']} -> {drift['decision']}"
        )
        terms = [t["term"] for t in (drift.get("report") or {}).get("top_terms", []) if t.get("direction") == "current"][:6]
        if terms:
            lines.append(f"            terms of the new traffic: {', '.join(terms)}")
    snap = status.get("snapshot")
    if snap:
        counts = snap["counts"]
        lines.append(
            f"  intake    snapshot {snap['hash'][:12]} ({snap['partitions'][0]} .. {snap['partitions'][-1]}): "
            f"{counts['accepted']} accepted, {counts['quarantined']} quarantined of {counts['total']}"
        )
        for reason, count in sorted((snap.get("reasons") or {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"            {count:>4}  {reason}")
    newest = status.get("newest_version")
    if newest:
        train = (newest.get("metrics") or {}).get("train") or {}
        if train:
            lines.append(
                f"  training  {newest['version']}: loss {train.get('first_loss') or float('nan'):.3f} -> {train.get('final_loss') or float('nan'):.3f} "
                f"in {train.get('steps')} steps, {train.get('seconds') or 0:.0f}s on {train.get('device')}"
            )
    gate = status.get("gate")
    if gate:
        lines.append(f"  gate      {'PROMOTE' if gate['promote'] else 'REJECT'} (report: {status.get('gate_report')})")
        for name, s in sorted(gate["slices"].items()):
            lines.append(
                f"            {name:<9} production {s['baseline_mean']:.3f}  candidate {s['candidate_mean']:.3f}  "
                f"delta {s['delta']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]  n={s['n']}  {s['rule']}: {'pass' if s['passed'] else 'FAIL'}"
            )
    aliases = status["aliases"]
    lines.append(f"  registry  production={aliases.get('production')} previous={aliases.get('previous')} candidate={aliases.get('candidate')}")
    served = status.get("served")
    if served:
        if served.get("error"):
            lines.append(f"  vLLM      {served['endpoint']}: {served['error']}")
        else:
            lines.append(f"  vLLM      {served['endpoint']} serves {served['name']!r} from {served.get('version')} ({served.get('root')})")
            if served.get("answer") is not None:
                lines.append(
                    f"            asked {served['name']!r} a held-out {served.get('slice')!r} example:\n"
                    f"              answer:   {served['answer'].strip()}\n              expected: {served['expected']}"
                )
    return "\n".join(lines)
