"""The loop's state as Prometheus metrics (text exposition format 0.0.4), every sample labelled
with its loop id; the Airflow plugin serves them at ``GET /tuneloop/metrics``.

Read from the loop's store, as ``tuneloop status`` reads it (no call to vLLM): the latest drift
check, the latest snapshot's intake counts, the registry's aliases, the newest candidate's
training speed and gate decision. The drift monitor's own alert rule for Alertmanager, which
calls the alert webhook, is in ``docs/ui-and-notifications.md``::

    tuneloop_drift_detected == 1 and tuneloop_drift_p_value < 0.01
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from tuneloop.config import Settings
    from tuneloop.storage import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass
class Metric:
    """One metric family: name, help, type and its samples ``(labels, value)``."""

    name: str
    help: str
    kind: str = "gauge"
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: Any, **labels: Any) -> None:
        """Add a sample; a value that is not a finite number (missing) is left out."""
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            self.samples.append(({k: str(v) for k, v in labels.items() if v is not None}, float(value)))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: Iterable[Metric]) -> str:
    """The exposition text: ``# HELP``/``# TYPE`` then one line per sample, families merged by name."""
    merged: dict[str, Metric] = {}
    for metric in metrics:
        if not _NAME.match(metric.name):
            raise ValueError(f"invalid metric name {metric.name!r}")
        merged.setdefault(metric.name, Metric(metric.name, metric.help, metric.kind)).samples.extend(metric.samples)
    lines = []
    for metric in merged.values():
        lines.append(f"# HELP {metric.name} {metric.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            label_text = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
            lines.append(f"{metric.name}{{{label_text}}} {value!r}" if label_text else f"{metric.name} {value!r}")
    return "\n".join(lines) + "\n"


def _version_number(name: str | None) -> float | None:
    return float(name[1:]) if name and name[1:].isdigit() else None


def loop_metrics(loop_id: str, settings: Settings, store: Store) -> list[Metric]:
    """The metric families of one loop (``loop`` label ``loop_id``), from its store."""
    from tuneloop.status import collect_status

    status = collect_status(settings, store, ask_vllm=False)
    return metrics_from_status(loop_id, status)


def metrics_from_status(loop_id: str, status: Mapping[str, Any]) -> list[Metric]:
    """:func:`loop_metrics` from ``collect_status``'s dict (split out for tests)."""
    up = Metric("tuneloop_loop_up", "1 when the loop's store was read for these metrics")
    up.add(1, loop=loop_id)
    out = [up]

    drift = status.get("drift") or {}
    statistic = Metric("tuneloop_drift_statistic", "the latest drift check's statistic (classifier AUC or MMD; 0.5 = no drift for AUC)")
    p_value = Metric("tuneloop_drift_p_value", "the latest drift check's p-value")
    detected = Metric("tuneloop_drift_detected", "1 when the latest drift check found drift")
    emitted = Metric("tuneloop_drift_refresh_requested", "1 when the latest drift check requested a refresh (drift persisted)")
    streak = Metric("tuneloop_drift_streak", "drifted checks in a row")
    performance = Metric("tuneloop_drift_score_delta", "change of production's score on fresh labelled data (negative: it fell)")
    checked_at = Metric("tuneloop_drift_check_timestamp_seconds", "when the latest drift check ran (Unix time)")
    if drift:
        labels = {"loop": loop_id, "method": drift.get("method")}
        statistic.add(drift.get("statistic"), **labels)
        p_value.add(drift.get("p_value"), **labels)
        detected.add(bool(drift.get("drift")), loop=loop_id)
        emitted.add(bool(drift.get("emit")), loop=loop_id)
        streak.add(drift.get("streak"), loop=loop_id)
        perf = drift.get("performance") or {}
        if perf.get("checked"):
            performance.add(perf.get("delta"), loop=loop_id)
        checked_at.add(_timestamp(drift.get("checked_at")), loop=loop_id)
    out += [statistic, p_value, detected, emitted, streak, performance, checked_at]

    snapshot = status.get("snapshot") or {}
    rows = Metric("tuneloop_intake_rows", "rows of the latest dataset snapshot by outcome")
    reasons = Metric("tuneloop_intake_quarantined_rows", "quarantined rows of the latest snapshot by reason (a row may have several)")
    for outcome, count in (snapshot.get("counts") or {}).items():
        rows.add(count, loop=loop_id, outcome=outcome)
    for reason, count in (snapshot.get("reasons") or {}).items():
        reasons.add(count, loop=loop_id, reason=reason)
    out += [rows, reasons]

    aliases = status.get("aliases") or {}
    alias = Metric("tuneloop_alias_version", "the version number each registry alias names (production, previous, candidate)")
    served = Metric("tuneloop_production_info", "1, labelled with the production version the registry says is served")
    for name, version in aliases.items():
        alias.add(_version_number(version), loop=loop_id, alias=name)
    if aliases.get("production"):
        served.add(1, loop=loop_id, version=aliases["production"])
    versions = Metric("tuneloop_versions", "adapter versions in the registry")
    versions.add(len(status.get("versions") or []), loop=loop_id)
    out += [alias, served, versions]

    newest = status.get("newest_version") or {}
    train = (newest.get("metrics") or {}).get("train") or {}
    speed = Metric("tuneloop_train_tokens_per_second", "training speed of the newest version")
    loss = Metric("tuneloop_train_final_loss", "final training loss of the newest version")
    seconds = Metric("tuneloop_train_seconds", "training time of the newest version")
    if newest:
        labels = {"loop": loop_id, "version": newest.get("version"), "device": train.get("device")}
        speed.add(train.get("tokens_per_second"), **labels)
        loss.add(train.get("final_loss"), **labels)
        seconds.add(train.get("seconds"), **labels)
    out += [speed, loss, seconds]

    gate = status.get("gate") or {}
    promote = Metric("tuneloop_gate_promote", "the gate's last decision on the newest version: 1 promote, 0 reject")
    delta = Metric("tuneloop_gate_delta", "candidate minus production score per slice at the gate")
    low = Metric("tuneloop_gate_delta_ci_low", "lower bound of the delta's confidence interval per slice")
    high = Metric("tuneloop_gate_delta_ci_high", "upper bound of the delta's confidence interval per slice")
    passed = Metric("tuneloop_gate_slice_passed", "1 when the slice passed its rule (improve or non-inferior)")
    if gate:
        version = gate.get("version") or newest.get("version")
        promote.add(bool(gate.get("promote")), loop=loop_id, version=version)
        for name, found in (gate.get("slices") or {}).items():
            labels = {"loop": loop_id, "version": version, "slice": name, "rule": found.get("rule")}
            delta.add(found.get("delta"), **labels)
            low.add(found.get("ci_low"), **labels)
            high.add(found.get("ci_high"), **labels)
            passed.add(bool(found.get("passed")), **labels)
    out += [promote, delta, low, high, passed]
    return out


def _timestamp(text: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def loop_down(loop_id: str) -> list[Metric]:
    """What a loop whose store cannot be read exposes: ``tuneloop_loop_up 0`` (alert on it; the
    cause is in the API server's log)."""
    up = Metric("tuneloop_loop_up", "1 when the loop's store was read for these metrics")
    up.add(0, loop=loop_id)
    return [up]
