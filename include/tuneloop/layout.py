"""Every key tuneloop reads or writes in the store, in one place.

::

    labelled/dt=YYYY-MM-DD/*.jsonl         labelled rows, one partition per day (your data)
    labelled/dt=YYYY-MM-DD/teacher-*.jsonl traffic labelled by the teacher model (data.label_source: teacher)
    labelling/<day>__<digest>/...          each teacher labelling run: summary (account, checks), quarantine
    traffic/dt=YYYY-MM-DD/*.jsonl          production requests, one partition per day (your logs)
    heldout/<name>.jsonl                   fixed held-out eval sets (the golden sets)
    suites/injection.jsonl                 a prompt-injection set (eval.injection_set)
    snapshots/<sha256>/...                 content-addressed dataset snapshots; snapshots/LATEST
    quality/<run>/...                      quarantine + GX result of a batch that failed the gate
    adapters/<version>/...                 LoRA adapters (safetensors + provenance)
    evals/<version>/<run>/<role>/...       per-example scores and summaries (candidate, production)
    reports/<version>/gate.*               the gate's decision (json, md, html, png per slice)
    registry/...                           versions and aliases (registry.py)
    drift/checks/<day>__<run>.json         every drift check; drift/history.png
    drift/performance/<day>__<run>/...     production scored on fresh labelled rows
    runs/<run>.json                        one summary per refresh run
    locks/fleet-<hash>.json                the lease of the deploy swapping a vLLM fleet
    alerts/dedup/<generation>.json         the alerts that triggered a refresh, kept for the webhook's de-duplication window
"""

from __future__ import annotations

import re
import reprlib

LABELLED = "labelled"
TRAFFIC = "traffic"
HELDOUT = "heldout"
SNAPSHOTS = "snapshots"
LATEST_SNAPSHOT = f"{SNAPSHOTS}/LATEST"
DRIFT_CHECKS = "drift/checks"
DRIFT_NOVELTY = "drift/novelty"
DRIFT_HISTORY_PLOT = "drift/history.png"
REGISTRY = "registry"
ALERT_DEDUP = "alerts/dedup"
#: A version name: v1, v2, ... (ASCII digits; ``\Z``, unlike ``$``, refuses a trailing newline).
VERSION_RE = re.compile(r"^v([0-9]{1,9})\Z")


def version_name(value: object) -> str:
    """``value`` if it is a version name (``v1``, ``v2``...), else ValueError. A version read
    from the registry, a report or the command line becomes a store key and a directory name
    here: ``../../etc``, an empty string or a number must never get that far."""
    if isinstance(value, str) and VERSION_RE.match(value):
        return value
    raise ValueError(f"{reprlib.repr(value)} is not a version name (v1, v2, ...)")


def snapshot_file(snapshot: str, split: str) -> str:
    """``snapshots/<hash>/<split>.jsonl`` (split: train, eval, quarantine)."""
    return f"{SNAPSHOTS}/{snapshot}/{split}.jsonl"


def adapter(version: str) -> str:
    return f"adapters/{version_name(version)}"


def adapter_provenance(version: str) -> str:
    return f"{adapter(version)}/provenance.json"


def evaluations(version: str) -> str:
    """``evals/<version>/``: every evaluation of a version, one folder per refresh run."""
    return f"evals/{version_name(version)}/"


def evaluation(version: str, run_key: str, role: str) -> str:
    """Where one evaluation of a refresh run writes: ``evals/<version>/<run>/<role>``."""
    return f"evals/{version_name(version)}/{run_key}/{role}"


def report(version: str) -> str:
    """``reports/<version>``: the gate's report files for a candidate."""
    return f"reports/{version_name(version)}"


def rollout_report(version: str, suffix: str = "json") -> str:
    """``reports/<version>/rollout.{json,md}``: its latest gateway rollout (shadow replay, bakes,
    why it rolled back), beside the gate's report."""
    return f"{report(version)}/rollout.{suffix}"


def gate_decision(version: str) -> str:
    return f"{report(version)}/gate.json"


def teacher_labels(day: str, digest: str) -> str:
    return f"{LABELLED}/dt={day}/teacher-{digest[:16]}.jsonl"


def labelling(day: str, digest: str) -> str:
    return f"labelling/{day}__{digest[:16]}"


def drift_check(day: str, run_key: str) -> str:
    return f"{DRIFT_CHECKS}/{day}__{run_key}.json"


def drift_novelty(day: str, run_key: str) -> str:
    """What a drift check found new: content hash of each current prompt -> novelty rank."""
    return f"{DRIFT_NOVELTY}/{day}__{run_key}.json"


def performance_check(day: str, run_key: str) -> str:
    return f"drift/performance/{day}__{run_key}"


def run_summary(run_key: str) -> str:
    return f"runs/{run_key}.json"


def quality_failure(run_key: str) -> str:
    return f"quality/{run_key}"


def fleet_lock(digest: str) -> str:
    return f"locks/fleet-{digest}.json"


def alert_dedup(generation: int) -> str:
    """``alerts/dedup/<generation>.json``: one immutable state of the webhook's de-duplication;
    the newest generation is the state, written with a conditional put."""
    return f"{ALERT_DEDUP}/{generation:08d}.json"
