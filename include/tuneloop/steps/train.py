"""The train step: a candidate adapter on a snapshot, in the ML environment, registered and
pointed at by the ``candidate`` alias. A retried run finds the version it registered."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.steps.loop import maybe_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.config import TrainingSettings
    from tuneloop.steps.loop import Loop
    from tuneloop.storage import Store


def train_step(loop: Loop, snapshot: str) -> dict[str, Any]:
    """Train a candidate adapter on the snapshot (ML env), register it, point ``candidate`` at it.

    A retry of a run that already registered its candidate trains nothing again: it returns
    that version (and points ``candidate`` at it, if the first attempt died before)."""
    done = loop.registry.registered_by(loop.run_id)
    if done is not None and done.get("snapshot") == snapshot:
        version = done["version"]
        loop.progress(f"{version} was trained and registered by this run before a retry: not training again")
        loop.registry.move_aliases({"candidate": version}, reason=f"trained on snapshot {snapshot[:12]}", run_id=loop.run_id)
        train_metrics = dict((done.get("metrics") or {}).get("train") or {})
        return {"version": version, "snapshot": snapshot, **train_metrics, "adapter_uri": f"{loop.store.uri}/adapters/{version}"}
    version = loop.registry.next_version()
    production = loop.registry.aliases().get("production")
    init_from = production if loop.settings.training.init_from == "production" and production else None
    start = f"warm start from {init_from}" if init_from else "fresh LoRA weights"
    loop.progress(f"training candidate {version} on snapshot {snapshot[:12]} ({start})")
    command = ["train", "--snapshot", snapshot, "--version", version]
    result = loop.run_ml([*command, "--init-from", init_from] if init_from else command)
    provenance = maybe_json(loop.store, layout.adapter_provenance(version))
    train_metrics = {k: result.get(k) for k in ("final_loss", "steps", "epochs", "seconds", "tokens_per_second", "device", "dtype", "trainable_params")}
    train_metrics["first_loss"] = (result.get("loss_history") or [None])[0]
    train_metrics["init_from"] = init_from
    loop.registry.register(
        version,
        adapter_key=layout.adapter(version),
        snapshot=snapshot,
        base_model=str(result.get("base_model")),
        metrics={"train": train_metrics},
        provenance=provenance,
        run_id=loop.run_id,
        adapter_hash=result.get("adapter_hash"),
    )
    loop.registry.move_aliases({"candidate": version}, reason=f"trained on snapshot {snapshot[:12]}", run_id=loop.run_id)
    trained = {"version": version, "snapshot": snapshot, **train_metrics, "adapter_uri": f"{loop.store.uri}/adapters/{version}"}
    if loop.tracker is not None:
        loop.tracker.log_training(
            trained, loss_history=list(result.get("loss_history") or []), eval_loss_history=list(result.get("eval_loss_history") or []),
            provenance=provenance if isinstance(provenance, dict) else None,
        )
        loop.tracker.mirror_aliases(loop.registry.aliases(), {version: loop.registry.get(version)})
    return trained


def replay_mix(
    store: Store, records: list[dict[str, Any]], snapshot: str, training: TrainingSettings, progress: Callable[[str], None]
) -> tuple[list[dict[str, Any]], str, int]:
    """(records plus replayed rows, the hash the adapter records as its data, rows replayed).

    ``training.replay_fraction`` of the mix comes from the training split of the snapshot the
    production adapter was trained on, so a warm-started candidate keeps seeing the old slices.
    """
    if training.replay_fraction <= 0:
        return records, snapshot, 0
    from tuneloop import layout
    from tuneloop.ml.training_data import mix_replay
    from tuneloop.registry import Registry, RegistryError

    registry = Registry(store)
    production = registry.aliases().get("production")
    try:
        earlier_snapshot = registry.get(production)["snapshot"] if production else None
    except RegistryError:
        earlier_snapshot = None
    if not earlier_snapshot or earlier_snapshot == snapshot:
        progress(f"replay: nothing to replay (production {production or 'none'} was trained on this snapshot or none)")
        return records, snapshot, 0
    earlier = [row for row in store.iter_jsonl(layout.snapshot_file(earlier_snapshot, "train")) if isinstance(row, dict)]
    mixed, n = mix_replay(records, earlier, training.replay_fraction, seed=training.seed)
    progress(f"replay: {n} rows of production {production}'s snapshot {earlier_snapshot[:12]} ({n / len(mixed):.0%} of {len(mixed)})")
    return [dict(row) for row in mixed], f"{snapshot}+replay-{earlier_snapshot[:12]}-{n}", n
