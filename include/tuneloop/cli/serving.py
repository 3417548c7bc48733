"""Serving commands: deploy, rollback, reconcile the vLLM fleet, and check an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.cli.common import (
    _emit,
    _progress,
    _settings,
)

if TYPE_CHECKING:
    import argparse


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
    result = reconcile_step(loop, if_idle=args.if_idle)
    if result.get("skipped"):
        _emit(args, result, "reconcile skipped: another deploy holds the fleet (it ends in a reconcile of its own)")
        return 0
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
    from tuneloop.serving.adapters import AdapterValidationError, check_lora_name, validate_adapter
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
        targets = info.target_modules if isinstance(info.target_modules, str) else ", ".join(info.target_modules)
        human = (
            f"{args.path}: valid LoRA adapter, rank {info.rank}, {info.n_tensors} tensors "
            f"({info.n_parameters:,} parameters) on {targets}; base model {info.base_match}"
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


def _gateway(args: argparse.Namespace) -> Any:
    from urllib.parse import urlsplit

    from tuneloop.serving.gateway import NginxGateway

    serving = _settings(args).serving
    port = args.port or (urlsplit(serving.gateway_url).port if serving.gateway_url else None) or 8088
    run_dir = Path(serving.routes_file).resolve().parent
    return NginxGateway(run_dir, host=args.host, port=port, routes_file=serving.routes_file, access_log=serving.access_log)


def cmd_gateway(args: argparse.Namespace) -> int:
    from collections import Counter

    from tuneloop.serving.gateway import read_access_log

    gateway = _gateway(args)
    if args.gateway_command == "stop":
        gateway.stop()
        _emit(args, {"stopped": True}, f"gateway stopped ({gateway.run_dir})")
        return 0
    if args.gateway_command == "start":
        gateway.start()
        served = _settings(args).model.served_model_name
        if not gateway.routes.upstreams() and not args.no_reconcile:
            from tuneloop.steps.loop import open_loop
            from tuneloop.steps.serve import reconcile_step

            reconcile_step(open_loop(args.config, progress=_progress(args)))
        alias = gateway.routes.alias(served)
        _emit(
            args,
            {"url": gateway.url, "run_dir": str(gateway.run_dir), "routes": alias.routes, "upstreams": gateway.routes.upstreams()},
            f"gateway on {gateway.url}: {served!r} -> {alias.routes or 'nothing yet'} on {gateway.routes.upstreams() or 'no ready server'} "
            f"(config, logs: {gateway.run_dir}; stop: tuneloop gateway stop)",
        )
        return 0
    served = _settings(args).model.served_model_name
    alias = gateway.routes.alias(served)
    records, _ = read_access_log(gateway.access_log)
    recent = records[-args.last :] if args.last else records
    by_version = Counter(r.version for r in recent)
    errors = Counter(r.version for r in recent if r.status >= 500 or r.status == 404)
    result = {
        "running": gateway.pid() is not None,
        "url": gateway.url,
        "routes": alias.routes,
        "last_known_good": alias.last_known_good,
        "upstreams": gateway.routes.upstreams(),
        "recent": {v: {"requests": n, "errors": errors[v]} for v, n in by_version.items()},
    }
    human = (
        f"gateway {'running' if result['running'] else 'NOT running'} on {gateway.url}\n"
        f"  {served!r} -> {alias.routes or 'nothing'}; last-known-good {alias.last_known_good or 'none'}\n"
        f"  servers: {', '.join(result['upstreams']) or 'none ready'}\n"
        + "".join(f"  last {len(recent)} requests: {v or '(other)'}: {n} ({errors[v]} errors)\n" for v, n in by_version.most_common())
    ).rstrip()
    _emit(args, result, human)
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register this module's subcommands (each parser next to its handler)."""
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
        "each deploy, and the tuneloop_reconcile DAG every 10 minutes (--if-idle). Every endpoint is tried; "
        "exit 1 naming each one that failed.",
    )
    p.add_argument("--if-idle", action="store_true", help="do nothing (exit 0) while another deploy holds the fleet, instead of waiting")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser(
        "gateway",
        parents=[common],
        help="the local nginx gateway of serving.rollout: switch|canary (start, stop, status)",
        description="With serving.rollout switch or canary, each version is served under its own name "
        "(<served>-<version>) and clients call the stable name through this gateway, which maps it to the "
        "versions by weight (nginx + its JavaScript module; Debian: nginx-light libnginx-mod-http-js). Its "
        "route table and JSON access log live where serving.routes_file / serving.access_log say. `start` "
        "renders the config, starts nginx and, when no server is routed yet, reconciles the servers with the "
        "registry; `status` shows the routes and the requests each version answered lately.",
    )
    p.add_argument("gateway_command", choices=["start", "stop", "status"], metavar="ACTION", help="start | stop | status")
    p.add_argument("--port", type=int, help="port to listen on (default: serving.gateway_url's, else 8088)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--no-reconcile", action="store_true", help="start without loading the registry's versions on the servers")
    p.add_argument("--last", type=int, default=1000, help="status: how many recent requests to count (default 1000)")
    p.set_defaults(func=cmd_gateway)

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
