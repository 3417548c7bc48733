"""Loop commands: the settings (config), the drift test (drift), the gate (gate), what the loop did (status)."""

from __future__ import annotations

import json
import sys
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
from tuneloop.tasks import TaskSpec

if TYPE_CHECKING:
    import argparse


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


def _monitor(args: argparse.Namespace) -> int:
    """``tuneloop drift`` without windows: the drift monitor's step on the store, policy and all
    (the function the DAG's check_drift task calls)."""
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.monitor import check_drift

    loop = open_loop(args.config, progress=_progress(args))
    check = check_drift(loop, as_of=args.as_of)
    human = (
        f"{'DRIFT' if check['drift'] else 'no drift'} as of {check['as_of']}: AUC {check['statistic']:.3f}, p={check['p_value']:.3g} "
        f"({check['n_reference']} reference vs {check['n_current']} current)\n  decision: {check['decision']}"
        + (f"\n  refresh requested; slices where drift was found: {', '.join(check['drift_slices']) or 'none named'}" if check["emit"] else "")
    )
    _emit(args, check, human)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from tuneloop.intake.teacher import TeacherError
    from tuneloop.steps.label import label_step
    from tuneloop.steps.loop import open_loop

    loop = open_loop(args.config, progress=_progress(args))
    try:
        result = label_step(loop, as_of=args.as_of)
    except (TeacherError, LookupError) as err:
        raise CliError(str(err)) from None
    account = result["account"]
    human = (
        f"{result['labelled']} traffic rows labelled by {result['teacher']['model']} ({result['window'][0]} .. {result['window'][1]}), "
        f"{result['quarantined']} quarantined {result['quarantine_reasons'] or ''}\n"
        f"  {account['requests']} requests, {account['cache_hits']} cache hits, {account['retries']} retries, "
        f"{account['prompt_tokens'] + account['completion_tokens']} tokens, cost {account['cost']}\n"
        f"  labels: {loop.store.uri}/{result['labels']}\n  summary: {loop.store.uri}/{result['summary_key']}"
    )
    _emit(args, result, human)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from tuneloop import drift
    from tuneloop.embeddings import EmbeddingUnavailableError

    if args.reference is None and args.current is None:
        return _monitor(args)
    if args.reference is None or args.current is None:
        raise CliError("give both --reference and --current (two windows), or neither (the drift monitor on the store)")
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
    except (drift.DriftInputError, EmbeddingUnavailableError) as err:
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


def _gate_version(args: argparse.Namespace) -> int:
    """``tuneloop gate --version vN``: the refresh's gate step on the newest evaluation of vN in
    the store (first-adapter rule, ``auto`` slices from the drift evidence, suite bars, the
    report stored beside the version) — the function the DAG's gate task calls."""
    from tuneloop.steps.evaluate import latest_evaluation
    from tuneloop.steps.gate import gate_step
    from tuneloop.steps.loop import open_loop

    loop = open_loop(args.config, progress=_progress(args))
    decision = gate_step(loop, latest_evaluation(loop, args.version))
    lines = [f"{'PROMOTE' if decision['promote'] else 'REJECT'} {decision['version']} vs {decision['baseline']}"]
    lines += [f"  - {reason}" for reason in decision["reasons"]]
    lines.append(f"  report: {loop.store.uri}/{decision['report_key']}")
    _emit(args, decision, "\n".join(lines))
    return 1 if args.check and not decision["promote"] else 0


def cmd_gate(args: argparse.Namespace) -> int:
    from tuneloop import gate, gate_report

    if args.version is not None:
        if args.baseline or args.candidate:
            raise CliError("--version gates a stored evaluation: drop --baseline/--candidate (or drop --version to gate two files)")
        return _gate_version(args)
    if args.baseline is None or args.candidate is None:
        raise CliError("give --baseline and --candidate score files, or --version to gate the store's newest evaluation of it")
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
        Path(args.report).write_text(gate_report.render_report_markdown(decision), encoding="utf-8")
        payload["report"] = args.report
    if args.plot:
        gate_report.plot_decision(decision, args.plot)
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


def cmd_status(args: argparse.Namespace) -> int:
    from tuneloop.status import collect_status, format_status

    settings = _settings(args)
    status = collect_status(settings, _store(settings), ask_vllm=not args.no_vllm)
    _emit(args, status, format_status(status))
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register this module's subcommands (each parser next to its handler)."""
    p = sub.add_parser("config", parents=[common], help="print the effective settings (secrets masked)")
    p.add_argument("--table", action="store_true", help="print every key with its default and meaning as a Markdown table (docs/configuration.md's)")
    p.set_defaults(func=cmd_config)

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
        "terms that separate the windows and the most current-like records. Without --reference and "
        "--current it runs the drift monitor on the store, as the Airflow DAG does: the window of traffic "
        "against production's training data, production's score on fresh labels, and the policy "
        "(drift.min_auc, consecutive checks, cooldown); the check is stored in drift/checks/.",
        epilog="Exit status: 0 whether or not drift is found (see 'drift' in --json); 2 when a window "
        "cannot be read or yields no text. Unusable lines are skipped and counted by reason "
        "(input.*.skipped), with a warning on stderr.",
    )
    p.add_argument("--reference", default=None, help="JSONL records of the reference window (what the model knows)")
    p.add_argument("--current", default=None, help="JSONL records of the current window (recent traffic)")
    p.add_argument("--as-of", type=_parse_date, default=None, help="without windows: check the store's traffic window ending on this day (default: the newest)")
    p.add_argument("--field", default=None, help="the text field of each record (default: drift.field, else the task's input)")
    p.add_argument("--alpha", type=float, default=None, help="significance level (default: drift.alpha, 0.05)")
    p.add_argument("--method", choices=["classifier", "embedding"], default=None, help="classifier (hashed n-grams, fast) or embedding (sentence encoder); default: drift.method")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and classifier (reproducible)")
    p.add_argument("--top", type=int, default=10, help="separating terms to report per direction")
    p.add_argument("--examples", type=int, default=5, help="most current-like records to report")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "label",
        parents=[common],
        help="have the teacher model label the traffic window (data.label_source: teacher)",
        description="Distillation: a sample of the traffic window (drift.current_days up to --as-of) is "
        "de-duplicated, stratified by slice and sent to teacher.endpoint (any OpenAI-compatible API) "
        "with the task's system prompt; the answers that pass the task's check become "
        "labelled/dt=<day>/teacher-*.jsonl, which `tuneloop pull` then checks like any labelled data. "
        "Answers are cached by content, so a re-run (after a kill, say) pays for nothing twice; 429/5xx "
        "answers are retried with backoff; teacher.max_requests/max_tokens_total/max_cost cap a run. "
        "teacher.data_residency: local_only refuses a non-local endpoint before sending anything.",
    )
    p.add_argument("--as-of", type=_parse_date, default=None, help="last day of the traffic window (default: the newest)")
    p.set_defaults(func=cmd_label)

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
    p.add_argument("--baseline", default=None, help="scores of the production adapter (JSONL)")
    p.add_argument("--candidate", default=None, help="scores of the candidate adapter (JSONL)")
    p.add_argument("--version", default=None, help="instead of two files: gate the store's newest evaluation of this version, as the refresh DAG does (report stored beside it)")
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
