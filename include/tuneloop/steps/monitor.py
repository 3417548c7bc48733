"""The drift monitor's step: compare the current traffic window with what production was
trained on, check production's score on fresh labelled rows, apply the policy (minimum effect,
consecutive checks, cooldown) and keep the history. The statistics are in :mod:`tuneloop.drift`."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.steps.loop import latest_candidate_scores, parse_day

if TYPE_CHECKING:
    from tuneloop.steps.loop import Loop
    from tuneloop.storage import Store
    from tuneloop.tasks import TaskSpec

TRAFFIC_PREFIX = layout.TRAFFIC


def _rows(store: Store, keys: list[str]) -> list[dict[str, Any]]:
    return [record for key in keys for record in store.iter_jsonl(key) if isinstance(record, dict)]


def _texts(loop: Loop, rows: list[dict[str, Any]]) -> list[str]:
    """What the drift test compares: ``drift.field`` of each row when set, else the task's
    input (the prompt, or the conversation's non-system turns)."""
    field = loop.settings.drift.field
    if field:
        return [r[field] for r in rows if isinstance(r.get(field), str) and r[field].strip()]
    texts = (loop.spec.input_text(r) for r in rows)
    return [t for t in texts if t and t.strip()]


def slice_shift(spec: TaskSpec, reference: list[dict[str, Any]], current: list[dict[str, Any]], *, min_share: float = 0.05) -> dict[str, Any]:
    """Slices whose share of traffic grew: new in the current window, or at least twice their
    reference share (and ``min_share`` of the current window). The gate's ``auto`` reads these."""
    def shares(rows: list[dict[str, Any]]) -> dict[str, float]:
        counts: dict[str, int] = {}
        for row in rows:
            name = spec.slice_of(row)
            counts[name] = counts.get(name, 0) + 1
        return {name: n / len(rows) for name, n in counts.items()} if rows else {}

    before, now = shares(reference), shares(current)
    grown = sorted(name for name, share in now.items() if share >= min_share and share >= 2 * before.get(name, 0.0))
    return {"reference": {k: round(v, 4) for k, v in sorted(before.items())}, "current": {k: round(v, 4) for k, v in sorted(now.items())}, "grown": grown}


def _traffic_keys(store: Store, first: date, last: date) -> tuple[list[date], list[str]]:
    days = [d for d in store.list_partitions(TRAFFIC_PREFIX) if first <= d <= last]
    keys = [k for d in days for k in store.list(f"{TRAFFIC_PREFIX}/dt={d.isoformat()}/") if k.endswith(".jsonl")]
    return days, keys


def check_drift(loop: Loop, *, as_of: str | date | None = None) -> dict[str, Any]:
    """Compare the current traffic window with what production was trained on; apply the policy.

    Reference: the training prompts of the production adapter's snapshot (else the first
    ``reference_days`` of traffic). Current: the last ``current_days`` of traffic up to
    ``as_of`` (default: the newest traffic partition). Emits only when drift persisted over
    ``consecutive_checks`` checks (this one included) and the newest refresh that trained a
    candidate, promoted or not, covered data older than ``cooldown_days`` before the window's
    end. Every check is stored under ``drift/checks/`` and ``drift/history.png`` redrawn.
    """
    from tuneloop.intake.pull import snapshot_last_day

    cfg = loop.settings.drift
    store = loop.store
    all_days = store.list_partitions(TRAFFIC_PREFIX)
    limit = parse_day(as_of)
    candidates = [d for d in all_days if limit is None or d <= limit]
    if not candidates:
        raise RuntimeError(f"no traffic partitions in {store.uri}/{TRAFFIC_PREFIX}/ up to {limit or 'now'}")
    end = candidates[-1]
    current_start = end - timedelta(days=cfg.current_days - 1)
    current_days, current_keys = _traffic_keys(store, current_start, end)

    production = loop.registry.aliases().get("production")
    versions = loop.registry.versions()  # read once: the reference, the cooldown, the performance check
    record = next((v for v in versions if v["version"] == production), None) if production else None
    if production and record is None:
        record = loop.registry.get(production)  # raises RegistryError naming the missing version
    reference_source: str
    if record is not None:
        snapshot = record.get("snapshot")
        reference_rows = _rows(store, [layout.snapshot_file(str(snapshot), "train")])
        reference_source = f"training data of production {production} (snapshot {str(snapshot)[:12]})"
    else:
        # the first reference_days of traffic, never overlapping the current window
        ref_last = min(all_days[0] + timedelta(days=cfg.reference_days - 1), current_start - timedelta(days=1))
        ref_days, ref_keys = _traffic_keys(store, all_days[0], ref_last)
        if not ref_days:
            raise RuntimeError(
                f"no traffic before the current window ({current_start} .. {end}) to compare it with, and no "
                "production adapter whose training data could serve: wait for more days, or lower drift.current_days"
            )
        reference_rows = _rows(store, ref_keys)
        reference_source = f"first {len(ref_days)} days of traffic"
    # Cooldown: the newest refresh that trained a candidate (promoted or rejected) and how far
    # its data reaches. Counted on the data's calendar, so simulated worlds behave like real time.
    last_refresh, trained_until = None, None
    for version in reversed(versions):
        trained_until = snapshot_last_day(store, version.get("snapshot"))
        if trained_until is not None:
            last_refresh = version["version"]
            break
    current_rows = _rows(store, current_keys)
    reference, current = _texts(loop, reference_rows), _texts(loop, current_rows)
    shift = slice_shift(loop.spec, reference_rows, current_rows)
    loop.progress(f"drift check as of {end}: {len(reference)} reference ({reference_source}) vs {len(current)} current prompts")
    report = _detect_drift(loop, reference, current)
    novelty = report.pop("novelty", None) or {}
    significant = bool(report["drift"])
    # A huge window makes even a trivial shift significant: require a minimum effect too.
    report["drift"] = significant and report["statistic"] >= cfg.min_auc

    history = drift_history(store)
    # the streak runs over the latest check of each earlier day (a backfill of a later day, or
    # a re-run of this one, does not count)
    earlier = {past["as_of"]: past for past in history if past["as_of"] < end.isoformat()}
    streak = 1 if report["drift"] else 0
    for past in reversed([earlier[day] for day in sorted(earlier)]):
        if not report["drift"] or not past["drift"]:
            break
        streak += 1
    in_cooldown = trained_until is not None and (end - trained_until).days < cfg.cooldown_days
    performance = check_performance(loop, end, record) if cfg.performance else {"checked": False, "reason": "drift.performance is off"}
    performance_fell = bool(performance.get("drift"))
    per_slice: dict[str, Any] = dict(performance.get("slices") or {})  # type: ignore[arg-type]
    floor = float(performance.get("baseline_mean") or 0.0) - cfg.performance_margin  # type: ignore[arg-type]
    fallen = sorted(name for name, stats in per_slice.items() if performance_fell and stats.get("mean") is not None and stats["mean"] < floor)
    drift_slices = sorted(set(fallen) | (set(shift["grown"]) if report["drift"] else set()))
    emit = (bool(report["drift"]) and streak >= cfg.consecutive_checks or performance_fell) and not in_cooldown
    if performance_fell and not in_cooldown:
        reason = f"production's score fell on fresh labelled data ({performance['reason']}); refresh requested"
    elif not significant:
        reason = f"no significant drift (p={report['p_value']:.3g} >= alpha {cfg.alpha})"
    elif not report["drift"]:
        reason = f"significant but small shift (AUC {report['statistic']:.3f} < drift.min_auc {cfg.min_auc}): not acted on"
    elif streak < cfg.consecutive_checks:
        reason = f"drift seen in {streak} consecutive check(s); policy needs {cfg.consecutive_checks}"
    elif in_cooldown:
        reason = (
            f"drift, but the last refresh ({last_refresh}) trained on data up to {trained_until}, "
            f"< drift.cooldown_days={cfg.cooldown_days} days before {end}: cooldown"
        )
    else:
        reason = f"drift persisted over {streak} check(s) (p={report['p_value']:.3g}); refresh requested"
    check = {
        "as_of": end.isoformat(),
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": loop.run_id,
        "drift": bool(report["drift"]),
        "p_value": report["p_value"],
        "statistic": report["statistic"],
        "method": report["method"],
        "n_reference": report["n_reference"],
        "n_current": report["n_current"],
        "current_window": [d.isoformat() for d in current_days[:1] + current_days[-1:]],
        "reference": reference_source,
        "production": production,
        "last_refresh": last_refresh,
        "trained_until": trained_until.isoformat() if trained_until else None,
        "streak": streak,
        "performance": performance,
        "slice_shift": shift,
        "drift_slices": drift_slices,
        "emit": emit,
        "decision": reason,
        "report": report,
        "novelty_key": layout.drift_novelty(end.isoformat(), loop.run_key) if novelty else None,
    }
    if novelty:  # beside the check, not in it: one number per distinct current prompt
        store.put_json(layout.drift_novelty(end.isoformat(), loop.run_key), {"as_of": end.isoformat(), "novelty": novelty})
    store.put_json(layout.drift_check(end.isoformat(), loop.run_key), check)
    _plot_drift_history([*history, check], store)
    loop.progress(f"drift decision: {reason}")
    return check


def check_performance(loop: Loop, end: date, production_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Production's score on labelled rows newer than its training data vs its score at promotion.

    Fresh rows: labelled partitions after the last day of production's snapshot, up to ``end``,
    that pass the row checks; at most ``drift.performance_max_rows`` (a sample stable by id
    hash). Baseline: production's per-example scores on its snapshot's eval split, from its
    evaluation as a candidate. Scored in the ML env; returns ``{"checked": False, "reason"}``
    when there is nothing to compare yet. ``production_record``: the production version's
    registry record when the caller has it (else it is read).
    """

    from tuneloop.intake.pull import NoNewDataError, plan_pull, sample_accepted, snapshot_last_day
    from tuneloop.performance import performance_drift

    cfg = loop.settings.drift
    if production_record is None:
        name = loop.registry.aliases().get("production")
        production_record = loop.registry.get(name) if name else None
    if production_record is None:
        return {"checked": False, "reason": "no production adapter yet"}
    production = production_record["version"]
    snapshot = production_record.get("snapshot")
    trained_until = snapshot_last_day(loop.store, snapshot)
    scores_key = latest_candidate_scores(loop, production)
    if trained_until is None or scores_key is None:
        return {"checked": False, "reason": f"{production} has no snapshot or no evaluation as a candidate to compare with"}
    try:
        plan = plan_pull(loop.store, since=trained_until + timedelta(days=1), until=end)
    except NoNewDataError:
        return {"checked": False, "reason": f"no labelled partitions after {trained_until} (production's data) yet"}
    available, fresh = sample_accepted(loop.store, plan, loop.spec, cfg.performance_max_rows, chunk_rows=loop.settings.data.chunk_rows)
    if available < cfg.performance_min_rows:
        return {"checked": False, "reason": f"{available} fresh labelled rows after {trained_until}; drift.performance_min_rows is {cfg.performance_min_rows}"}
    eval_ids = {str(r.get("id")) for r in loop.store.iter_jsonl(layout.snapshot_file(str(snapshot), "eval")) if isinstance(r, dict)}
    baseline = [r for r in loop.store.iter_jsonl(scores_key) if str(r.get("id")) in eval_ids]
    prefix = layout.performance_check(end.isoformat(), loop.run_key)
    loop.store.put_jsonl(f"{prefix}/fresh.jsonl", fresh)
    loop.progress(f"performance check: scoring {production} on {len(fresh)} labelled rows from {plan.days[0]} .. {plan.days[-1]}")
    loop.run_ml(["evaluate", "--adapter", production, "--eval", f"{prefix}/fresh.jsonl", "--upload", prefix, "--no-suites"])
    current = list(loop.store.iter_jsonl(f"{prefix}/scores.jsonl"))
    report = performance_drift(
        [float(r["score"]) for r in baseline],
        [float(r["score"]) for r in current],
        alpha=cfg.alpha,
        margin=cfg.performance_margin,
        min_examples=min(cfg.performance_min_rows, 30),
        current_slices=[str(r.get("slice")) for r in current],
    )
    loop.progress(report.summary())
    return {"checked": True, "production": production, "fresh_days": [plan.days[0].isoformat(), plan.days[-1].isoformat()],
            "baseline_scores": scores_key, "current_scores": f"{prefix}/scores.jsonl", **report.to_json()}


def _detect_drift(loop: Loop, reference: list[str], current: list[str]) -> dict[str, Any]:
    """The drift report as JSON: in process, or in the ML env when the method needs torch."""
    import importlib.util

    from tuneloop.drift import MIN_TEXTS_PER_WINDOW, detect_drift

    cfg = loop.settings.drift
    too_small = min(len(reference), len(current)) < MIN_TEXTS_PER_WINDOW  # let it say so here
    if cfg.method == "classifier" or too_small or importlib.util.find_spec("torch"):
        return detect_drift(
            reference, current, alpha=cfg.alpha, method=cfg.method, embedding_model=cfg.embedding_model, progress=loop.progress
        ).to_json()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tuneloop-drift-") as tmp:
        paths = {}
        for name, texts in (("reference", reference), ("current", current)):
            paths[name] = Path(tmp) / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        loop.progress(f"drift method {cfg.method!r} needs torch: running it in the ML environment")
        result = loop.run_ml(
            ["drift", "--reference", str(paths["reference"]), "--current", str(paths["current"]),
             "--field", "text", "--alpha", str(cfg.alpha), "--method", cfg.method],
        )
    result.pop("input", None)
    result.pop("field", None)
    return result


def drift_history(store: Store) -> list[dict[str, Any]]:
    """Every stored drift check, oldest first."""
    return [store.get_json(k) for k in store.list(f"{layout.DRIFT_CHECKS}/") if k.endswith(".json")]


def _plot_drift_history(history: list[dict[str, Any]], store: Store) -> None:
    store.put_bytes(layout.DRIFT_HISTORY_PLOT, plot_drift_history(history))


def plot_drift_history(history: list[dict[str, Any]]) -> bytes:
    """The drift checks as a PNG: the AUC per check, and its p-value (red = drift)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_stat, ax_p) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    xs = list(range(len(history)))
    labels = [h["as_of"] for h in history]
    ax_stat.plot(xs, [h["statistic"] for h in history], marker="o")
    ax_stat.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_stat.set_ylabel("AUC (0.5 = no drift)")
    colors = ["tab:red" if h["drift"] else "tab:green" for h in history]
    ax_p.scatter(xs, [max(h["p_value"], 1e-300) for h in history], c=colors)
    ax_p.set_yscale("log")
    alpha = history[-1]["report"].get("alpha", 0.05) if history else 0.05
    ax_p.axhline(alpha, color="tab:red", lw=0.8, ls="--", label=f"alpha {alpha}")
    ax_p.set_ylabel("p-value")
    ax_p.set_xticks(xs, labels, rotation=45, ha="right", fontsize=7)
    ax_p.legend(loc="lower left", fontsize=7)
    fig.suptitle("tuneloop drift checks (red = drift)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def drift_event_extra(check: dict[str, Any]) -> dict[str, Any]:
    """What the drift asset event carries (bounded): the test, the decision, the top terms,
    the performance check, and the slices where drift was found (the gate's ``auto``)."""
    report = check["report"]
    return {
        "source": "tuneloop_drift_monitor",
        "as_of": check["as_of"],
        "p_value": check["p_value"],
        "statistic": check["statistic"],
        "method": check["method"],
        "n_reference": check["n_reference"],
        "n_current": check["n_current"],
        "decision": check["decision"],
        "top_terms": report.get("top_terms", [])[:5],
        "performance": {k: check["performance"].get(k) for k in ("checked", "drift", "delta", "p_value", "reason")},
        "drift_slices": check.get("drift_slices", []),
    }
