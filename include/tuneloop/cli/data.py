"""Data commands: start a task (init, check-task), example worlds (demo-world), intake (pull, validate)."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.cli.common import (
    CliError,
    _emit,
    _parse_date,
    _progress,
    _settings,
    _store,
)
from tuneloop.intake.rows import iter_lines, json_objects
from tuneloop.tasks import TaskSpec

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator, Sequence

    from tuneloop.config import Settings
    from tuneloop.intake.expectations import QualityReport, QualitySuite
    from tuneloop.intake.stream import IntakeRun



def cmd_init(args: argparse.Namespace) -> int:
    from tuneloop.tasks.onboarding import init_config

    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to overwrite it")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    data = Path(args.data) if args.data else None
    if data is not None and not data.is_file():
        raise CliError(f"--data {data}: no such file")
    try:
        text = init_config(
            data=data, base_model=args.base_model, store=args.store, format=args.format, metric=args.metric,
            labels=labels, slice_field=args.slice_field, system_prompt=args.system_prompt, json_schema=args.json_schema, name=args.name,
        )
    except ValueError as err:
        raise CliError(f"the config would not load: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    _emit(args, {"config": str(out), "yaml": text}, f"{text}\nwritten to {out}; next: tuneloop check-task --config {out} --data YOUR_ROWS.jsonl")
    return 0


def cmd_check_task(args: argparse.Namespace) -> int:
    from tuneloop.tasks.onboarding import check_task, format_check

    settings = _settings(args)
    data = Path(args.data)
    if not data.is_file():
        raise CliError(f"--data {data}: no such file")
    report = check_task(settings, data, show=args.show, tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else None)
    _emit(args, report, format_check(report))
    gold = report["gold_vs_gold"]
    return 1 if gold["imperfect"] or not report["accepted"] else 0


def cmd_demo_world(args: argparse.Namespace) -> int:
    from tuneloop.demo.worlds import write_world

    settings = _settings(args)
    store = _store(settings)
    summary = write_world(
        args.example, store, args.start, args.days, seed=args.seed, drift_start=args.drift_start,
        traffic_per_day=args.traffic_per_day, labelled_per_day=args.labelled_per_day, bad_row_rate=args.bad_row_rate,
        heldout_per_slice=args.heldout_per_slice, injection_rows=args.injection_rows, progress=_progress(args),
    )
    summary["store"] = store.uri
    config = Path("examples") / args.example / "tuneloop.yaml"
    human = (
        f"{args.example} world written to {store.uri}: {args.days} days from {args.start}"
        + (f", drift from {args.drift_start}" if args.drift_start else ", no drift")
        + f"\n  held-out sets: {summary['heldout']}"
        + "".join(f"\n  suite {key}: {n} rows" for key, n in summary["suites"].items())
        # The example configs live in the source tree, apart from the product: an installed
        # wheel has the generators but not the configs.
        + (f"\n  its task config: {config}" if config.is_file() else
           f"\n  its task config: {config} of a tuneloop source checkout (not in the installed package)")
    )
    _emit(args, summary, human)
    return 0


def _quality_suite(settings: Settings, spec: TaskSpec, progress: Callable[[str], None]) -> QualitySuite:
    """The Great Expectations suite with the ``data`` settings (run on each chunk by intake)."""
    from tuneloop.intake.expectations import QualitySuite

    data = settings.data
    return QualitySuite(spec=spec, pii=data.pii, expectations_file=data.expectations, intake_ran=True, progress=progress)


def _quality_report(run: IntakeRun, settings: Settings) -> QualityReport:
    """The suite's findings over every chunk, with the batch thresholds of ``data``."""
    assert run.quality is not None
    data = settings.data
    return run.quality.report(
        total=run.total, accepted=run.accepted, reasons=run.reasons, max_quarantine_rate=data.max_quarantine_rate,
        min_accepted_rows=data.min_accepted_rows, intake=run.intake,
    )


def cmd_pull(args: argparse.Namespace) -> int:
    from tuneloop.intake.checks import IntakeOptions
    from tuneloop.intake.pull import intake_batch, plan_pull, spill_dir, write_dataset_snapshot

    settings = _settings(args)
    data = settings.data
    store = _store(settings)
    progress = _progress(args)
    plan = plan_pull(store, since=args.since, until=args.until, incremental=args.incremental)
    progress(f"pulling {len(plan.keys)} files from {len(plan.days)} partitions ({plan.days[0]} .. {plan.days[-1]})")
    spec = TaskSpec(settings.task)
    suite = None
    if not args.skip_quality:
        try:
            suite = _quality_suite(settings, spec, progress)
        except ImportError as err:
            raise CliError(f"the quality gate needs great_expectations ({err}): run `.venv/bin/tuneloop pull` or pass --skip-quality") from None
    with spill_dir(data.spill_dir) as workdir:
        run = intake_batch(
            store, plan, spec, Path(workdir), eval_fraction=data.eval_fraction, options=IntakeOptions.from_settings(settings),
            quality=suite, chunk_rows=data.chunk_rows, progress=progress,
        )
        for note in run.intake.notes if run.intake else []:
            progress(note)
        quality = None
        if suite is not None:
            from tuneloop.intake.expectations import format_quality_failure

            quality = _quality_report(run, settings)
            if not quality.passed:
                raise CliError(format_quality_failure(quality) + "\n  no snapshot written")
        result = write_dataset_snapshot(store, run, plan, spec, eval_fraction=data.eval_fraction, quality=quality)
    counts = result["counts"]
    human = [
        f"snapshot {result['snapshot']} from {len(result['partitions'])} partitions: "
        f"{counts['train']} train, {counts['eval']} eval, {counts['quarantined']} quarantined of {counts['total']}"
    ]
    human += [f"  {count:>5}  {reason}" for reason, count in sorted(result["reasons"].items(), key=lambda kv: -kv[1])]
    _emit(args, result, "\n".join(human))
    return 0


def _raw_lines(path: Path) -> Iterator[bytes]:
    """Every record line of ``path`` as bytes (LF, CRLF or CR ends a line), streamed."""
    try:
        handle = open(path, "rb")  # closed by the with-block below
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    with handle:
        yield from iter_lines(handle)


def _eval_records(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Records of ``--eval`` JSONL files, streamed (lines that are not JSON objects are skipped)."""
    for path in paths:
        yield from json_objects(_raw_lines(Path(path)))


def cmd_validate(args: argparse.Namespace) -> int:
    from tuneloop.intake.checks import IntakeOptions, write_review_sample
    from tuneloop.intake.expectations import format_quality_failure
    from tuneloop.intake.pull import spill_dir
    from tuneloop.intake.stream import run_intake

    settings = _settings(args)
    data = settings.data
    progress = _progress(args)
    options = IntakeOptions.from_settings(settings)
    if args.tokenizer_dir:
        options = IntakeOptions(**{**options.__dict__, "model_dir": Path(args.tokenizer_dir)})
    for path in [*args.input, *(args.eval or [])]:  # fail before any work on a file that cannot be opened
        if not os.access(path, os.R_OK) or not Path(path).is_file():
            raise CliError(f"cannot read {path}: {'not a file' if Path(path).exists() else 'No such file or directory'}")
    triples = ((str(path), number, line) for path in args.input for number, line in enumerate(_raw_lines(Path(path)), 1))
    spec = TaskSpec(settings.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with spill_dir(data.spill_dir) as workdir:
        run = run_intake(
            triples, spec, Path(workdir), options=options, eval_records=_eval_records(args.eval or []),
            quality=_quality_suite(settings, spec, progress), chunk_rows=data.chunk_rows, progress=progress,
        )
        intake = run.intake
        assert intake is not None
        for note in intake.notes:
            progress(note)
        quality = _quality_report(run, settings)
        written = {"accepted": 0, "quarantined": 0}
        with open(out / "accepted.jsonl", "w", encoding="utf-8") as handle:
            for record, _, _ in run.iter_accepted(order="input"):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written["accepted"] += 1
        with open(out / "quarantined.jsonl", "w", encoding="utf-8") as handle:
            for row in run.iter_quarantined():
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                written["quarantined"] += 1
        (out / "validation_result.json").write_text(json.dumps(quality.validation_result, indent=2, default=str) + "\n", encoding="utf-8")
        summary = {**quality.summary(), "out": str(out), "inputs": [str(path) for path in args.input], "eval_inputs": list(args.eval or [])}
        if args.review_sample:
            summary["review_sample"] = write_review_sample(run, out, args.review_sample, spec, seed=args.review_seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if run.total != written["accepted"] + written["quarantined"]:  # the invariant the files rest on
        raise CliError(f"internal error: {run.total} lines but {written['accepted']} + {written['quarantined']} written")
    human = [
        f"{'PASSED' if quality.passed else 'FAILED'}: {quality.accepted} accepted, {quality.quarantined} quarantined "
        f"of {quality.total} lines -> {out}/accepted.jsonl, {out}/quarantined.jsonl"
    ]
    human += [f"  {count:>5}  {reason}" for reason, count in sorted(quality.reasons.items(), key=lambda kv: -kv[1])]
    checks = intake.summary()
    labels = checks["labels"]
    human.append(f"  tokens: {checks['tokens']['method']}, max {checks['tokens']['max_tokens']}; chat template: {checks['chat_template']['status']}")
    if data.pii == "redact":
        human.append(f"  pii redacted in {intake.redactions['rows']} rows: {intake.redactions}")
    if labels["multi_labelled_rows"]:
        human.append(f"  label agreement {labels['agreement']:.1%} over {labels['multi_labelled_rows']} multi-labelled rows; per field {labels['field_agreement']}")
    if args.review_sample:
        human.append(f"  review sample: {summary['review_sample']['rows']} rows -> {out}/review_sample.jsonl, {out}/review_sample.csv")
    if not quality.passed:
        human.append(format_quality_failure(quality))
    _emit(args, summary, "\n".join(human))
    return 0 if quality.passed else 1


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register this module's subcommands (each parser next to its handler)."""
    p = sub.add_parser(
        "init",
        parents=[common],
        help="write a loop config for a new task (guessed from --data when given)",
        description="Write a tuneloop config for your own task, like `astro dev init` writes a project: the task "
        "section (format, metric, labels, slices), the base model and the store; every other key keeps its "
        "default. With --data, the format, metric, label set and slice field are guessed from your rows; any "
        "option given wins over the guess. Check the result with `tuneloop check-task`.",
    )
    p.add_argument("--out", default="tuneloop.yaml", help="config file to write (default tuneloop.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--data", metavar="FILE", help="a JSONL sample of your labelled rows to guess the task from")
    p.add_argument("--name", help="task name shown in reports")
    p.add_argument("--format", choices=["prompt_completion", "messages"], help="row format (task.format)")
    p.add_argument("--metric", choices=["exact_match", "label", "json", "text", "judge", "python"], help="the gate's score (task.metric)")
    p.add_argument("--labels", help="comma-separated label set for --metric label")
    p.add_argument("--slice-field", help="record field whose value names the slice (task.slice_field)")
    p.add_argument("--system-prompt", help="system prompt used in training, evaluation and verification")
    p.add_argument("--json-schema", metavar="FILE", help="JSON Schema of the answer for --metric json")
    p.add_argument("--base-model", help="hub id or local directory of the base model (default: the demo model)")
    p.add_argument("--store", help="store URI: a local directory or s3://bucket/prefix")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "check-task",
        parents=[common],
        help="show what the loop makes of your rows: intake, the chat template, gold vs gold, eval size",
        description="Before training: read --data through the task config and show which rows intake would "
        "quarantine and why, what training will see (the chat template applied, system prompt included), "
        "the gold answers scored against themselves (all must score 1.0, else task.metric does not fit the "
        "data) and, per slice, the smallest score difference the gate could detect with the eval rows this "
        "data gives.",
        epilog="Exit status: 0 when the rows fit the task, 1 when gold does not score 1.0 against itself or no row is accepted.",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="a JSONL file of your labelled rows")
    p.add_argument("--show", type=int, default=2, help="rows to show rendered (default 2)")
    p.add_argument("--tokenizer-dir", metavar="DIR", help="directory with the base model's tokenizer and chat template")
    p.set_defaults(func=cmd_check_task)

    p = sub.add_parser(
        "demo-world",
        parents=[common],
        help="generate an example world (traffic logs, labelled batches, held-out sets) into the store",
        description="Write deterministic data of a shipped example into the store in date partitions: "
        "traffic/dt=YYYY-MM-DD/ (production requests) and labelled/dt=YYYY-MM-DD/ (labelled rows), plus "
        "heldout/<slice>.jsonl (and the example's suites, e.g. a prompt-injection set). Use it "
        "with the example's config (--config examples/NAME/tuneloop.yaml). Run it again with a later --start "
        "to roll the world forward.",
    )
    from tuneloop.demo.worlds import EXAMPLES

    p.add_argument("--example", choices=sorted(EXAMPLES), default=next(iter(EXAMPLES)),
                   help="; ".join(f"{name}: {about}" for name, about in EXAMPLES.items()) + f" (default {next(iter(EXAMPLES))})")
    p.add_argument("--start", type=_parse_date, default=date(2026, 1, 1), help="first day (default 2026-01-01)")
    p.add_argument("--days", type=int, default=28, help="number of days to write (default 28)")
    p.add_argument("--drift-start", type=_parse_date, default=None, help="day the drifted domain starts appearing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--traffic-per-day", type=int, default=None, help="requests per day (default: the example's)")
    p.add_argument("--labelled-per-day", type=int, default=None, help="labelled rows per day (default: the example's)")
    p.add_argument("--bad-row-rate", type=float, default=0.0, help="fraction of bad labelled lines to mix in (for the quality gate)")
    p.add_argument("--heldout-per-slice", type=int, default=None, help="rows per held-out set (default: the example's)")
    p.add_argument("--injection-rows", type=int, default=48, help="rows of the prompt-injection suite (default 48)")
    p.set_defaults(func=cmd_demo_world)

    p = sub.add_parser(
        "pull",
        parents=[common],
        help="pull labelled partitions into a content-addressed dataset snapshot",
        description="Reads labelled/dt=*/ partitions in the date range, runs the row checks and the Great "
        "Expectations suite (rows quarantined with reasons; a batch over data.max_quarantine_rate fails), "
        "splits train/eval by a stable hash of the id, and writes snapshots/<sha256>/. Memory is bounded: "
        "data.chunk_rows rows at a time, the accepted rows spilled to data.spill_dir (local disk, about twice "
        "their size).",
    )
    p.add_argument("--since", type=_parse_date, default=None, help="first partition to include (default: all)")
    p.add_argument("--until", type=_parse_date, default=None, help="last partition to include (default: all)")
    p.add_argument("--incremental", action="store_true", help="start after the newest partition of the latest snapshot")
    p.add_argument("--skip-quality", action="store_true", help="row checks only: skip the Great Expectations suite and thresholds")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "validate",
        parents=[common],
        help="check labelled JSONL rows: accepted and quarantined files, reasons, the batch verdict",
        description="Run the intake checks on labelled records, one JSON object per line in the task's format "
        "(task.format: prompt_completion rows {id, prompt, completion} or messages rows {id, messages}; field "
        "names from task.*) and optional labels (a list of answers from several annotators). Each line is "
        "parsed and checked (UTF-8, one JSON object without duplicate keys, the task's fields, the answer fits "
        "task.metric: a label of task.labels, a JSON object matching task.json_schema..., unique id, at most "
        "64 KiB; a row that makes a check fail is quarantined as row_check_error); then the "
        "LLM checks run: prompt + completion tokens within data.max_tokens (default training.max_seq_len; "
        "the base model's tokenizer.json when the tokenizers library is installed, else an approximate "
        "count, named in the summary), the chat template renders, card numbers (Luhn) under data.pii=flag "
        "or redaction under data.pii=redact, labels agree, no near-duplicate of an earlier prompt "
        "(word-shingle Jaccard >= data.near_duplicate_jaccard) and no leak of an --eval prompt; then the "
        "Great Expectations suite runs on the rows that passed (input length, e-mail/phone, injection "
        "markers, and your own expectations from data.expectations). Writes to OUT: accepted.jsonl, quarantined.jsonl (each bad "
        "line verbatim with its source, line number, reasons and, for near_duplicate/eval_leakage, the "
        "matched_id), validation_result.json (GX's full result) and summary.json (with a 'checks' block: "
        "token method, label agreement per field, redaction counts). accepted + quarantined always "
        "equals the number of input lines. Memory is bounded: data.chunk_rows rows at a time, spilled to "
        "data.spill_dir.",
        epilog="Exit status: 0 when the batch passes the thresholds (data.max_quarantine_rate, "
        "data.min_accepted_rows), 1 when it fails them (files are written either way), 2 when an "
        "input cannot be read.",
    )
    p.add_argument("--input", required=True, action="append", help="a JSONL file of labelled rows (repeatable)")
    p.add_argument("--out", required=True, help="directory for accepted.jsonl, quarantined.jsonl and the reports")
    p.add_argument(
        "--eval", action="append", metavar="PATH",
        help="a JSONL file of evaluation rows (repeatable): input rows whose prompt equals or nearly equals one "
        "of theirs are quarantined as eval_leakage",
    )
    p.add_argument(
        "--review-sample", type=int, default=0, metavar="N",
        help="also write N rows, drawn with --review-seed from the accepted rows and the rows held back for "
        "label_disagreement, to OUT/review_sample.jsonl and OUT/review_sample.csv for human review",
    )
    p.add_argument("--review-seed", type=int, default=0, metavar="SEED", help="seed of the review sample (default 0)")
    p.add_argument(
        "--tokenizer-dir", metavar="DIR", default=None,
        help="directory with tokenizer.json and the chat template (default: data.tokenizer_dir, else the base "
        "model's directory when it is local)",
    )
    p.set_defaults(func=cmd_validate)
