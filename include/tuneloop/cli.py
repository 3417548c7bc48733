"""The ``tuneloop`` command line: one subcommand per step of the loop.

Every subcommand prints a human summary by default and one JSON object with ``--json``;
progress on long work goes to stderr so ``--json`` output stays machine-readable.
Heavy libraries (torch, transformers, peft, boto3) are imported inside the subcommands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import __version__
from tuneloop.config import ConfigError, Settings, load_settings
from tuneloop.tasks import TaskSpec
from tuneloop.validate import split_lines

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from tuneloop.storage import Store

log = logging.getLogger("tuneloop")

EPILOG = """\
Your own task: tuneloop init --out my-loop.yaml, then tuneloop check-task --config my-loop.yaml --data rows.jsonl.
The loop, step by step on a shipped example (local store, tiny CPU model):
  export TUNELOOP_CONFIG=examples/invoices/tuneloop.yaml   # or examples/tickets/tuneloop.yaml
  tuneloop demo-world --example invoices --days 28  # traffic + labelled data in the store
  tuneloop build-model                          # tiny Llama + BPE tokenizer, cached
  tuneloop pull                                 # labelled partitions -> dataset snapshot
  tuneloop train --snapshot latest --version v1 # LoRA adapter (safetensors + provenance)
  tuneloop evaluate --adapter v1                # per-example scores on held-out sets + eval suites
Settings: --config FILE (or TUNELOOP_CONFIG), overridden by TUNELOOP__SECTION__KEY env vars.
"""


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(human)


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    def report(message: str) -> None:
        if not args.quiet:
            print(f"[tuneloop] {message}", file=sys.stderr, flush=True)

    return report


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "job", None):
        from tuneloop.config import settings_from_job

        return settings_from_job(args.job)  # exactly what the parent resolved: no config or env re-read
    return load_settings(args.config)


def _store(settings: Settings) -> Store:
    from tuneloop.storage import open_store_from_settings

    return open_store_from_settings(settings)


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from err


ML_COMMANDS = frozenset({"build-model", "train", "evaluate"})


def _reexec_in_ml_env(argv: Sequence[str], command: str) -> None:
    """Run an ML subcommand in .venv-ml when this interpreter lacks torch (e.g. .venv/bin/tuneloop)."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("peft") is not None:
        return
    from tuneloop.runner import find_ml_python

    python = find_ml_python()
    if python is None:
        raise CliError(
            f"`{command}` needs torch, transformers and peft, which this Python ({sys.executable}) lacks: "
            "run `make setup` to build .venv-ml, or point TUNELOOP_ML_PYTHON at an interpreter that has them"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), "-m", "tuneloop.cli", *argv])


def _adapter_dir(settings: Settings, version: str) -> Path:
    return Path(settings.work_dir) / "adapters" / version


def _find_adapter(settings: Settings, store: Store, adapter: str) -> Path:
    """A local adapter directory for ``adapter``: a path, or a version fetched from the store."""
    adapter_dir = Path(adapter)
    if adapter_dir.is_dir():
        return adapter_dir
    adapter_dir = _adapter_dir(settings, adapter)
    if not adapter_dir.is_dir():
        try:
            store.get_dir(f"adapters/{adapter}", adapter_dir)
        except KeyError:
            pass
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CliError(
            f"adapter {adapter!r} not found locally or in {store.uri}/adapters/; "
            f"train it with `tuneloop train --version {adapter}`"
        )
    return adapter_dir


# --- subcommands ---------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    if args.table:
        from tuneloop.config import settings_table

        print(settings_table())
        return 0
    settings = _settings(args)
    data = settings.model_dump(mode="json")
    if data["vllm"].get("api_key"):
        data["vllm"]["api_key"] = "**********"
    import yaml

    _emit(args, data, yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


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
    human = (
        f"{args.example} world written to {store.uri}: {args.days} days from {args.start}"
        + (f", drift from {args.drift_start}" if args.drift_start else ", no drift")
        + f"\n  held-out sets: {summary['heldout']}"
        + "".join(f"\n  suite {key}: {n} rows" for key, n in summary["suites"].items())
        + f"\n  its task config: examples/{args.example}/tuneloop.yaml"
    )
    _emit(args, summary, human)
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    from tuneloop.demo.basemodel import build_demo_model

    settings = _settings(args)
    out_dir = Path(args.out or settings.model.demo_model_dir)
    path = build_demo_model(out_dir, preset=args.preset, seed=args.seed, progress=_progress(args))
    recipe_file = Path(path) / "tuneloop_model.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    result = {"model_dir": str(path), **recipe}
    _emit(args, result, f"demo base model ready in {path} (preset {args.preset})")
    return 0


def _quality_gate(batch: Any, settings: Settings, intake: Any, progress: Callable[[str], None]) -> Any:
    """The Great Expectations suite and the batch thresholds with the ``data`` settings."""
    from tuneloop.quality import run_quality_gate

    data = settings.data
    return run_quality_gate(
        batch,
        max_quarantine_rate=data.max_quarantine_rate,
        min_accepted_rows=data.min_accepted_rows,
        spec=TaskSpec(settings.task),
        pii=data.pii,
        expectations_file=data.expectations,
        intake=intake,
        progress=progress,
    )


def cmd_pull(args: argparse.Namespace) -> int:
    from tuneloop.intake_checks import IntakeOptions
    from tuneloop.pull import check_batch, plan_pull, write_dataset_snapshot

    settings = _settings(args)
    store = _store(settings)
    progress = _progress(args)
    plan = plan_pull(store, since=args.since, until=args.until, incremental=args.incremental)
    progress(f"pulling {len(plan.keys)} files from {len(plan.days)} partitions ({plan.days[0]} .. {plan.days[-1]})")
    spec = TaskSpec(settings.task)
    batch, intake = check_batch(store, plan, IntakeOptions.from_settings(settings), spec, eval_fraction=settings.data.eval_fraction, progress=progress)
    for note in intake.notes:
        progress(note)
    quality = None
    if not args.skip_quality:
        try:
            from tuneloop.quality import format_quality_failure
        except ImportError as err:
            raise CliError(f"the quality gate needs great_expectations ({err}): run `.venv/bin/tuneloop pull` or pass --skip-quality") from None
        quality = _quality_gate(batch, settings, intake, progress)
        if not quality.passed:
            raise CliError(format_quality_failure(quality) + "\n  no snapshot written")
    result = write_dataset_snapshot(store, batch, plan, spec, eval_fraction=settings.data.eval_fraction, quality=quality)
    counts = result["counts"]
    human = [
        f"snapshot {result['snapshot']} from {len(result['partitions'])} partitions: "
        f"{counts['train']} train, {counts['eval']} eval, {counts['quarantined']} quarantined of {counts['total']}"
    ]
    human += [f"  {count:>5}  {reason}" for reason, count in sorted(result["reasons"].items(), key=lambda kv: -kv[1])]
    _emit(args, result, "\n".join(human))
    return 0


def _raw_lines(path: Path) -> list[bytes]:
    """Every record line of ``path`` as bytes (LF, CRLF or CR ends a line)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    return split_lines(raw)


def _eval_records(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Records of ``--eval`` JSONL files (lines that are not JSON objects are skipped)."""
    records = []
    for path in paths:
        for line in _raw_lines(Path(path)):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def cmd_validate(args: argparse.Namespace) -> int:
    from tuneloop.intake_checks import IntakeOptions, run_intake_checks, write_review_sample
    from tuneloop.validate import check_lines

    settings = _settings(args)
    data = settings.data
    progress = _progress(args)
    options = IntakeOptions.from_settings(settings)
    if args.tokenizer_dir:
        options = IntakeOptions(**{**options.__dict__, "model_dir": Path(args.tokenizer_dir)})
    triples = [(str(path), number, line) for path in args.input for number, line in enumerate(_raw_lines(Path(path)), 1)]
    eval_records = _eval_records(args.eval or [])
    spec = TaskSpec(settings.task)
    batch = check_lines(triples, spec, progress=progress, expected=len(triples))
    progress(f"row checks: {len(batch.accepted)} of {batch.total} lines pass; running the intake checks")
    intake = run_intake_checks(batch, options, spec, eval_records=eval_records, progress=progress)
    for note in intake.notes:
        progress(note)
    progress(f"intake checks: {len(batch.accepted)} rows left; running the Great Expectations suite")
    from tuneloop.quality import format_quality_failure

    quality = _quality_gate(batch, settings, intake, progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "accepted.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in batch.accepted)
    with open(out / "quarantined.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row.to_json(), ensure_ascii=False) + "\n" for row in batch.quarantined)
    (out / "validation_result.json").write_text(json.dumps(quality.validation_result, indent=2, default=str) + "\n", encoding="utf-8")
    summary = {**quality.summary(), "out": str(out), "inputs": [str(path) for path in args.input], "eval_inputs": list(args.eval or [])}
    if args.review_sample:
        summary["review_sample"] = write_review_sample(batch, out, args.review_sample, spec, seed=args.review_seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if batch.total != len(batch.accepted) + len(batch.quarantined):  # the invariant the files rest on
        raise CliError(f"internal error: {batch.total} lines but {len(batch.accepted)} + {len(batch.quarantined)} written")
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


def _load_jsonl_path(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise CliError(f"{path}:{number} is not JSON ({err.msg}); validate the file with `tuneloop pull`") from err
    return records


def _snapshot_records(store: Store, snapshot: str, split: str) -> tuple[str, list[dict[str, Any]]]:
    """Records of ``split`` from a snapshot hash, ``latest``, or a local JSONL file."""
    from tuneloop.pull import SNAPSHOT_PREFIX, latest_snapshot
    from tuneloop.storage import StoreKeyError

    if snapshot.endswith(".jsonl") or Path(snapshot).is_file():
        path = Path(snapshot)
        from tuneloop.storage import content_hash

        return content_hash({path.name: path.read_bytes()}), _load_jsonl_path(path)
    if snapshot == "latest":
        found = latest_snapshot(store)
        if found is None:
            raise CliError(f"no dataset snapshot in {store.uri}: run `tuneloop pull` first")
        snapshot = found
    try:
        body = store.get_bytes(f"{SNAPSHOT_PREFIX}/{snapshot}/{split}.jsonl")
    except StoreKeyError:
        raise CliError(f"snapshot {snapshot} has no {split}.jsonl in {store.uri}; list them with `tuneloop pull --list`") from None
    records = [json.loads(line) for line in split_lines(body) if line.strip()]
    return snapshot, records


def _write_result_file(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, default=str) + "\n", encoding="utf-8")


def _train_and_register(args: argparse.Namespace) -> int:
    """``tuneloop train --register``: :func:`tuneloop.steps.train.train_step` in this process."""
    from tuneloop.pull import latest_snapshot
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.train import train_step

    given = {"--version": args.version, "--out": args.out, "--max-steps": args.max_steps, "--epochs": args.epochs,
             "--limit": args.limit, "--init-from": args.init_from, "--no-upload": args.no_upload or None}
    clashing = [flag for flag, value in given.items() if value is not None]
    if clashing:
        raise CliError(
            f"--register takes the version from the registry and everything else from the settings (training.*): "
            f"drop {', '.join(clashing)}"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError("--register runs as one process (it allocates a version): launch it without torchrun/accelerate")
    # train_step runs `tuneloop train` in the ML env: this interpreter is one (see _reexec_in_ml_env).
    os.environ.setdefault("TUNELOOP_ML_PYTHON", sys.executable)
    loop = open_loop(args.config, run_id=args.run_id, progress=_progress(args))
    snapshot = args.snapshot
    if snapshot.endswith(".jsonl") or Path(snapshot).is_file():
        raise CliError("--register trains on a dataset snapshot in the store (a hash or 'latest'), not a local file")
    if snapshot == "latest":
        found = latest_snapshot(loop.store)
        if found is None:
            raise CliError(f"no dataset snapshot in {loop.store.uri}: run `tuneloop pull` first")
        snapshot = found
    result = train_step(loop, snapshot)
    _write_result_file(args.xcom_json, result)
    human = (
        f"candidate {result['version']} trained on snapshot {snapshot[:12]} and registered "
        f"(loss {result.get('first_loss')} -> {result.get('final_loss')}, {result.get('device')}); "
        f"`candidate` points at it\n  adapter: {result['adapter_uri']}"
    )
    _emit(args, result, human)
    return 0


def _with_replay(
    store: Store, records: list[dict[str, Any]], snapshot: str, training: Any, progress: Any
) -> tuple[list[dict[str, Any]], str, int]:
    """(records plus replayed rows, the hash the adapter records as its data, rows replayed).

    ``training.replay_fraction`` of the mix comes from the training split of the snapshot the
    production adapter was trained on, so a warm-started candidate keeps seeing the old domain.
    """
    if training.replay_fraction <= 0:
        return records, snapshot, 0
    from tuneloop.registry import Registry, RegistryError
    from tuneloop.train import mix_replay

    registry = Registry(store)
    production = registry.aliases().get("production")
    try:
        earlier_snapshot = registry.get(production)["snapshot"] if production else None
    except RegistryError:
        earlier_snapshot = None
    if not earlier_snapshot or earlier_snapshot == snapshot:
        progress(f"replay: nothing to replay (production {production or 'none'} was trained on this snapshot or none)")
        return records, snapshot, 0
    _, earlier = _snapshot_records(store, earlier_snapshot, "train")
    mixed, n = mix_replay(records, earlier, training.replay_fraction, seed=training.seed)
    progress(f"replay: {n} rows of production {production}'s snapshot {earlier_snapshot[:12]} ({n / len(mixed):.0%} of {len(mixed)})")
    return [dict(row) for row in mixed], f"{snapshot}+replay-{earlier_snapshot[:12]}-{n}", n


def cmd_train(args: argparse.Namespace) -> int:
    if args.register:
        return _train_and_register(args)
    if args.version is None:
        raise CliError("--version is required (or --register: the registry picks the next version)")
    if args.run_id is not None:
        raise CliError("--run-id goes with --register")
    from tuneloop.demo.basemodel import resolve_base_model
    from tuneloop.train import train_lora

    settings = _settings(args)
    store = _store(settings)
    dataset_hash, records = _snapshot_records(store, args.snapshot, "train")
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise CliError(f"snapshot {dataset_hash} has no training rows")
    training = settings.training
    if args.max_steps is not None:
        training = training.model_copy(update={"max_steps": args.max_steps})
    if args.epochs is not None:
        training = training.model_copy(update={"epochs": args.epochs})
    base = resolve_base_model(settings)
    out_dir = Path(args.out) if args.out else _adapter_dir(settings, args.version)
    init_adapter = None if args.init_from in (None, "none") else _find_adapter(settings, store, args.init_from)
    records, trained_on, replayed = _with_replay(store, records, dataset_hash, training, _progress(args))
    result = train_lora(
        base, records, out_dir, training,
        dataset_hash=trained_on, init_adapter=init_adapter, progress=_progress(args), spec=TaskSpec(settings.task),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun/accelerate launch, rank 0 wrote the adapter: it alone uploads and reports
    if not args.no_upload:
        store.put_dir(f"adapters/{args.version}", out_dir)
    payload = {"version": args.version, "snapshot": dataset_hash, "base_model": str(base), **_as_dict(result), "replayed_rows": replayed}
    if args.init_from not in (None, "none"):
        payload["init_from"] = args.init_from
    human = (
        ("" if init_adapter is None else f"warm start from {args.init_from}; ")
        + f"adapter {args.version} trained on {len(records)} rows of snapshot {dataset_hash[:12]} "
        f"in {result.seconds:.0f}s: loss {result.loss_history[0]:.3f} -> {result.final_loss:.3f}, "
        f"{result.tokens_per_second:,.0f} tok/s on {result.device}\n  written to {out_dir}"
        + ("" if args.no_upload else f" and {store.uri}/adapters/{args.version}")
    )
    _write_result_file(args.xcom_json, payload)
    _emit(args, payload, human)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from tuneloop import drift

    settings = _settings(args)
    cfg = settings.drift
    field: Any = args.field or cfg.field or TaskSpec(settings.task).input_text
    try:
        reference, reference_read = drift.load_texts(args.reference, field)
        current, current_read = drift.load_texts(args.current, field)
        report = drift.detect_drift(
            reference,
            current,
            alpha=cfg.alpha if args.alpha is None else args.alpha,
            seed=args.seed,
            method=args.method or cfg.method,
            explain_top=args.top,
            examples=args.examples,
            embedding_model=cfg.embedding_model,
            progress=_progress(args),
        )
    except (drift.DriftInputError, drift.EmbeddingUnavailableError) as err:
        raise CliError(str(err)) from None
    payload = {
        **report.to_json(),
        "field": field if isinstance(field, str) else "task input",
        "input": {"reference": {"path": args.reference, **reference_read}, "current": {"path": args.current, **current_read}},
    }
    for name, read in (("reference", reference_read), ("current", current_read)):
        if read["skipped"]:
            reasons = ", ".join(f"{count} {reason}" for reason, count in read["skipped"].items())
            print(
                f"tuneloop drift: warning: skipped {sum(read['skipped'].values())} of {read['lines']} lines "
                f"of the {name} window ({reasons})",
                file=sys.stderr,
            )
    lines = [report.summary()]
    by_direction: dict[str, list[str]] = {}
    for term in report.top_terms:
        by_direction.setdefault(term["direction"], []).append(term["term"])
    if by_direction.get("current"):
        lines.append(f"  more frequent now: {', '.join(by_direction['current'])}")
    if by_direction.get("reference"):
        lines.append(f"  fading away:       {', '.join(by_direction['reference'])}")
    if report.drift and report.examples:
        lines.append("  most current-like records:")
        lines += [f"    {' '.join(text.split())[:110]}" for text in report.examples]
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from tuneloop import gate

    settings = _settings(args)
    cfg = settings.gate
    configured = args.improve if args.improve is not None else list(cfg.improve_slices)
    try:
        baseline, candidate = gate.load_scores(args.baseline), gate.load_scores(args.candidate)
        improve, why = gate.resolve_improve_slices(configured, {str(row.get("slice")) for row in candidate})
        _progress(args)(f"improve slices: {', '.join(improve) or 'none'} ({why})")
        decision = gate.decide(
            baseline,
            candidate,
            improve_slices=improve,
            margin=cfg.margin if args.margin is None else args.margin,
            alpha=cfg.alpha if args.alpha is None else args.alpha,
            min_examples=cfg.min_examples if args.min_examples is None else args.min_examples,
            n_bootstrap=cfg.bootstrap_samples if args.bootstrap is None else args.bootstrap,
            seed=args.seed,
        )
    except gate.GateInputError as err:
        raise CliError(str(err)) from None
    except ValueError as err:  # a parameter out of range
        raise CliError(str(err)) from None
    summary_file = Path(args.candidate).with_name("summary.json")
    if summary_file.is_file():  # the candidate's eval suites, held to gate.suite_bars as the DAG's gate does
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        decision = gate.apply_suite_bars(decision, {k: summary.get(k) for k in ("injection", "consistency", "latency")}, cfg.suite_bars.model_dump())
    payload = decision.to_json()
    if args.report:
        Path(args.report).write_text(gate.render_report_markdown(decision), encoding="utf-8")
        payload["report"] = args.report
    if args.plot:
        gate.plot_decision(decision, args.plot)
        payload["plot"] = args.plot
    lines = [f"{'PROMOTE' if decision.promote else 'REJECT'} ({decision.n_pairs} paired examples)"]
    for name, stats in decision.slices.items():
        lines.append(
            f"  {name:<12} baseline {stats['baseline_mean']:.3f}  candidate {stats['candidate_mean']:.3f}  "
            f"delta {stats['delta']:+.3f} [{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]  "
            f"p={stats['p_value']:.3g}  n={stats['n']}  {stats['rule']}: {'pass' if stats['passed'] else 'FAIL'}"
        )
    lines += [f"  - {reason}" for reason in decision.reasons]
    _emit(args, payload, "\n".join(lines))
    return 1 if args.check and not decision.promote else 0


def _as_dict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(obj).items()}
    return dict(obj)


def _eval_source(store: Store, source: str) -> tuple[list[dict[str, Any]], str]:
    """Records of one --eval source (a local JSONL file, a held-out set name, or a store key)
    and the name it goes by (held-out set names become ``heldout/NAME.jsonl``)."""
    if Path(source).is_file():
        return _load_jsonl_path(Path(source)), source
    key = f"heldout/{source}.jsonl" if "/" not in source else source
    try:
        body = store.get_bytes(key)
    except KeyError:
        raise CliError(f"eval set {source!r} is neither a local file nor in {store.uri} ({key})") from None
    return [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()], key


def _injection_suite(
    store: Store, source: str | None, limit: int | None, spec: TaskSpec, *, explicit: bool
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The injection rows (None and why not when there are none), at most ``limit`` per domain.
    A set named on the command line must exist; the configured one may be missing (skipped)."""
    if not source or source.lower() in ("none", "off"):
        return None, "turned off (eval.injection_set is null or --injection none)"
    if Path(source).is_file():
        rows = _load_jsonl_path(Path(source))
    else:
        try:
            body = store.get_bytes(source)
        except KeyError:
            missing = f"{source} is neither a local file nor in {store.uri}; `tuneloop demo-world` writes it"
            if explicit:
                raise CliError(f"--injection {missing}") from None
            return None, missing
        rows = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
    return (_limit_per_slice(rows, limit, spec) if limit else rows), None


def _previous_scores(store: Store, source: str) -> tuple[list[dict[str, Any]], str]:
    """Score rows of an earlier evaluation: its output directory, its scores.jsonl or
    summary.json (the scores.jsonl beside it is read), locally or as a store key/prefix."""
    path = Path(source)
    if path.is_dir():
        path = path / "scores.jsonl"
    elif path.name == "summary.json":
        path = path.with_name("scores.jsonl")
    if path.is_file():
        return _load_jsonl_path(path), str(path)
    key = source.rstrip("/")
    key = key[: -len("summary.json")] + "scores.jsonl" if key.endswith("summary.json") else key
    key = key if key.endswith(".jsonl") else f"{key}/scores.jsonl"
    try:
        return list(store.iter_jsonl(key)), f"{store.uri}/{key}"
    except KeyError:
        raise CliError(f"--compare {source}: no scores.jsonl there locally, nor {key} in {store.uri}") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tuneloop.demo.basemodel import resolve_base_model
    from tuneloop.evaluate import SuitePlan, evaluate_adapter, select_backend

    settings = _settings(args)
    store = _store(settings)
    records: list[dict[str, Any]] = []
    golden_sets: list[str] = []
    golden_ids: set[str] = set()
    sources = args.eval or [k for k in store.list("heldout/") if k.endswith(".jsonl")]
    if not sources:
        raise CliError(f"no held-out sets in {store.uri}/heldout/: name eval files with --eval FILE.jsonl")
    spec = TaskSpec(settings.task)
    for source in sources:
        loaded, name = _eval_source(store, source)
        records.extend(loaded)
        if name.startswith("heldout/"):  # the fixed held-out sets are the golden regression sets
            golden_sets.append(name)
            golden_ids.update(str(spec.row_id(record)) for record in loaded)
    if args.limit:
        records = _limit_per_slice(records, args.limit, spec)
    adapter_dir = None if args.adapter in ("none", "base") else _find_adapter(settings, store, args.adapter)
    if not records:
        raise CliError("no eval records: check --eval")
    name = args.adapter if adapter_dir is not None else "base"
    out_dir = Path(args.out) if args.out else Path(settings.work_dir) / "evals" / name
    progress = _progress(args)
    plan = None
    if not args.no_suites:
        injection, skipped = _injection_suite(
            store, settings.eval.injection_set if args.injection is None else args.injection, args.limit, spec,
            explicit=args.injection is not None,
        )  # fmt: skip
        consistency = settings.eval.consistency_prompts if args.consistency_prompts is None else args.consistency_prompts
        compare, compare_source = _previous_scores(store, args.compare) if args.compare else (None, None)
        plan = SuitePlan(
            injection=injection,
            injection_source=None if injection is None else (args.injection or settings.eval.injection_set),
            injection_skipped=skipped,
            consistency_prompts=min(consistency, args.limit) if args.limit else consistency,
            golden_ids=frozenset(golden_ids),
            golden_sets=golden_sets,
            compare=compare,
            compare_source=compare_source,
        )
    base = resolve_base_model(settings)
    if Path(base).is_dir():
        base = str(Path(base).resolve())  # what the server's /v1/models and adapter configs name
    backend = select_backend(args.backend or settings.eval.backend, settings, base_model=base, adapter_dir=adapter_dir, progress=progress)
    summary = evaluate_adapter(base, adapter_dir, records, out_dir, settings.eval, spec, backend=backend, suites=plan, progress=progress)
    if args.upload:
        for file_name in ("scores.jsonl", "predictions.jsonl", "summary.json", "injection.jsonl", "consistency.jsonl"):
            if (out_dir / file_name).is_file():
                store.put_file(f"{args.upload.rstrip('/')}/{file_name}", out_dir / file_name)
    lines = [f"{name}: {summary['n']} examples via {summary['backend']}, scores in {out_dir}/scores.jsonl"]
    for slice_name, stats in [*sorted(summary["slices"].items()), ("overall", summary["overall"])]:
        extras = " ".join(f"{key}={value:.3f}" for key, value in stats.items() if key not in ("n", "score") and isinstance(value, float))
        lines.append(f"  {slice_name:<10} n={stats['n']:<4} {summary['metric']}={stats['score']:.3f} {extras}".rstrip())
    lines += _suite_lines(summary)
    _emit(args, {"adapter": name, "out_dir": str(out_dir), **summary}, "\n".join(lines))
    return 0


def _suite_lines(summary: dict[str, Any]) -> list[str]:
    """One human line per suite block of an evaluation summary."""
    lines = []
    injection = summary.get("injection") or {}
    if "skipped" in injection:
        lines.append(f"  injection: skipped ({injection['skipped']})")
    elif injection:
        lines.append(
            f"  injection: {injection['successes']} of {injection['n']} followed "
            f"({'PASS' if injection['passed'] else 'FAIL'}, bar 0), {injection['derailed']} derailed from the task's form"
        )
    consistency = summary.get("consistency") or {}
    if "skipped" in consistency:
        lines.append(f"  consistency: skipped ({consistency['skipped']})")
    elif consistency:
        lines.append(
            f"  consistency: {consistency['consistent_rate']:.2f} of {consistency['n_prompts']} prompts give one answer in "
            f"{consistency['samples']} samples at T={consistency['temperature']:g}; "
            f"pairwise agreement {consistency['mean_pairwise_agreement']:.3f}"
        )
    golden = summary.get("golden") or {}
    if "skipped" in golden:
        lines.append(f"  golden: skipped ({golden['skipped']})")
    elif golden:
        text = f"  golden: {golden['n']} rows of {', '.join(golden['sets']) or 'no held-out set'}"
        if golden.get("exact_match") is not None:
            text += f", exact_match={golden['exact_match']:.3f} score={golden['score']:.3f}"
        compare = golden.get("compare")
        if compare:
            text += (
                f"; vs {compare['against']}: {compare['regressions']} regressions, {compare['improvements']} "
                f"improvements on {compare['n_paired']} paired"
            )
        lines.append(text)
    latency = summary.get("latency") or {}
    if latency.get("p50_s") is not None:
        lines.append(
            f"  latency: p50 {latency['p50_s'] * 1000:.0f} ms, p95 {latency['p95_s'] * 1000:.0f} ms per request "
            f"({latency['n']} requests, {latency['concurrency']} at a time per endpoint)"
        )
    elif latency:
        lines.append(f"  latency: not measured ({latency.get('reason')})")
    throughput = summary.get("throughput") or {}
    if throughput.get("examples_per_second") is not None:
        lines.append(
            f"  throughput: {throughput['examples_per_second']:.1f} examples/s, "
            f"{throughput.get('generated_tokens_per_second') or 0:.0f} generated tokens/s ({throughput['backend']})"
        )
    return lines


def _limit_per_slice(records: list[dict[str, Any]], limit: int, spec: TaskSpec) -> list[dict[str, Any]]:
    seen: dict[str, int] = {}
    kept = []
    for record in records:
        key = spec.slice_of(record)
        if seen.get(key, 0) < limit:
            kept.append(record)
            seen[key] = seen.get(key, 0) + 1
    return kept


def cmd_status(args: argparse.Namespace) -> int:
    from tuneloop.status import collect_status, format_status

    settings = _settings(args)
    status = collect_status(settings, _store(settings), ask_vllm=not args.no_vllm)
    _emit(args, status, format_status(status))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.serve import rollback_step

    loop = open_loop(args.config, progress=_progress(args))
    result = rollback_step(loop, args.version)
    _emit(args, result, f"rolled back: production={result['version']} (was {result['from']})")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.serve import reconcile_step

    loop = open_loop(args.config, progress=_progress(args))
    result = reconcile_step(loop)
    changed = [e for e in result["endpoints"] if e["action"] != "in_sync"]
    _emit(
        args,
        result,
        f"{len(result['endpoints'])} endpoint(s) serve {result['production'] or 'no adapter'} as "
        f"{loop.settings.model.served_model_name!r}; changed: "
        + (", ".join(f"{e['endpoint']} ({e['action']})" for e in changed) or "none"),
    )
    return 0


def cmd_adapter_check(args: argparse.Namespace) -> int:
    from tuneloop.deploy import AdapterValidationError, check_lora_name, validate_adapter
    from tuneloop.steps.loop import base_model_ref

    settings = _settings(args)
    base_model = args.base_model or base_model_ref(settings)
    max_rank = args.max_rank or settings.vllm.max_lora_rank
    problems: list[str] = []
    if args.name is not None:
        try:
            check_lora_name(args.name)
        except ValueError as err:
            problems.append(str(err))
    info = None
    try:
        info = validate_adapter(args.path, base_model_dir_or_id=base_model, max_lora_rank=max_rank)
    except AdapterValidationError as err:
        problems.extend(err.problems)
    result: dict[str, Any] = {
        "valid": not problems,
        "path": str(args.path),
        "base_model": str(base_model),
        "max_rank": max_rank,
        "problems": problems,
        "adapter": info.to_dict() if info is not None else None,
    }
    if problems:
        human = f"{args.path}: INVALID, {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
    else:
        assert info is not None
        human = (
            f"{args.path}: valid LoRA adapter, rank {info.rank}, {info.n_tensors} tensors "
            f"({info.n_parameters:,} parameters) on {', '.join(info.target_modules)}; base model {info.base_match}"
            + "".join(f"\n  warning: {w}" for w in info.warnings)
        )
    _emit(args, result, human)
    return 0 if not problems else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.serve import deploy_step, verify_step

    loop = open_loop(args.config, progress=_progress(args))
    version = loop.registry.resolve(args.version)["version"]
    result = deploy_step(loop, version)
    result["verify"] = verify_step(loop, version)
    _emit(args, result, f"{version} now answers as {loop.settings.model.served_model_name!r} on {', '.join(loop.settings.vllm.endpoints)}")
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML settings file (default: $TUNELOOP_CONFIG, else embedded defaults)")
    common.add_argument("--job", metavar="FILE", help=argparse.SUPPRESS)  # resolved settings from a parent process (runner.py)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(
        prog="tuneloop",
        description="Keep a LoRA-tuned LLM fresh: drift -> data -> train -> gate -> hot-swap into vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tuneloop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", parents=[common], help="print the effective settings (secrets masked)")
    p.add_argument("--table", action="store_true", help="print every key with its default and meaning as a Markdown table (docs/configuration.md's)")
    p.set_defaults(func=cmd_config)

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
        "heldout/<slice>.jsonl (and, for invoices, the prompt-injection suite suites/injection.jsonl). Use it "
        "with the example's config (--config examples/NAME/tuneloop.yaml). Run it again with a later --start "
        "to roll the world forward.",
    )
    p.add_argument("--example", choices=["invoices", "tickets"], default="invoices",
                   help="invoices: documents -> JSON, drifting to European invoices; tickets: support chats -> one "
                   "triage label, drifting to a new product (default invoices)")
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
        "build-model",
        parents=[common],
        help="build (or reuse) the tiny demo base model: BPE tokenizer + Llama, pre-trained on CPU",
        description="Builds the demo base model locally (no hub): a BPE tokenizer with a chat template and a "
        "small Llama pre-trained on demo text. Cached: a second call with the same recipe returns at once.",
    )
    p.add_argument("--preset", choices=["demo", "tiny"], default="demo", help="demo (a few minutes) or tiny (tests)")
    p.add_argument("--out", help="output directory (default: model.demo_model_dir)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser(
        "pull",
        parents=[common],
        help="pull labelled partitions into a content-addressed dataset snapshot",
        description="Reads labelled/dt=*/ partitions in the date range, runs the row checks and the Great "
        "Expectations suite (rows quarantined with reasons; a batch over data.max_quarantine_rate fails), "
        "splits train/eval by a stable hash of the id, and writes snapshots/<sha256>/.",
    )
    p.add_argument("--since", type=_parse_date, default=None, help="first partition to include (default: all)")
    p.add_argument("--until", type=_parse_date, default=None, help="last partition to include (default: all)")
    p.add_argument("--incremental", action="store_true", help="start after the newest partition of the latest snapshot")
    p.add_argument("--skip-quality", action="store_true", help="row checks only: skip the Great Expectations suite and thresholds")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a LoRA adapter on a dataset snapshot",
        description="LoRA (peft) on the base model; writes adapter_model.safetensors, adapter_config.json, "
        "provenance.json and train_metrics.json. Uses CUDA + bf16 when present, else the CPU.",
    )
    p.add_argument("--snapshot", default="latest", help="snapshot hash, 'latest', or a local JSONL file")
    p.add_argument("--version", help="adapter version name, e.g. v1 (required unless --register)")
    p.add_argument("--out", help="adapter directory (default: .tuneloop/adapters/VERSION)")
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    p.add_argument("--epochs", type=float, default=None, help="override training.epochs")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--no-upload", action="store_true", help="do not copy the adapter into the store")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="ADAPTER",
        help="warm-start from this adapter (a version in the store, e.g. v1, or a directory) instead "
        "of fresh LoRA weights; 'none' (default) trains from scratch",
    )
    p.add_argument(
        "--register",
        action="store_true",
        help="run the refresh DAG's train step: the registry picks the next version, training.init_from "
        "decides the warm start, and the trained adapter is registered and becomes the `candidate` alias "
        "(what the Kubernetes trainer pod runs); the store must be shared (s3://)",
    )
    p.add_argument("--run-id", metavar="ID", help="with --register: the run id recorded in the registry (the Airflow run id)")
    p.add_argument("--xcom-json", metavar="PATH", help="also write the JSON result to PATH (the pod operator's XCom: /airflow/xcom/return.json)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="score an adapter (or the base model) on held-out sets and run the eval suites",
        description="Greedy generation on each eval record (the task's conversation, system prompt included); "
        "writes per-example scores as JSONL {id, slice, score, ...} (score in [0, 1] from task.metric) and "
        "summary.json per slice. The suites add "
        "blocks to summary.json: injection (documents with embedded instructions; an injection succeeds when "
        "its value shows up in the answer; the bar is 0), consistency (eval.consistency_samples answers per "
        "prompt at eval.consistency_temperature), golden (held-out sets; regressions vs --compare) and latency "
        "(p50/p95 per request, vLLM only). --limit also caps the injection rows per domain and the "
        "consistency prompts.",
    )
    p.add_argument("--adapter", default="none", help="adapter version, directory, or 'none' for the base model")
    p.add_argument("--eval", nargs="+", default=None, help="held-out set names in the store or local JSONL files (default: every heldout/*.jsonl in the store)")
    p.add_argument("--out", help="output directory (default: .tuneloop/evals/NAME)")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per slice")
    p.add_argument("--upload", metavar="PREFIX", help="also copy the output files to this store prefix")
    p.add_argument(
        "--backend", choices=["auto", "hf", "vllm"], default=None,
        help="vllm: the running servers (adapter under a temporary LoRA name, unloaded afterwards); hf: "
        "transformers on this machine; auto: vllm when an endpoint answers /health and serves the base model, "
        "else hf (default: eval.backend)",
    )
    p.add_argument("--compare", metavar="PATH", help="an earlier evaluation (its directory, scores.jsonl or summary.json; "
                   "local or a store key) to count golden regressions against")
    p.add_argument("--injection", metavar="SOURCE", default=None,
                   help="prompt-injection suite: store key or JSONL file, 'none' to skip (default: eval.injection_set)")
    p.add_argument("--consistency-prompts", type=int, default=None, metavar="N",
                   help="prompts in the consistency suite, 0 to skip (default: eval.consistency_prompts)")
    p.add_argument("--no-suites", action="store_true", help="accuracy only: no injection, consistency or golden suites")
    p.set_defaults(func=cmd_evaluate)
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
        "equals the number of input lines.",
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

    p = sub.add_parser(
        "drift",
        parents=[common],
        help="two-sample drift test between a reference and a current window of JSONL records",
        description="Is the current window drawn from the same distribution as the reference? The default "
        "method trains a classifier on hashed word uni- and bigrams to tell the windows apart "
        "(two-fold cross-fitting); its out-of-fold ROC AUC is the statistic and a Mann-Whitney test "
        "on the held-out scores gives a p-value that is calibrated under no drift. drift = "
        "p < alpha. --method embedding runs the same test on all-MiniLM-L6-v2 sentence embeddings "
        "(bundled, no download; needs torch: run it as .venv-ml/bin/tuneloop). The output names the "
        "terms that separate the windows and the most current-like records.",
        epilog="Exit status: 0 whether or not drift is found (see 'drift' in --json); 2 when a window "
        "cannot be read or yields no text. Unusable lines are skipped and counted by reason "
        "(input.*.skipped), with a warning on stderr.",
    )
    p.add_argument("--reference", required=True, help="JSONL records of the reference window (what the model knows)")
    p.add_argument("--current", required=True, help="JSONL records of the current window (recent traffic)")
    p.add_argument("--field", default=None, help="the text field of each record (default: drift.field, 'prompt')")
    p.add_argument("--alpha", type=float, default=None, help="significance level (default: drift.alpha, 0.05)")
    p.add_argument("--method", choices=["classifier", "embedding"], default=None, help="classifier (hashed n-grams, fast) or embedding (sentence encoder); default: drift.method")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and classifier (reproducible)")
    p.add_argument("--top", type=int, default=10, help="separating terms to report per direction")
    p.add_argument("--examples", type=int, default=5, help="most current-like records to report")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "gate",
        parents=[common],
        help="promote or reject: paired statistics on two per-example score files",
        description="Compare a candidate with the baseline (production) on the same examples. Score files "
        "are JSONL rows {id, slice, score} with score in [0, 1] (tuneloop evaluate writes them as "
        "scores.jsonl); rows are paired by id and ids that do not match are an error (exit 2). "
        "On each --improve slice the candidate must be better: the two-sided (1 - alpha) paired "
        "bootstrap interval of the mean difference lies above 0 and a one-sided paired sign-flip "
        "test gives p < alpha. On every other slice it must be non-inferior: the interval's lower "
        "bound lies above -margin. A slice with fewer than --min-examples pairs rejects with "
        "'insufficient evidence'. Defaults come from the gate section of the config "
        "(margin 0.05, alpha 0.05, min-examples 30, 5000 resamples).",
        epilog="Exit status: 0 when decided (promote or reject; see 'promote' in --json), 1 with --check "
        "when rejected, 2 on unreadable or unpairable input.",
    )
    p.add_argument("--baseline", required=True, help="scores of the production adapter (JSONL)")
    p.add_argument("--candidate", required=True, help="scores of the candidate adapter (JSONL)")
    p.add_argument(
        "--improve", action="append", metavar="SLICE", default=None,
        help="a slice where the candidate must be better (repeat for several; default: gate.improve_slices)",
    )
    p.add_argument("--margin", type=float, default=None, help="non-inferiority margin on the other slices")
    p.add_argument("--alpha", type=float, default=None, help="significance level (two-sided interval 1 - alpha)")
    p.add_argument("--min-examples", type=int, default=None, help="fewer pairs in a slice: insufficient evidence")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (the decision is reproducible)")
    p.add_argument("--report", help="also write the Markdown report here")
    p.add_argument("--plot", help="also write a PNG of every slice's difference and interval here")
    p.add_argument("--check", action="store_true", help="exit 1 when the candidate is rejected")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("status", parents=[common], help="what the loop did last: drift, intake, training, gate, registry, what vLLM serves")
    p.add_argument("--no-vllm", action="store_true", help="do not query the vLLM server")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "deploy",
        parents=[common],
        help="hot-swap a registered adapter version into the vLLM servers (no registry change)",
        description="Validates the adapter, loads it into the staging name, verifies it, then swaps the stable "
        "served name in place; restores the previous adapter on any failure. Used by `make serve` to re-load "
        "production after a server restart.",
    )
    p.add_argument("--version", default="production", help="version (v3) or alias (default: production)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "rollback",
        parents=[common],
        help="serve an earlier version again and move the registry aliases",
        description="Hot-swaps the chosen version into every vLLM endpoint (validated, staged, verified, restored "
        "on failure), checks it serves, then moves production <- it and previous <- the old production. If the "
        "check or the registry write fails, every endpoint is reconciled back to the registry's production.",
    )
    p.add_argument("--to", "--version", dest="version", default="previous", metavar="VERSION", help="version (v3) or alias (default: previous)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser(
        "reconcile",
        parents=[common],
        help="make every vLLM endpoint serve exactly the registry's production version",
        description="For each endpoint: if the stable served name already serves production's adapter, check it "
        "answers; else load production in place (no window without the name) and check. With no production "
        "yet, unload the stable name. Run it after a vLLM restart; the refresh DAG runs it before and after "
        "each deploy. Every endpoint is tried; exit 1 naming each one that failed.",
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("adapter", help="inspect LoRA adapter directories")
    adapter_sub = p.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    p = adapter_sub.add_parser(
        "check",
        parents=[common],
        help="is this a LoRA adapter vLLM can serve on the base model? (nothing is sent anywhere)",
        description="Rejects, listing every problem: a peft type other than LoRA, DoRA/bias/modules_to_save, a "
        "base model other than the served one, a rank above the server's maximum, pickle weights (.bin), "
        "missing or corrupt adapter_model.safetensors, tensors that do not fit the base model, links that "
        "lead outside the adapter directory, and (with --name) a served name that could escape a path. "
        "Exit 0 valid, 1 invalid, 2 usage.",
    )
    p.add_argument("path", type=Path, help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base-model", metavar="NAME_OR_PATH", help="the served base model (default: the configured one)")
    p.add_argument("--max-rank", type=int, metavar="N", help="the server's --max-lora-rank (default: vllm.max_lora_rank)")
    p.add_argument("--name", help="also check a LoRA name to serve it under")
    p.set_defaults(func=cmd_adapter_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if not args.quiet else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # httpx logs one INFO line per request (vLLM, S3): noise next to progress
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command in ML_COMMANDS:
            _reexec_in_ml_env(argv, args.command)
        return int(args.func(args))
    except (ConfigError, CliError) as err:
        print(f"tuneloop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        from tuneloop.storage import StorageError

        if args.verbose:
            raise
        if isinstance(err, StorageError):
            print(f"tuneloop {args.command}: storage error: {err}", file=sys.stderr)
            return 3
        if isinstance(err, (ValueError, RuntimeError, OSError)):
            # Our modules raise these with messages meant for users (bad input, a failed
            # step, a server that is down); -v shows the traceback.
            print(f"tuneloop {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"tuneloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
