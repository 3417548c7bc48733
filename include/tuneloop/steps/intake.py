"""The intake steps: plan which labelled partitions to pull, then check every row (row checks,
intake checks, Great Expectations) and write the dataset snapshot; a failing batch stops here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.steps.loop import parse_day

if TYPE_CHECKING:
    from tuneloop.steps.loop import Loop


def pull_step(loop: Loop, *, since: str | None = None, until: str | None = None, force: bool = False) -> dict[str, Any]:
    """Plan which labelled partitions to use: new ones since the last snapshot, or a range."""
    from tuneloop.intake.pull import NoNewDataError, plan_pull

    start, end = parse_day(since), parse_day(until)
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
    """Row checks, intake checks and the Great Expectations suite, chunk by chunk in bounded
    memory; a failing batch stops the run before training, else the snapshot is written."""
    from pathlib import Path

    from tuneloop.intake.checks import IntakeOptions
    from tuneloop.intake.expectations import DataQualityError, QualitySuite, format_quality_failure
    from tuneloop.intake.pull import PullPlan, intake_batch, spill_dir, write_dataset_snapshot

    plan = PullPlan.from_json(plan_json)
    data = loop.settings.data
    spec = loop.spec
    suite = QualitySuite(spec=spec, pii=data.pii, expectations_file=data.expectations, intake_ran=True, progress=loop.progress)
    with spill_dir(data.spill_dir) as workdir:
        run = intake_batch(
            loop.store, plan, spec, Path(workdir), eval_fraction=data.eval_fraction, options=IntakeOptions.from_settings(loop.settings),
            quality=suite, chunk_rows=data.chunk_rows, progress=loop.progress,
        )
        report = suite.report(
            total=run.total, accepted=run.accepted, reasons=run.reasons, max_quarantine_rate=data.max_quarantine_rate,
            min_accepted_rows=data.min_accepted_rows, intake=run.intake,
        )
        loop.progress(f"quality: {report.accepted} accepted, {report.quarantined} quarantined of {report.total}: {report.reasons}")
        if not report.passed:
            prefix = layout.quality_failure(loop.run_key)
            loop.store.put_jsonl(f"{prefix}/quarantine.jsonl", run.iter_quarantined())
            loop.store.put_json(f"{prefix}/gx_validation_result.json", report.validation_result)
            loop.store.put_json(f"{prefix}/summary.json", report.summary())
            message = format_quality_failure(report) + f"\n  artifacts: {loop.store.uri}/{prefix}/"
            raise DataQualityError(message, report.summary())
        result = write_dataset_snapshot(loop.store, run, plan, spec, eval_fraction=data.eval_fraction, quality=report)
    loop.progress(f"snapshot {result['snapshot'][:12]}: {result['counts']} slices {result['slices']}")
    if loop.tracker is not None:
        loop.tracker.log_snapshot(result)
    return {**result, "quality": report.summary()}
