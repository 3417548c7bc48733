"""The loop's steps as plain functions: each Airflow task calls exactly one of them.

Everything here is testable without Airflow: a step takes a :class:`Loop` (settings, store,
registry, run id) and JSON-able arguments, and returns a JSON-able dict that becomes the
task's XCom. ML work (train, evaluate) runs in the isolated ML env through
:mod:`tuneloop.runner`; everything else runs in the orchestration env.

Store layout written by the steps (next to the data layout of ``world``/``pull``)::

    snapshots/<sha256>/...          dataset snapshots (pull.py)
    quality/<run>/...               quarantine + GX result of a batch that failed the gate
    adapters/<version>/...          LoRA adapters (safetensors + provenance)
    evals/<version>/<run>/...       per-example scores + summaries, candidate and production
    reports/<version>/gate.*        gate decision (json, md, png)
    registry/...                    versions and aliases (registry.py)
    drift/checks/*.json             every drift check; drift/history.png
    runs/<run>.json                 one summary per refresh run
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tuneloop.config import Settings, choose_task_config, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tuneloop.registry import Registry
    from tuneloop.storage import Store
    from tuneloop.tasks import TaskSpec

log = logging.getLogger(__name__)

TRAFFIC_PREFIX = "traffic"
HELDOUT_PREFIX = "heldout"
GOLDEN_PER_SLICE = 6


@dataclass
class Loop:
    """What every step needs: settings, the store, the registry and the run's id."""

    settings: Settings
    config_path: str | None
    store: Store
    registry: Registry
    run_id: str
    progress: Callable[[str], None]

    @property
    def spec(self) -> TaskSpec:
        """The user's task (``settings.task``)."""
        from tuneloop.tasks import TaskSpec

        return TaskSpec(self.settings.task)

    @property
    def run_key(self) -> str:
        """The run id made safe for a store key."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.run_id)[:120]


def open_loop(
    config_path: str | None = None,
    *,
    run_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> Loop:
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store_from_settings

    settings = load_settings(config_path, env=env)
    store = open_store_from_settings(settings)
    return Loop(
        settings=settings,
        config_path=config_path,
        store=store,
        registry=Registry(store),
        run_id=run_id or datetime.now(UTC).strftime("manual__%Y-%m-%dT%H-%M-%S"),
        progress=progress or (lambda message: log.info("%s", message)),
    )


def open_task_loop(
    run_id: str,
    *,
    config_variable: Callable[[], str | None],
    progress: Callable[[str], None],
    vllm_connection: Callable[[], Any] | None = None,
) -> Loop:
    """The loop for one Airflow task. Config: $TUNELOOP_CONFIG, else ``config_variable()`` (the
    DAGs pass a reader of the ``tuneloop_config`` Variable), else the embedded defaults; a path
    that does not exist on this worker falls back to the defaults. ``vllm_connection()`` (the
    DAGs read the ``tuneloop_vllm`` Airflow connection; None when it does not exist) may replace
    the vLLM endpoints and API key: see :func:`apply_vllm_connection`."""
    config, env = choose_task_config(os.environ, config_variable, progress)
    loop = open_loop(config, run_id=run_id, progress=progress, env=env)
    found = vllm_connection() if vllm_connection is not None else None
    if found is not None:
        connection = VllmConnection(
            host=found.host, port=found.port, schema=found.schema, password=found.password, extra=found.extra_dejson
        )
        loop.settings = apply_vllm_connection(loop.settings, connection)
        progress(f"vLLM endpoints from the Airflow connection: {', '.join(loop.settings.vllm.endpoints)}")
    return loop


@dataclass(frozen=True)
class VllmConnection:
    """The parts of an Airflow connection that name the vLLM servers (see docs/serving.md)."""

    host: str | None = None
    port: int | None = None
    schema: str | None = None
    password: str | None = None
    extra: dict[str, Any] | None = None


def apply_vllm_connection(settings: Settings, connection: VllmConnection) -> Settings:
    """Settings whose vLLM endpoints and API key come from ``connection``: ``extra.endpoints``
    (a list of URLs, or one comma-separated string) or else ``host`` (with ``port`` and
    ``schema`` http/https); the password, when set, is the API key. Validated like the YAML."""
    from pydantic import SecretStr, ValidationError

    from tuneloop.config import ConfigError, VllmSettings

    extra = connection.extra or {}
    endpoints: Any = extra.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [part.strip() for part in endpoints.split(",") if part.strip()]
    if not endpoints and connection.host:
        host = connection.host
        if "://" not in host:
            host = f"{connection.schema or 'http'}://{host}"
        endpoints = [f"{host}:{connection.port}" if connection.port else host]
    if not endpoints:
        raise ConfigError("the tuneloop_vllm connection names no endpoint: set its host, or extra {\"endpoints\": [...]}")
    values = {**settings.vllm.model_dump(), "endpoints": endpoints}
    if connection.password:
        values["api_key"] = SecretStr(connection.password)
    try:
        vllm = VllmSettings.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"the tuneloop_vllm connection is invalid: {err.errors()[0]['msg']}") from None
    return settings.model_copy(update={"vllm": vllm})


def _run_ml(loop: Loop, args: list[str]) -> dict[str, Any]:
    from tuneloop.runner import run_ml_step

    return run_ml_step(args, settings=loop.settings, on_line=loop.progress)


def _parse_day(value: str | date | None) -> date | None:
    if value in (None, ""):
        return None
    return value if isinstance(value, date) else date.fromisoformat(str(value))


# --- drift monitor ------------------------------------------------------------------------


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
    from tuneloop.pull import snapshot_last_day

    cfg = loop.settings.drift
    store = loop.store
    all_days = store.list_partitions(TRAFFIC_PREFIX)
    limit = _parse_day(as_of)
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
        reference_rows = _rows(store, [f"snapshots/{snapshot}/train.jsonl"])
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
    }
    store.put_json(f"drift/checks/{end.isoformat()}__{loop.run_key}.json", check)
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
    import hashlib

    from tuneloop.drift import performance_drift
    from tuneloop.pull import NoNewDataError, plan_pull, read_batch, snapshot_last_day

    cfg = loop.settings.drift
    if production_record is None:
        name = loop.registry.aliases().get("production")
        production_record = loop.registry.get(name) if name else None
    if production_record is None:
        return {"checked": False, "reason": "no production adapter yet"}
    production = production_record["version"]
    snapshot = production_record.get("snapshot")
    trained_until = snapshot_last_day(loop.store, snapshot)
    scores_key = _latest_candidate_scores(loop, production)
    if trained_until is None or scores_key is None:
        return {"checked": False, "reason": f"{production} has no snapshot or no evaluation as a candidate to compare with"}
    try:
        plan = plan_pull(loop.store, since=trained_until + timedelta(days=1), until=end)
    except NoNewDataError:
        return {"checked": False, "reason": f"no labelled partitions after {trained_until} (production's data) yet"}
    fresh = read_batch(loop.store, plan, loop.spec).accepted
    if len(fresh) < cfg.performance_min_rows:
        return {"checked": False, "reason": f"{len(fresh)} fresh labelled rows after {trained_until}; drift.performance_min_rows is {cfg.performance_min_rows}"}
    fresh = sorted(fresh, key=lambda r: hashlib.sha256(str(loop.spec.row_id(r)).encode()).hexdigest())[: cfg.performance_max_rows]
    eval_ids = {str(r.get("id")) for r in loop.store.iter_jsonl(f"snapshots/{snapshot}/eval.jsonl") if isinstance(r, dict)}
    baseline = [r for r in loop.store.iter_jsonl(scores_key) if str(r.get("id")) in eval_ids]
    prefix = f"drift/performance/{end.isoformat()}__{loop.run_key}"
    loop.store.put_bytes(f"{prefix}/fresh.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh).encode())
    loop.progress(f"performance check: scoring {production} on {len(fresh)} labelled rows from {plan.days[0]} .. {plan.days[-1]}")
    _run_ml(loop, ["evaluate", "--adapter", production, "--eval", f"{prefix}/fresh.jsonl", "--upload", prefix, "--no-suites"])
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
        result = _run_ml(
            loop,
            ["drift", "--reference", str(paths["reference"]), "--current", str(paths["current"]),
             "--field", "text", "--alpha", str(cfg.alpha), "--method", cfg.method],
        )
    result.pop("input", None)
    result.pop("field", None)
    return result


def drift_history(store: Store) -> list[dict[str, Any]]:
    """Every stored drift check, oldest first."""
    return [store.get_json(k) for k in store.list("drift/checks/") if k.endswith(".json")]


def _plot_drift_history(history: list[dict[str, Any]], store: Store) -> None:
    store.put_bytes("drift/history.png", plot_drift_history(history))


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


# --- refresh ------------------------------------------------------------------------------


def pull_step(loop: Loop, *, since: str | None = None, until: str | None = None, force: bool = False) -> dict[str, Any]:
    """Plan which labelled partitions to use: new ones since the last snapshot, or a range."""
    from tuneloop.pull import NoNewDataError, plan_pull

    start, end = _parse_day(since), _parse_day(until)
    try:
        plan = plan_pull(loop.store, since=start, until=end, incremental=start is None)
    except NoNewDataError:
        if not force:
            raise
        loop.progress("no new partitions since the last snapshot; force=True: using all partitions")
        plan = plan_pull(loop.store, since=None, until=end)
    loop.progress(f"pull: {len(plan.keys)} files from {len(plan.days)} partitions {plan.days[0]} .. {plan.days[-1]}")
    return plan.to_json()


def validate_step(loop: Loop, plan_json: dict[str, Any]) -> dict[str, Any]:
    """Row checks + the Great Expectations suite; a failing batch stops the run before training."""
    from tuneloop.intake_checks import IntakeOptions
    from tuneloop.pull import PullPlan, check_batch, write_dataset_snapshot
    from tuneloop.quality import DataQualityError, format_quality_failure, run_quality_gate

    plan = PullPlan.from_json(plan_json)
    data = loop.settings.data
    spec = loop.spec
    batch, intake = check_batch(loop.store, plan, IntakeOptions.from_settings(loop.settings), spec, eval_fraction=data.eval_fraction, progress=loop.progress)
    report = run_quality_gate(
        batch, max_quarantine_rate=data.max_quarantine_rate, min_accepted_rows=data.min_accepted_rows, spec=spec, pii=data.pii,
        expectations_file=data.expectations, intake=intake, progress=loop.progress,
    )
    loop.progress(f"quality: {report.accepted} accepted, {report.quarantined} quarantined of {report.total}: {report.reasons}")
    if not report.passed:
        prefix = f"quality/{loop.run_key}"
        loop.store.put_bytes(f"{prefix}/quarantine.jsonl", "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in batch.quarantined).encode())
        loop.store.put_json(f"{prefix}/gx_validation_result.json", report.validation_result)
        loop.store.put_json(f"{prefix}/summary.json", report.summary())
        message = format_quality_failure(report) + f"\n  artifacts: {loop.store.uri}/{prefix}/"
        raise DataQualityError(message, report.summary())
    result = write_dataset_snapshot(loop.store, batch, plan, spec, eval_fraction=data.eval_fraction, quality=report)
    loop.progress(f"snapshot {result['snapshot'][:12]}: {result['counts']} slices {result['slices']}")
    return {**result, "quality": report.summary()}


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
    result = _run_ml(loop, [*command, "--init-from", init_from] if init_from else command)
    provenance = _maybe_json(loop.store, f"adapters/{version}/provenance.json")
    train_metrics = {k: result.get(k) for k in ("final_loss", "steps", "epochs", "seconds", "tokens_per_second", "device", "dtype", "trainable_params")}
    train_metrics["first_loss"] = (result.get("loss_history") or [None])[0]
    train_metrics["init_from"] = init_from
    loop.registry.register(
        version,
        adapter_key=f"adapters/{version}",
        snapshot=snapshot,
        base_model=str(result.get("base_model")),
        metrics={"train": train_metrics},
        provenance=provenance,
        run_id=loop.run_id,
    )
    loop.registry.move_aliases({"candidate": version}, reason=f"trained on snapshot {snapshot[:12]}", run_id=loop.run_id)
    return {"version": version, "snapshot": snapshot, **train_metrics, "adapter_uri": f"{loop.store.uri}/adapters/{version}"}


def _maybe_json(store: Store, key: str) -> dict[str, Any]:
    from tuneloop.storage import StoreKeyError

    try:
        return dict(store.get_json(key))
    except StoreKeyError:
        return {}


def eval_sources(loop: Loop, snapshot: str) -> list[str]:
    """The held-out data both models are scored on: the snapshot's eval split + golden sets."""
    sources = [f"snapshots/{snapshot}/eval.jsonl"]
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
        prefix = f"evals/{version}/{loop.run_key}/{role.removesuffix('_eval')}"
        loop.progress(f"evaluating {role} ({adapter}) on {', '.join(sources)}")
        compare = ["--compare", results["production_eval"]["scores_key"]] if role == "candidate_eval" else []
        summary = _run_ml(loop, ["evaluate", "--adapter", adapter, "--eval", *sources, "--upload", prefix, *compare])
        results[role] = {
            "adapter": adapter,
            "scores_key": f"{prefix}/scores.jsonl",
            "summary_key": f"{prefix}/summary.json",
            "slices": summary.get("slices", {}),
            "suites": {name: summary.get(name) for name in ("injection", "consistency", "golden", "latency")},
            "backend": summary.get("backend"),
        }
    return {"version": version, "snapshot": snapshot, "production": production, **results}


def gate_step(loop: Loop, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Decide promote/reject with paired statistics; store the report next to the candidate's
    version (``reports/<version>/``: gate.json, gate.md and gate.html, gate.png and one
    gate-<slice>.png per slice) and log where to open it (file://, s3:// and presigned)."""
    from tuneloop import gate

    cfg = loop.settings.gate
    version = evaluation["version"]
    baseline = list(loop.store.iter_jsonl(evaluation["production_eval"]["scores_key"]))
    candidate = list(loop.store.iter_jsonl(evaluation["candidate_eval"]["scores_key"]))
    improve, why = improve_slices_for(loop, evaluation, {row["slice"] for row in candidate})
    loop.progress(f"gate: improve slices {improve} ({why})")
    decision = gate.decide(
        [_score_row(r) for r in baseline],
        [_score_row(r) for r in candidate],
        improve_slices=improve,
        margin=cfg.margin,
        alpha=cfg.alpha,
        min_examples=cfg.min_examples,
        n_bootstrap=cfg.bootstrap_samples,
    )
    decision = gate.apply_suite_bars(decision, evaluation["candidate_eval"].get("suites") or {}, cfg.suite_bars.model_dump())
    baseline_name = evaluation.get("production") or "base model"
    title = f"Gate: candidate {version} vs production {baseline_name}"
    prefix = f"reports/{version}"
    import tempfile

    # The report is keyed by the candidate's version, and its gate.json names the candidate's
    # adapter and the eval outputs it was computed from. Written last, gate.json marks a
    # complete report.
    with tempfile.TemporaryDirectory() as tmp:
        files = gate.write_report(decision, tmp, title=title)
        for name in files.names():
            loop.store.put_file(f"{prefix}/{name}", Path(tmp) / name)
    keys: dict[str, Any] = {
        "markdown": f"{prefix}/{files.markdown}",
        "html": f"{prefix}/{files.html}",
        "plot": f"{prefix}/{files.plot}",
        "slice_plots": {name: f"{prefix}/{file}" for name, file in files.slice_plots.items()},
    }
    loop.store.put_json(
        f"{prefix}/gate.json",
        {
            **decision.to_json(),
            "version": version,
            "baseline": baseline_name,
            "run_id": loop.run_id,
            "candidate": {"adapter_key": f"adapters/{version}", "scores_key": evaluation["candidate_eval"]["scores_key"]},
            "production": {"version": evaluation.get("production"), "scores_key": evaluation["production_eval"]["scores_key"]},
            "report": keys,
        },
    )
    expires_s = int(cfg.report_link_hours * 3600)
    links = {kind: loop.store.links(keys[kind], expires_s=expires_s) for kind in ("markdown", "html")}
    verdict = "PROMOTE" if decision.promote else "REJECT"
    loop.progress(f"gate: {verdict} {version} vs {baseline_name}")
    for reason in decision.reasons:
        loop.progress(f"  - {reason}")
    loop.progress(f"gate report (Markdown, a plot per slice): {links['markdown'][0]}")
    loop.progress(f"gate report (HTML, plots inside): {links['html'][0]}")
    for url in links["html"][1:]:
        loop.progress(f"gate report (HTML, presigned for {cfg.report_link_hours:g} h): {url}")
    return {
        "version": version,
        "baseline": baseline_name,
        "report_key": keys["markdown"],
        "report": keys,
        "report_links": links,
        **decision.to_json(),
    }


def improve_slices_for(loop: Loop, evaluation: Mapping[str, Any], present: set[str]) -> tuple[list[str], str]:
    """The slices the candidate must improve on. The first adapter (compared with the bare base
    model) must be better on the slices it was trained on; later ones follow
    ``gate.improve_slices``, where ``auto`` means the slices of the latest drift check that
    asked for a refresh, else the slices of the candidate's training data."""
    from tuneloop import gate
    from tuneloop.storage import StoreKeyError, read_snapshot_manifest

    try:
        manifest = read_snapshot_manifest(loop.store, "snapshots", evaluation["snapshot"])
    except StoreKeyError:
        manifest = {}  # a snapshot trained on outside the store: nothing says what it covered
    counts = manifest.get("slices") or manifest.get("domains") or {}
    trained_on = set(counts.get("train", {}))
    if evaluation.get("production") is None:
        return gate.resolve_improve_slices([gate.AUTO], present, trained_on=trained_on)
    emitted = [check for check in drift_history(loop.store) if check.get("emit")]
    evidence = emitted[-1].get("drift_slices") if emitted else None
    return gate.resolve_improve_slices(list(loop.settings.gate.improve_slices), present, evidence=evidence, trained_on=trained_on)


def _score_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "slice": row["slice"], "score": row["score"]}


def base_model_ref(settings: Settings) -> str:
    """The base model as vLLM and adapter configs name it: the demo dir's path, or the hub id/path."""
    if settings.model.base_model == "demo":
        return str(Path(settings.model.demo_model_dir).resolve())
    return settings.model.base_model


def _materialize_adapter(loop: Loop, version: str) -> Path:
    """Copy an adapter from the store to where the vLLM servers read adapters.

    vLLM re-reads an in-place-loaded adapter from disk on every step, so a served directory
    must never change: each version gets its own directory, written to a temporary name
    and renamed into place once complete, and never touched again.
    """
    import shutil
    import uuid

    root = Path(loop.settings.vllm.adapter_dir).resolve()
    target = root / version
    if (target / "adapter_config.json").is_file():
        return target
    staging = root / f".{version}.partial-{uuid.uuid4().hex[:8]}"
    try:
        loop.store.get_dir(f"adapters/{version}", staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def golden_prompts(loop: Loop, version: str, scores_key: str) -> list[dict[str, Any]]:
    """Golden prompts for post-swap verification: held-out rows with the answer eval measured."""
    from tuneloop.storage import StoreKeyError

    try:
        predictions = {str(r["id"]): r["prediction"] for r in loop.store.iter_jsonl(scores_key.replace("scores.jsonl", "predictions.jsonl"))}
    except StoreKeyError:
        return []
    scores = {str(r["id"]): r for r in loop.store.iter_jsonl(scores_key)}
    golden = []
    for key in loop.store.list(f"{HELDOUT_PREFIX}/"):
        if not key.endswith(".jsonl"):
            continue
        picked = 0
        for record in loop.store.iter_jsonl(key):
            record_id = str(loop.spec.row_id(record))
            if record_id in predictions and picked < GOLDEN_PER_SLICE:
                row = scores.get(record_id, {})
                context = loop.spec.example(record).context
                golden.append({"id": record_id, "prompt": context, "expected": predictions[record_id], "score": row.get("score")})
                picked += 1
    return golden


def _latest_candidate_scores(loop: Loop, version: str) -> str | None:
    """The newest evaluation of ``version`` as a candidate (its golden answers for rollback)."""
    keys = [k for k in loop.store.list(f"evals/{version}/") if k.endswith("/candidate/scores.jsonl")]
    return keys[-1] if keys else None


def fleet(loop: Loop, action: str) -> Any:
    """The lease that makes this the only deploy on the loop's vLLM fleet (see fleet_lock)."""
    from tuneloop.fleet_lock import fleet_lock

    return fleet_lock(loop.store, loop.settings.vllm.endpoints, owner=loop.run_id, action=action, say=loop.progress)


def deploy_step(loop: Loop, version: str, *, scores_key: str | None = None) -> dict[str, Any]:
    """Hot-swap ``version`` into every vLLM endpoint (validated, staged, verified, rolled back on failure)."""
    with fleet(loop, f"deploy {version}"):
        return _deploy(loop, version, scores_key=scores_key)


def _deploy(loop: Loop, version: str, *, scores_key: str | None = None) -> dict[str, Any]:
    from tuneloop.deploy import deploy_adapter

    settings = loop.settings
    adapter_dir = _materialize_adapter(loop, version)
    production = loop.registry.aliases().get("production")
    previous_dir = _materialize_adapter(loop, production) if production and production != version else None
    scores_key = scores_key or _latest_candidate_scores(loop, version)
    golden = golden_prompts(loop, version, scores_key) if scores_key else []
    report = deploy_adapter(
        settings.vllm.endpoints,
        adapter_dir,
        served_name=settings.model.served_model_name,
        golden=golden,
        previous_adapter_dir=previous_dir,
        api_key=settings.vllm.api_key.get_secret_value() if settings.vllm.api_key else None,
        max_lora_rank=settings.vllm.max_lora_rank,
        base_model=base_model_ref(settings),
        scorer=loop.spec.scorer.agreement,
        max_tokens=settings.eval.max_new_tokens,
        timeout_s=settings.vllm.timeout_s,
        progress=loop.progress,
    )
    return {"version": version, "adapter_dir": str(adapter_dir), "previous": production, **report.to_dict()}


def verify_step(loop: Loop, version: str) -> dict[str, Any]:
    """Check every endpoint's stable name is served from ``version``'s adapter directory."""
    from tuneloop.vllm_client import VllmClient

    settings = loop.settings
    expected = str(_materialize_adapter(loop, version))
    served = settings.model.served_model_name
    api_key = settings.vllm.api_key.get_secret_value() if settings.vllm.api_key else None
    seen = {}
    for endpoint in settings.vllm.endpoints:
        client = VllmClient(endpoint, api_key=api_key, timeout_s=settings.vllm.timeout_s)
        models = {m["id"]: m for m in client.models()}
        root = models.get(served, {}).get("root")
        seen[endpoint] = root
        if root is None or Path(root).resolve() != Path(expected).resolve():
            raise RuntimeError(f"{endpoint}: {served!r} is served from {root!r}, expected {expected} ({version})")
        answer = client.chat(served, "ping", max_tokens=4)
        seen[endpoint + "#answer"] = answer
    loop.progress(f"verified: {served!r} answers from {version} on {len(settings.vllm.endpoints)} endpoint(s)")
    return {"version": version, "served_from": seen}


def record_step(loop: Loop, version: str, gate_result: dict[str, Any] | None = None, *, reason: str | None = None) -> dict[str, Any]:
    """Move the aliases (production <- version, previous <- old production) and log the run."""
    move = loop.registry.promote(version, reason=reason or "refresh: gate passed, deployed and verified", run_id=loop.run_id)
    summary = {"run_id": loop.run_id, "version": version, "aliases": move["aliases"], "gate": gate_result, "at": move["at"]}
    loop.store.put_json(f"runs/{loop.run_key}.json", summary)
    loop.progress(f"registry: production={move['aliases']['production']} previous={move['aliases']['previous']}")
    return summary


def reconcile_step(loop: Loop) -> dict[str, Any]:
    """Make every vLLM endpoint serve exactly the registry's production version (or no adapter
    when there is none yet). Run after a vLLM restart, before a deploy, and after any failure
    between a deploy and the registry write, so servers and registry agree again."""
    with fleet(loop, "reconcile"):
        return _reconcile(loop)


def _reconcile(loop: Loop) -> dict[str, Any]:
    from tuneloop.deploy import reconcile

    settings = loop.settings
    production = loop.registry.aliases().get("production")
    adapter_dir = _materialize_adapter(loop, production) if production else None
    records = reconcile(
        settings.vllm.endpoints,
        adapter_dir,
        served_name=settings.model.served_model_name,
        base_model=base_model_ref(settings),
        max_lora_rank=settings.vllm.max_lora_rank,
        api_key=settings.vllm.api_key.get_secret_value() if settings.vllm.api_key else None,
        timeout_s=settings.vllm.timeout_s,
        progress=loop.progress,
    )
    changed = sum(r.action != "in_sync" for r in records)
    loop.progress(
        f"reconciled: {len(records)} endpoint(s) serve {production or 'no adapter'} as "
        f"{settings.model.served_model_name!r} ({changed} changed)"
    )
    return {"production": production, "adapter_dir": str(adapter_dir) if adapter_dir else None, "endpoints": [asdict(r) for r in records]}


def _reconcile_after(loop: Loop, err: BaseException) -> NoReturn:
    """After a failure past the swap: put the registry's production back on every endpoint,
    then re-raise ``err`` with what reconcile did (or why it could not)."""
    try:
        done = reconcile_step(loop)
    except Exception as again:
        raise RuntimeError(f"{err}; and reconciling the servers with the registry failed too: {again}") from err
    raise RuntimeError(f"{err}; the servers serve the registry's production ({done['production'] or 'no adapter'}) again") from err


def rollback_step(loop: Loop, target: str = "previous") -> dict[str, Any]:
    """Serve an earlier version again (default: the ``previous`` alias) and move the aliases.
    If verifying or the registry write fails after the swap, every endpoint is reconciled
    back to the registry's production, so servers and registry never disagree."""
    with fleet(loop, f"rollback to {target}"):
        return _rollback(loop, target)


def _rollback(loop: Loop, target: str) -> dict[str, Any]:
    state = loop.registry.state()
    if state.get("run_id") == loop.run_id and str(state.get("reason", "")).startswith("rollback to"):
        # a retry after this run moved the aliases: serve what it rolled back to, move nothing
        version, current = state["aliases"]["production"], state["changed"]["production"]["from"]
        loop.progress(f"this run already rolled back to {version} before a retry: reconciling the servers only")
        reconcile_step(loop)
        return {"version": version, "from": current, "deploy": None, "aliases": state["aliases"]}
    record = loop.registry.resolve(target)
    version = record["version"]
    current = loop.registry.aliases().get("production")
    if version == current:
        raise RuntimeError(f"{version} is already production; nothing to roll back to")
    deploy = deploy_step(loop, version)
    try:
        verify_step(loop, version)
        move = loop.registry.move_aliases({"production": version, "previous": current}, reason=f"rollback to {version} (requested {target!r})", run_id=loop.run_id)
    except Exception as err:
        _reconcile_after(loop, err)
    loop.progress(f"rolled back: production={version} previous={current}")
    return {"version": version, "from": current, "deploy": deploy, "aliases": move["aliases"]}
