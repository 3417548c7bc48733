"""ML commands (they run in the ML environment: torch, transformers, peft): build-model, train, evaluate."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.cli.common import (
    CliError,
    _adapter_dir,
    _as_dict,
    _emit,
    _find_adapter,
    _load_jsonl_path,
    _progress,
    _settings,
    _store,
    _write_result_file,
)
from tuneloop.intake.rows import split_lines
from tuneloop.steps.train import replay_mix
from tuneloop.tasks import TaskSpec

if TYPE_CHECKING:

    import argparse

    from tuneloop.storage import Store


def cmd_build_model(args: argparse.Namespace) -> int:
    from tuneloop.demo.basemodel import build_demo_model

    settings = _settings(args)
    out_dir = Path(args.out or settings.model.demo_model_dir)
    path = build_demo_model(out_dir, preset=args.preset, seed=args.seed, force=args.rebuild, progress=_progress(args))
    recipe_file = Path(path) / "tuneloop_model.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    result = {"model_dir": str(path), **recipe}
    _emit(args, result, f"demo base model ready in {path} (preset {args.preset})")
    return 0


def _snapshot_records(store: Store, snapshot: str, split: str) -> tuple[str, list[dict[str, Any]]]:
    """Records of ``split`` from a snapshot hash, ``latest``, or a local JSONL file."""
    from tuneloop.intake.pull import SNAPSHOT_PREFIX, latest_snapshot
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


def _train_and_register(args: argparse.Namespace) -> int:
    """``tuneloop train --register``: :func:`tuneloop.steps.train.train_step` in this process."""
    from tuneloop.intake.pull import latest_snapshot
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


def cmd_train(args: argparse.Namespace) -> int:
    if args.register:
        return _train_and_register(args)
    if args.version is None:
        raise CliError("--version is required (or --register: the registry picks the next version)")
    if args.run_id is not None:
        raise CliError("--run-id goes with --register")
    from tuneloop.demo.basemodel import resolve_base_model
    from tuneloop.ml.train import train_lora

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
    if not args.no_upload:
        from tuneloop.registry import Registry

        if args.version in {record["version"] for record in Registry(store).versions()}:
            raise CliError(
                f"{args.version} is registered in {store.uri}: a version's weights never change; train a new version, "
                "or pass --no-upload to keep this one local"
            )
    base = resolve_base_model(settings)
    out_dir = Path(args.out) if args.out else _adapter_dir(settings, args.version)
    init_adapter = None if args.init_from in (None, "none") else _find_adapter(settings, store, args.init_from)
    records, trained_on, replayed = replay_mix(store, records, dataset_hash, training, _progress(args))
    result = train_lora(
        base, records, out_dir, training,
        dataset_hash=trained_on, init_adapter=init_adapter, progress=_progress(args), spec=TaskSpec(settings.task),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun/accelerate launch, rank 0 wrote the adapter: it alone uploads and reports
    if not args.no_upload:
        store.put_dir(layout.adapter(args.version), out_dir)
    from tuneloop.provenance import dir_digest
    from tuneloop.serving.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    payload = {
        "version": args.version, "snapshot": dataset_hash, "base_model": str(base), **_as_dict(result), "replayed_rows": replayed,
        "adapter_hash": dir_digest(out_dir, suffixes=(ADAPTER_CONFIG, ADAPTER_WEIGHTS)),  # the registry pins the version to these bytes
    }
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


def _evaluate_step(args: argparse.Namespace) -> int:
    """``tuneloop evaluate --step``: :func:`tuneloop.steps.evaluate.evaluate_step` in this process."""
    from tuneloop.steps.evaluate import evaluate_step
    from tuneloop.steps.loop import open_loop

    given = {"--adapter": None if args.adapter == "none" else args.adapter, "--eval": args.eval, "--out": args.out, "--limit": args.limit,
             "--upload": args.upload, "--compare": args.compare, "--injection": args.injection, "--backend": args.backend,
             "--consistency-prompts": args.consistency_prompts, "--no-suites": args.no_suites or None}
    clashing = [flag for flag, value in given.items() if value is not None]
    if clashing:
        raise CliError(f"--step evaluates as the refresh does, from the settings (eval.*): drop {', '.join(clashing)}")
    if not (args.candidate and args.snapshot):
        raise CliError("--step needs --candidate VERSION and --snapshot HASH (what `train` returned)")
    from tuneloop.ml.backends import has_torch

    if has_torch():  # each evaluation runs as a child: in this env when it is an ML env (a pod's image)
        os.environ.setdefault("TUNELOOP_ML_PYTHON", sys.executable)
    loop = open_loop(args.config, run_id=args.run_id, progress=_progress(args))
    result = evaluate_step(loop, {"version": layout.version_name(args.candidate), "snapshot": args.snapshot})
    _write_result_file(args.xcom_json, result)
    candidate, production = result["candidate_eval"], result["production_eval"]
    _emit(args, result, f"evaluated {result['version']} (and {production['adapter']}) on snapshot {args.snapshot[:12]}: "
          f"{candidate['scores_key']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.step:
        return _evaluate_step(args)
    if args.candidate or args.snapshot or args.run_id or args.xcom_json:
        raise CliError("--candidate, --snapshot, --run-id and --xcom-json go with --step")
    from tuneloop.demo.basemodel import resolve_base_model
    from tuneloop.ml.backends import select_backend
    from tuneloop.ml.evaluate import SuitePlan, evaluate_adapter

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
    registered = adapter_dir is not None and layout.VERSION_RE.match(args.adapter) and not Path(args.adapter).is_dir()
    backend = select_backend(
        args.backend or settings.eval.backend, settings, base_model=base, adapter_dir=adapter_dir, progress=progress,
        version=args.adapter if registered else None,
    )  # fmt: skip
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


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register this module's subcommands (each parser next to its handler)."""
    p = sub.add_parser(
        "build-model",
        parents=[common],
        help="build (or copy, or reuse) the demo base model: BPE tokenizer + small Llama, no hub",
        description="Puts the demo base model in model.demo_model_dir (no hub): a byte-level BPE tokenizer with a chat "
        "template and a small Llama pre-trained on the demo worlds' documents; the copy preset adds copy rows "
        "(tuneloop.demo.copying: it learns to repeat what it read) and a generic extraction curriculum "
        "(tuneloop.demo.curriculum). A prebuilt copy of the recipe in models/<preset>-base is copied instead "
        "(after its file hashes are checked; the copy preset ships there); --rebuild pre-trains here anyway "
        "(demo: about 4 minutes on 2 CPU cores; copy: about 20). Cached: a second call with the same recipe "
        "returns at once.",
    )
    p.add_argument(
        "--preset", choices=["demo", "copy", "tiny"], default="demo",
        help="demo (the demo's model), copy (the same taught to copy from its context; shipped in models/copy-base) or tiny (seconds; for tests)",
    )
    p.add_argument("--rebuild", action="store_true", help="pre-train from scratch even if a built or shipped copy of the recipe exists")
    p.add_argument("--out", help="output directory (default: model.demo_model_dir)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a LoRA adapter on a dataset snapshot",
        description="LoRA (peft) on the base model with TRL's SFTTrainer; writes adapter_model.safetensors, "
        "adapter_config.json, provenance.json and train_metrics.json. Uses CUDA + bf16 when present, else the CPU. "
        "A re-run after a crash resumes from the checkpoints beside the output (training.checkpoint_every). "
        "Several GPUs: training.processes (the loop starts `accelerate launch`), or launch this command under "
        "torchrun / accelerate launch yourself; QLoRA: training.quantization: 4bit.",
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
    p.add_argument("--step", action="store_true",
                   help="the refresh's evaluate step (what its Airflow task or evaluation pod runs): --candidate and "
                   "production (or the bare base model) on --snapshot's eval split and the golden sets; the gate reads the result")
    p.add_argument("--candidate", metavar="VERSION", help="with --step: the version `train` registered")
    p.add_argument("--snapshot", metavar="HASH", help="with --step: the dataset snapshot it was trained on")
    p.add_argument("--run-id", default=None, help="with --step: the Airflow run id (keys of the stored evaluations)")
    p.add_argument("--xcom-json", metavar="PATH", help="with --step: also write the JSON result to PATH (the pod operator's XCom)")
    p.set_defaults(func=cmd_evaluate)
