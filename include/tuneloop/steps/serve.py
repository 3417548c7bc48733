"""The serving steps: deploy (hot-swap into every vLLM endpoint), verify, record (the
registry's aliases), reconcile (servers <- registry) and rollback. Every swap holds the
fleet's lease (:mod:`tuneloop.serving.fleet_lock`)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tuneloop import layout
from tuneloop.registry import UNCHECKED
from tuneloop.steps.loop import base_model_ref, latest_candidate_scores

if TYPE_CHECKING:
    from tuneloop.steps.loop import Loop

GOLDEN_PER_SLICE = 6
HELDOUT_PREFIX = layout.HELDOUT


def materialize_adapter(loop: Loop, version: str) -> Path:
    """Copy an adapter from the store to where the vLLM servers read adapters.

    vLLM re-reads an in-place-loaded adapter from disk on every step, so a served directory
    must never change: each version gets its own directory, written to a temporary name
    and renamed into place once complete, and never touched again.
    """
    import shutil
    import uuid

    from tuneloop.provenance import dir_digest
    from tuneloop.serving.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    pinned = loop.registry.get(version).get("adapter_hash") if version in {r["version"] for r in loop.registry.versions()} else None

    def check(directory: Path) -> None:
        found = dir_digest(directory, suffixes=(ADAPTER_CONFIG, ADAPTER_WEIGHTS))
        if pinned and found != pinned:
            raise RuntimeError(
                f"adapter {version} at {directory} does not match its registry record (sha256 {found[:12]} != pinned {pinned[:12]}): "
                "an incomplete upload or a changed version; refusing to serve it"
            )

    root = Path(loop.settings.vllm.adapter_dir).resolve()
    target = root / layout.version_name(version)  # a corrupt registry must not name a path elsewhere
    if (target / "adapter_config.json").is_file():
        check(target)
        return target
    staging = root / f".{version}.partial-{uuid.uuid4().hex[:8]}"
    try:
        loop.store.get_dir(layout.adapter(version), staging)
        check(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def server_path(loop: Loop, version: str) -> str | None:
    """Where the servers load ``version`` from when it is not the local materialised directory
    (``vllm.adapter_source: store``): each answering server fetches its own copy through the
    tuneloop resolver, and all must hold it at the same path. None with ``path``."""
    from tuneloop.serving.store_resolver import CACHE_ENV, fetch_on_server
    from tuneloop.serving.vllm_client import VllmClient, VllmDownError

    settings = loop.settings
    if settings.vllm.adapter_source == "path":
        return None
    roots: dict[str, str] = {}
    for endpoint in settings.vllm.endpoints:
        with VllmClient(endpoint, api_key=settings.vllm.key, timeout_s=settings.vllm.timeout_s) as client:
            try:
                roots[endpoint] = fetch_on_server(client, settings.model.served_model_name, version)
            except VllmDownError:
                continue  # the step that follows names it; the others still get the version
    if not roots:
        raise RuntimeError(f"no vLLM endpoint answers to fetch {version} from the store ({', '.join(settings.vllm.endpoints)})")
    if len(set(roots.values())) > 1:
        raise RuntimeError(
            f"the servers keep {version} in different directories ({roots}): give every replica the same ${CACHE_ENV}"
        )
    loop.progress(f"{version}: fetched from the store by {len(roots)} server(s) into {next(iter(roots.values()))}")
    return next(iter(roots.values()))


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


def fleet(loop: Loop, action: str) -> Any:
    """The lease that makes this the only deploy on the loop's vLLM fleet (see fleet_lock)."""
    from tuneloop.serving.fleet_lock import fleet_lock

    return fleet_lock(loop.store, loop.settings.vllm.endpoints, owner=loop.run_id, action=action, say=loop.progress)


def deploy_step(loop: Loop, version: str, *, scores_key: str | None = None, urgent: bool = False) -> dict[str, Any]:
    """Serve ``version`` on every vLLM endpoint: hot-swapped into the stable name
    (``serving.rollout: inplace``), or loaded under its own name and shifted in behind the
    gateway alias (``switch``, ``canary``; ``urgent``, for a rollback: one flip, no bake).
    Validated, verified, and rolled back on failure either way."""
    with fleet(loop, f"deploy {version}"):
        if gateway_mode(loop):
            return _rollout(loop, version, scores_key=scores_key, urgent=urgent)
        return _deploy(loop, version, scores_key=scores_key)


def gateway_mode(loop: Loop) -> bool:
    """Versions behind a gateway alias (switch, canary) rather than in place."""
    return loop.settings.serving.rollout != "inplace"


def offline_validity(loop: Loop, scores_key: str) -> float | None:
    """The share of the candidate's evaluated answers that pass the task's reference-free check
    (schema, label set): what the bake holds its live answers to."""
    from tuneloop.storage import StoreKeyError

    try:
        predictions = [str(r["prediction"]) for r in loop.store.iter_jsonl(scores_key.replace("scores.jsonl", "predictions.jsonl"))]
    except StoreKeyError:
        return None
    return sum(bool(loop.spec.scorer.valid(p)) for p in predictions) / len(predictions) if predictions else None


def _store_rollout(loop: Loop, version: str, report: Any) -> None:
    """The rollout's report beside the version's gate report (JSON, and Markdown to read)."""
    from tuneloop.serving.rollout import rollout_markdown

    loop.store.put_json(layout.rollout_report(version), {**report.to_dict(), "run_id": loop.run_id})
    loop.store.put_text(layout.rollout_report(version, "md"), rollout_markdown(report))


def shadow_prompts(loop: Loop, n: int) -> list[Any]:
    """The ``n`` newest distinct prompts of the production traffic (newest partition first)."""
    if n <= 0:
        return []
    prompts: list[Any] = []
    seen: set[str] = set()
    for day in reversed(loop.store.list_partitions(layout.TRAFFIC)):
        for key in sorted(loop.store.list(f"{layout.TRAFFIC}/dt={day.isoformat()}/"), reverse=True):
            if not key.endswith(".jsonl"):
                continue
            for record in reversed(list(loop.store.iter_jsonl(key))):
                try:
                    context = loop.spec.example(record, labelled=False).context
                except (ValueError, KeyError, TypeError):
                    continue  # a malformed traffic row: the monitor reports those
                text = repr(context)
                if text not in seen:
                    seen.add(text)
                    prompts.append(context)
                if len(prompts) >= n:
                    return prompts
    return prompts


def live_sample(loop: Loop) -> int:
    """``serving.live_sample``, or its default: 8 live answers per bake step for a task judged by
    an LLM, none otherwise (their validity is checked either way)."""
    chosen = loop.settings.serving.live_sample
    return chosen if chosen is not None else (8 if loop.settings.task.metric == "judge" else 0)


def grader(loop: Loop) -> Any:
    """``(answer, reference, prompt) -> 0..1`` for the shadow replay and the bake: the task's
    LLM judge with the prompt's conversation when ``task.metric`` is judge, else its agreement."""
    scorer = loop.spec.scorer
    if loop.settings.task.metric != "judge":
        return lambda answer, reference, _prompt: float(scorer.agreement(answer, reference))
    from tuneloop.serving.vllm_client import as_messages
    from tuneloop.tasks.spec import Example

    def judged(answer: str, reference: str, prompt: Any) -> float:
        return float(scorer.score(answer, reference, Example("live", as_messages(prompt), reference, "live")).score)

    return judged


def _rollout(loop: Loop, version: str, *, scores_key: str | None = None, urgent: bool = False) -> dict[str, Any]:
    from tuneloop.serving.gateway import RouteTable
    from tuneloop.serving.rollout import RolloutError, RolloutPolicy, rollout_version

    settings, sv = loop.settings, loop.settings.serving
    adapter_dir = materialize_adapter(loop, version)
    production = loop.registry.aliases().get("production")
    scores_key = scores_key or latest_candidate_scores(loop, version)
    policy = RolloutPolicy(
        strategy="switch" if urgent else sv.rollout,
        steps=tuple(sv.canary_steps),
        bake_s=0.0 if urgent else sv.bake_s,
        grace_s=sv.grace_s,
        max_error_rate=sv.max_error_rate,
        max_p99_ratio=sv.max_p99_ratio,
        validity_margin=sv.validity_margin,
        capture_share=sv.capture_share,
        min_requests=sv.min_requests,
        live_sample=0 if urgent else live_sample(loop),
        live_margin=sv.live_margin,
        min_live_agreement=sv.min_live_agreement,
    )
    try:
        report = rollout_version(
            settings.vllm.endpoints,
            adapter_dir,
            routes=RouteTable(sv.routes_file),
            access_log=sv.access_log,
            served_name=settings.model.served_model_name,
            version=version,
            golden=golden_prompts(loop, version, scores_key) if scores_key else [],
            policy=policy,
            max_lora_rank=settings.vllm.max_lora_rank,
            max_loras=sv.max_loras,
            max_cpu_loras=sv.max_cpu_loras,
            base_model=base_model_ref(settings),
            validity=loop.spec.scorer.valid,
            offline_validity=offline_validity(loop, scores_key) if scores_key else None,
            scorer=loop.spec.scorer.agreement,
            max_tokens=settings.eval.max_new_tokens,
            api_key=settings.vllm.key,
            timeout_s=settings.vllm.timeout_s,
            server_path=server_path(loop, version),
            shadow_prompts=[] if urgent else shadow_prompts(loop, sv.shadow_requests),
            min_shadow_agreement=sv.min_shadow_agreement,
            grader=grader(loop),
            progress=loop.progress,
        )
    except RolloutError as err:
        if err.rollout.rolled_back and loop.registry.aliases().get("candidate") == version:
            # the reason stays in the registry's history beside every alias move
            loop.registry.move_aliases({"candidate": None}, reason=f"rollout of {version} rolled back: {err}", run_id=loop.run_id)
        _store_rollout(loop, version, err.rollout)
        raise
    _store_rollout(loop, version, report)
    return {"version": version, "adapter_dir": str(adapter_dir), "previous": production, **report.to_dict()}


def _deploy(loop: Loop, version: str, *, scores_key: str | None = None) -> dict[str, Any]:
    from tuneloop.serving.deploy import deploy_adapter

    settings = loop.settings
    adapter_dir = materialize_adapter(loop, version)
    production = loop.registry.aliases().get("production")
    previous_dir = materialize_adapter(loop, production) if production and production != version else None
    on_servers = server_path(loop, version)
    previous_on_servers = server_path(loop, production) if production and previous_dir is not None else None
    scores_key = scores_key or latest_candidate_scores(loop, version)
    golden = golden_prompts(loop, version, scores_key) if scores_key else []
    report = deploy_adapter(
        settings.vllm.endpoints,
        adapter_dir,
        served_name=settings.model.served_model_name,
        golden=golden,
        previous_adapter_dir=previous_dir,
        api_key=settings.vllm.key,
        max_lora_rank=settings.vllm.max_lora_rank,
        base_model=base_model_ref(settings),
        scorer=loop.spec.scorer.agreement,
        max_tokens=settings.eval.max_new_tokens,
        timeout_s=settings.vllm.timeout_s,
        progress=loop.progress,
        server_path=on_servers,
        previous_server_path=previous_on_servers,
    )
    return {"version": version, "adapter_dir": str(adapter_dir), "previous": production, **report.to_dict()}


def verify_step(loop: Loop, version: str) -> dict[str, Any]:
    """Check every endpoint's stable name is served from ``version``'s adapter directory."""
    from tuneloop.serving.vllm_client import VllmClient

    settings = loop.settings
    if settings.vllm.adapter_source == "store":  # each server's own copy, named by the pinned hash
        from tuneloop.serving.store_resolver import CACHE_ENV, cached_name

        expected = f"${CACHE_ENV}/{cached_name(version, loop.registry.get(version).get('adapter_hash') or '?')}"

        def serves_it(root: str) -> bool:
            return Path(root).name == Path(expected).name
    else:
        expected = str(materialize_adapter(loop, version))

        def serves_it(root: str) -> bool:
            return Path(root).resolve() == Path(expected).resolve()
    served = settings.model.served_model_name
    api_key = settings.vllm.key
    if gateway_mode(loop):
        return _verify_versioned(loop, version, serves_it, expected)
    seen = {}
    for endpoint in settings.vllm.endpoints:
        with VllmClient(endpoint, api_key=api_key, timeout_s=settings.vllm.timeout_s) as client:
            models = {m["id"]: m for m in client.models()}
            root = models.get(served, {}).get("root")
            seen[endpoint] = root
            if root is None:
                raise RuntimeError(
                    f"{endpoint}: {served!r} is not loaded at all (the server restarted and forgot its runtime adapters?), "
                    f"expected {version} from {expected}; reconcile puts the registry's production back"
                )
            if not serves_it(root):
                raise RuntimeError(f"{endpoint}: {served!r} is served from {root}, expected {expected} ({version}): another deploy or rollback ran meanwhile?")
            seen[endpoint + "#answer"] = client.chat(served, "ping", max_tokens=4)
    loop.progress(f"verified: {served!r} answers from {version} on {len(settings.vllm.endpoints)} endpoint(s)")
    return {"version": version, "served_from": seen}


def _verify_versioned(loop: Loop, version: str, serves_it: Any, expected: str) -> dict[str, Any]:
    """Gateway mode: every endpoint serves ``<served>-<version>`` from ``version``'s adapter, the
    alias routes all traffic to it, and (with ``serving.gateway_url``) the gateway answers with it."""
    from tuneloop.serving.gateway import RouteTable, version_name
    from tuneloop.serving.rollout import versions_on
    from tuneloop.serving.vllm_client import VllmClient

    settings = loop.settings
    served = settings.model.served_model_name
    name = version_name(served, version)
    seen: dict[str, Any] = {}
    for endpoint in settings.vllm.endpoints:
        with VllmClient(endpoint, api_key=settings.vllm.key, timeout_s=settings.vllm.timeout_s) as client:
            root = versions_on(client, served).get(name)
            seen[endpoint] = root
            if root is None or not serves_it(root):
                raise RuntimeError(
                    f"{endpoint}: {name} is {'not loaded' if root is None else f'served from {root}'}, expected {expected}: "
                    "the server restarted, or another deploy ran meanwhile; reconcile puts the registry's production back"
                )
    alias = RouteTable(settings.serving.routes_file).alias(served)
    if alias.serving() != [name]:
        raise RuntimeError(f"the gateway routes {served!r} to {alias.routes}, expected all of it to {name}: another rollout ran meanwhile?")
    if settings.serving.gateway_url:
        with VllmClient(settings.serving.gateway_url, api_key=settings.vllm.key, timeout_s=settings.vllm.timeout_s) as client:
            reply = client.chat_reply(served, "ping", max_tokens=4)
        if reply.model != name:
            raise RuntimeError(f"the gateway at {settings.serving.gateway_url} answered {served!r} with {reply.model!r}, expected {name}")
        seen["gateway"] = reply.model
    loop.progress(f"verified: {served!r} routes to {name} on {len(settings.vllm.endpoints)} endpoint(s)")
    return {"version": version, "served_from": seen}


def record_step(
    loop: Loop, version: str, gate_result: dict[str, Any] | None = None, *, reason: str | None = None, deployed_over: str | None = UNCHECKED
) -> dict[str, Any]:
    """Move the aliases (production <- version, previous <- old production) and log the run.

    ``deployed_over``: the production the deploy replaced (``deploy_step``'s ``previous``). If
    production moved since (a rollback ran between this run's deploy and now), refuse: the
    rollback wins, and the refresh's teardown reconcile puts its version back on the servers."""
    move = loop.registry.promote(
        version, reason=reason or "refresh: gate passed, deployed and verified", run_id=loop.run_id, expect_production=deployed_over
    )
    summary = {"run_id": loop.run_id, "version": version, "aliases": move["aliases"], "gate": gate_result, "at": move["at"]}
    loop.store.put_json(layout.run_summary(loop.run_key), summary)
    loop.progress(f"registry: production={move['aliases']['production']} previous={move['aliases']['previous']}")
    _mirror(loop, move["aliases"])
    if loop.tracker is not None:
        loop.tracker.finish()
    return summary


def _mirror(loop: Loop, aliases: dict[str, str | None]) -> None:
    """The registry's aliases on the MLflow registered model, when tracking is on."""
    if loop.tracker is not None:
        loop.tracker.mirror_aliases(aliases, {v: loop.registry.get(v) for v in set(aliases.values()) if v})


def reconcile_step(loop: Loop, *, if_idle: bool = False) -> dict[str, Any]:
    """Make every vLLM endpoint serve exactly the registry's production version (or no adapter
    when there is none yet). Run after a vLLM restart, before a deploy, and after any failure
    between a deploy and the registry write, so servers and registry agree again.

    ``if_idle`` (the ``tuneloop_reconcile`` DAG, every few minutes): when another deploy holds
    the fleet, do nothing and say so (that deploy ends in a reconcile of its own) instead of
    waiting for it."""
    from tuneloop.serving.fleet_lock import FleetBusyError, fleet_lock

    if not if_idle:
        with fleet(loop, "reconcile"):
            return _reconcile(loop)
    try:
        lease = fleet_lock(loop.store, loop.settings.vllm.endpoints, owner=loop.run_id, action="reconcile", wait_s=0, say=loop.progress)
        with lease:
            return _reconcile(loop)
    except FleetBusyError as busy:
        loop.progress(f"reconcile skipped: {busy}")
        return {"skipped": str(busy), "production": loop.registry.aliases().get("production"), "endpoints": []}


def _reconcile(loop: Loop) -> dict[str, Any]:
    from tuneloop.serving.deploy import reconcile

    if gateway_mode(loop):
        return _reconcile_versioned(loop)

    settings = loop.settings
    production = loop.registry.aliases().get("production")
    adapter_dir = materialize_adapter(loop, production) if production else None
    records = reconcile(
        settings.vllm.endpoints,
        adapter_dir,
        served_name=settings.model.served_model_name,
        base_model=base_model_ref(settings),
        max_lora_rank=settings.vllm.max_lora_rank,
        api_key=settings.vllm.key,
        timeout_s=settings.vllm.timeout_s,
        progress=loop.progress,
        server_path=server_path(loop, production) if production else None,
        stale_eval_after_s=settings.vllm.stale_eval_after_h * 3600,
    )
    changed = sum(r.action != "in_sync" for r in records)
    loop.progress(
        f"reconciled: {len(records)} endpoint(s) serve {production or 'no adapter'} as "
        f"{settings.model.served_model_name!r} ({changed} changed)"
    )
    return {"production": production, "adapter_dir": str(adapter_dir) if adapter_dir else None, "endpoints": [asdict(r) for r in records]}


def _reconcile_versioned(loop: Loop) -> dict[str, Any]:
    """Gateway mode: every endpoint holds the registry's production (and previous, as
    last-known-good) under their version names; the gateway routes only to endpoints that do
    (a restarted replica rejoins once it serves them) and sends the alias to production."""
    from tuneloop.serving.deploy import DeployError, unload_stale_eval_names
    from tuneloop.serving.gateway import RouteTable, version_name
    from tuneloop.serving.rollout import versions_on
    from tuneloop.serving.vllm_client import VllmClient, VllmError

    settings = loop.settings
    served = settings.model.served_model_name
    aliases = loop.registry.aliases()
    production, previous = aliases.get("production"), aliases.get("previous")
    want: dict[str, str] = {}
    for version in (production, previous):
        if version:
            want[version_name(served, version)] = server_path(loop, version) or str(materialize_adapter(loop, version))
    routes = RouteTable(settings.serving.routes_file)
    records, ready, extras = [], [], {}
    for endpoint in settings.vllm.endpoints:  # 1. load what the registry names, unload nothing yet
        record: dict[str, Any] = {"endpoint": endpoint, "action": "in_sync", "loaded": [], "unloaded": []}
        try:
            with VllmClient(endpoint, api_key=settings.vllm.key, timeout_s=settings.vllm.timeout_s) as client:
                client.check_health()
                record["unloaded"].extend(unload_stale_eval_names(client, served, settings.vllm.stale_eval_after_h * 3600))
                held = versions_on(client, served)
                for name, path in want.items():
                    if held.get(name) != path:
                        if name in held:  # the same name from other weights: never routed to as such
                            client.unload_adapter(name)
                        client.load_adapter(name, path, inplace=False)
                        record["loaded"].append(name)
                if production:
                    client.chat(version_name(served, production), "ping", max_tokens=1)
            extras[endpoint] = sorted(set(held) - set(want))
            ready.append(endpoint)
        except (VllmError, OSError, ValueError) as err:
            record.update(action="failed", detail=str(err))
        records.append(record)
    # 2. route to production on the servers that hold it, then 3. after the grace period (what
    # was routed elsewhere finishes there) unload the versions the registry no longer names
    if production:
        routes.set_alias(served, {version_name(served, production): 100.0}, capture={}, last_known_good=version_name(served, previous) if previous else None)
    else:
        routes.remove_alias(served)
    routes.set_upstreams(ready)
    if any(extras.values()):
        time.sleep(settings.serving.grace_s)
    for record in records:
        if extras.get(record["endpoint"]):
            with VllmClient(record["endpoint"], api_key=settings.vllm.key, timeout_s=settings.vllm.timeout_s) as client:
                for name in extras[record["endpoint"]]:
                    try:
                        client.unload_adapter(name)
                        record["unloaded"].append(name)
                    except VllmError as err:  # a leftover costs a slot, not an answer: the next reconcile retries
                        record["detail"] = f"could not unload {name}: {err}"
        if record["action"] != "failed" and (record["loaded"] or record["unloaded"]):
            record["action"] = "loaded"
        loop.progress(f"reconcile {record['endpoint']}: {record['action']} {record.get('detail') or ''}".rstrip())
    failed = [r for r in records if r["action"] == "failed"]
    if failed:
        raise DeployError(
            f"reconcile: {len(failed)} of {len(records)} endpoint(s) cannot serve {sorted(want)} and get no traffic from the gateway: "
            + "; ".join(f"{r['endpoint']}: {r['detail']}" for r in failed)
            + ". Fix the server (is it up? `make serve`) and run `tuneloop reconcile` again",
            step="reconcile",
            endpoint=failed[0]["endpoint"],
        )
    loop.progress(f"reconciled: the gateway routes {served!r} to {production or 'nothing'} on {len(ready)} endpoint(s)")
    return {"production": production, "routes": routes.alias(served).routes, "upstreams": ready, "endpoints": records}


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
    deploy = deploy_step(loop, version, urgent=True)
    try:
        verify_step(loop, version)
        move = loop.registry.move_aliases({"production": version, "previous": current}, reason=f"rollback to {version} (requested {target!r})", run_id=loop.run_id)
    except Exception as err:
        _reconcile_after(loop, err)
    loop.progress(f"rolled back: production={version} previous={current}")
    _mirror(loop, move["aliases"])
    return {"version": version, "from": current, "deploy": deploy, "aliases": move["aliases"]}
