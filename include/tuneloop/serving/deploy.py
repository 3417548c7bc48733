"""Hot-swap a LoRA adapter into running vLLM servers, verify it, and roll back on any failure.

The base model is served as ``<name>-base``; clients call ``<name>``, a LoRA adapter name.
Deploys use only two adapter names on a server: the stable ``<name>`` and ``<name>-staging``,
and every load is in place (``load_inplace``), which swaps the weights behind a name with no
window in which the name is missing and never grows vLLM's adapter cache (see FACTS.md).
(An evaluation through vLLM adds a temporary ``<name>-eval-<hex>`` while it runs and unloads
it afterwards: see ``tuneloop.ml.vllm_backend.VllmBackend``.)

First ``validate`` (the adapter, the golden set, the rollback target) and ``preflight`` (every
endpoint is healthy and serves ``<name>-base``) run before anything is loaded anywhere. Then
each endpoint goes through these steps (names as in reports and errors):

``health`` -> ``load_staging`` -> ``verify_staging`` -> ``snapshot_stable`` -> ``load_stable``
-> ``verify_stable``; a failure after ``load_stable`` began runs ``restore`` (the previous
adapter back into the stable name, in place, and checked to answer as before the swap).
A request in flight during ``load_stable`` keeps running and may finish on the new weights.

Endpoints are deployed in canary order: the first one fully, then the others; when a later
endpoint fails, the ones already swapped are restored too. The adapter is validated before
anything is sent (:func:`validate_adapter`), with stdlib only, so this module also runs in the
Airflow environment (no torch, no safetensors package).

vLLM re-reads an adapter loaded in place from disk while it serves it, and a server whose
adapter directory disappeared died on the next request (EngineDeadError; seen on 0.32): a
deployed adapter directory, and the previous one kept for rollback, must stay on disk,
unchanged, while they may be served.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.serving.adapters import ADAPTER_CONFIG, AdapterValidationError, validate_adapter
from tuneloop.serving.verify import (
    GoldenCase,
    Scorer,
    base_name,
    exact_match,
    golden_cases,
    smoke_cases,
    staging_name,
    verify_served,
)
from tuneloop.serving.vllm_client import Prompt, VllmClient, VllmError

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)


Progress = Callable[[str], None]


# -- deploy report --------------------------------------------------------------------------


@dataclass


class StepRecord:
    """One step on one endpoint: its outcome and duration."""

    step: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass


class EndpointReport:
    """Everything that happened on one endpoint.

    ``status``: ``pending`` (not reached), ``deployed``, ``failed`` (stable name untouched),
    ``rolled_back`` (previous adapter restored and verified), ``rollback_failed``.
    """

    endpoint: str
    status: str = "pending"
    previous_served: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    staging: dict[str, Any] | None = None
    stable: dict[str, Any] | None = None
    swap_seconds: float | None = None


@dataclass


class DeployReport:
    """The result of :func:`deploy_adapter`; ``to_dict``/``to_json`` give the artifact form."""

    adapter_dir: str
    served_path: str
    served_name: str
    staging_name: str
    base_model: str
    previous_adapter_dir: str | None
    started_at: str
    verification: str = "golden"  # "golden": answers scored as evaluated; "smoke": staging == stable only
    ok: bool = False
    seconds: float = 0.0
    adapter: dict[str, Any] | None = None
    endpoints: list[EndpointReport] = field(default_factory=list)
    failed_endpoint: str | None = None
    failed_step: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class DeployError(RuntimeError):
    """A deploy failed; the message names the endpoint, the step, the cause and what was rolled back."""

    def __init__(
        self,
        message: str,
        *,
        step: str,
        endpoint: str | None = None,
        report: DeployReport | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.endpoint = endpoint
        self.report = report


class _StepFailed(Exception):
    """Internal: a step failed on an endpoint (carries the step name and cause text)."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


@contextmanager


def _step(report: EndpointReport, name: str, progress: Progress) -> Iterator[StepRecord]:
    """Time a step, record it, and turn any exception into :class:`_StepFailed`."""
    record = StepRecord(step=name, ok=False, seconds=0.0)
    report.steps.append(record)
    started = time.perf_counter()
    try:
        yield record
    except _StepFailed as err:
        record.detail = err.cause
        raise
    except Exception as err:  # any failure of a step is that step's failure (and may roll back)
        record.detail = str(err) if isinstance(err, VllmError | ValueError | OSError) else f"{type(err).__name__}: {err}"
        raise _StepFailed(name, record.detail) from err
    else:
        record.ok = True
    finally:
        record.seconds = round(time.perf_counter() - started, 4)
        outcome = "ok" if record.ok else "FAILED"
        detail = f": {record.detail}" if record.detail else ""
        progress(f"{report.endpoint} {name} {outcome} ({record.seconds * 1000:.0f} ms){detail}")


def _check_root(client: VllmClient, name: str, path: str) -> None:
    """The server must list ``name`` as serving ``path`` after a load."""
    served = client.adapters().get(name)
    if served != path:
        raise ValueError(f"after the load the server lists {name} -> {served!r}, expected {path!r}")


# -- restore --------------------------------------------------------------------------------


def restore(
    client: VllmClient,
    *,
    served_name: str,
    previous_adapter_dir: str | os.PathLike[str] | None,
    prompts: Sequence[Prompt] = (),
    baseline: Sequence[str] | None = None,
    min_agreement: float = 1.0,
    max_tokens: int = 96,
) -> str:
    """Put the previous adapter back into the stable name (in place) and check it answers again.

    With ``previous_adapter_dir=None`` (first deploy) the stable name is unloaded instead.
    ``baseline`` (answers the stable name gave to ``prompts`` before the swap) must be matched
    to at least ``min_agreement``. Returns a one-line description; raises :class:`DeployError`.
    """
    endpoint = client.base_url
    try:
        if previous_adapter_dir is None:
            if served_name not in client.adapters():
                return f"{served_name} is not loaded (there was no previous adapter)"
            client.unload_adapter(served_name)
            if served_name in client.adapters():
                raise DeployError(
                    f"restore on {endpoint}: {served_name} is still listed after unloading it",
                    step="restore",
                    endpoint=endpoint,
                )
            return f"unloaded {served_name} (there was no previous adapter)"
        path = str(Path(previous_adapter_dir).resolve())
        client.load_adapter(served_name, path, inplace=True)
        listed = client.adapters().get(served_name)
        if listed != path:
            raise DeployError(
                f"restore on {endpoint}: {served_name} lists {listed!r} after loading {path}",
                step="restore",
                endpoint=endpoint,
            )
        answers = client.chat_many(served_name, list(prompts), max_tokens=max_tokens) if prompts else []
        if not prompts:
            client.chat(served_name, "ping", max_tokens=1)
        if baseline is not None and prompts:
            same = sum(exact_match(a, b) for a, b in zip(answers, baseline, strict=True)) / len(answers)
            if same < min_agreement:
                raise DeployError(
                    f"restore on {endpoint}: {served_name} now serves {path} but only {same:.2f} of its "
                    f"answers match those before the swap (min {min_agreement:.2f})",
                    step="restore",
                    endpoint=endpoint,
                )
            return f"restored {served_name} -> {path}; {same:.2f} of answers as before the swap"
        return f"restored {served_name} -> {path}; it answers"
    except VllmError as err:
        raise DeployError(f"restore on {endpoint} failed: {err}", step="restore", endpoint=endpoint) from err


# -- deploy ---------------------------------------------------------------------------------


@dataclass


class _Plan:
    """What every endpoint's deploy needs (built once by :func:`deploy_adapter`)."""

    served_name: str
    staging: str
    path: str
    cases: list[GoldenCase]
    previous: str | None
    scorer: Scorer
    min_agreement: float
    max_tokens: int
    progress: Progress
    baselines: dict[str, list[str]] = field(default_factory=dict)
    restore_targets: dict[str, str | None] = field(default_factory=dict)


def _deploy_endpoint(client: VllmClient, report: EndpointReport, plan: _Plan) -> None:
    """Deploy to one endpoint; on a failure after the stable swap began, restore it, then raise."""
    stable, staging, progress = plan.served_name, plan.staging, plan.progress
    prompts = [case.prompt for case in plan.cases]
    with _step(report, "health", progress):
        client.check_health()
        report.previous_served = client.adapters().get(stable)
    with _step(report, "load_staging", progress) as record:
        record.detail = client.load_adapter(staging, plan.path, inplace=True)
        _check_root(client, staging, plan.path)
    with _step(report, "verify_staging", progress) as record:
        staged = verify_served(
            client, staging, plan.cases, min_agreement=plan.min_agreement, scorer=plan.scorer, max_tokens=plan.max_tokens
        )
        report.staging = staged.to_dict()
        record.detail = staged.summary()
        if not staged.ok:
            raise _StepFailed("verify_staging", staged.summary())
    target = plan.previous if plan.previous is not None else report.previous_served
    if plan.previous is not None and report.previous_served not in (None, plan.previous):
        logger.warning(
            "%s serves %s as %s, but the caller's previous adapter is %s: a rollback restores the latter",
            client.base_url, report.previous_served, stable, plan.previous,
        )
    plan.restore_targets[client.base_url] = target
    if report.previous_served is not None:
        with _step(report, "snapshot_stable", progress) as record:
            plan.baselines[client.base_url] = client.chat_many(stable, prompts, max_tokens=plan.max_tokens)
            record.detail = f"{len(prompts)} answers of {stable} ({report.previous_served}) kept to check a rollback"
    try:
        with _step(report, "load_stable", progress) as record:
            record.detail = client.load_adapter(stable, plan.path, inplace=True)
            _check_root(client, stable, plan.path)
        report.swap_seconds = record.seconds
        with _step(report, "verify_stable", progress) as record:
            served = verify_served(
                client,
                stable,
                plan.cases,
                min_agreement=plan.min_agreement,
                scorer=plan.scorer,
                max_tokens=plan.max_tokens,
                reference=staged.answers,
            )
            report.stable = served.to_dict()
            record.detail = served.summary()
            if not served.ok:
                raise _StepFailed("verify_stable", served.summary())
    except BaseException:  # a failed step, or an interrupt: put the previous adapter back first
        report.status = "rolled_back" if _restore_endpoint(client, report, plan) else "rollback_failed"
        raise
    report.status = "deployed"


def _restore_endpoint(client: VllmClient, report: EndpointReport, plan: _Plan) -> bool:
    """Restore one endpoint's stable name; record the step; True if it was verified."""
    target = plan.restore_targets.get(client.base_url)
    baseline = plan.baselines.get(client.base_url)
    # Compare with the pre-swap answers only if we put back what was serving then.
    compare = baseline is not None and target is not None and report.previous_served == str(Path(target).resolve())
    try:
        with _step(report, "restore", plan.progress) as record:
            try:
                record.detail = restore(
                    client,
                    served_name=plan.served_name,
                    previous_adapter_dir=target,
                    prompts=[case.prompt for case in plan.cases],
                    baseline=baseline if compare else None,
                    min_agreement=plan.min_agreement,
                    max_tokens=plan.max_tokens,
                )
            except DeployError as err:
                raise _StepFailed("restore", str(err)) from err
    except _StepFailed:
        logger.error("ROLLBACK FAILED on %s: %s", client.base_url, report.steps[-1].detail)
        return False
    return True


def _reporter(progress: Progress | None) -> Progress:
    """Where a step's lines go: the caller's progress callback (an Airflow task's is its
    logger), else this module's logger; never both, or task logs show every line twice."""
    return progress if progress is not None else lambda message: logger.info("%s", message)


def deploy_adapter(
    endpoints: Sequence[str],
    adapter_dir: str | os.PathLike[str],
    *,
    served_name: str,
    golden: Sequence[Mapping[str, Any] | GoldenCase],
    previous_adapter_dir: str | os.PathLike[str] | None,
    api_key: str | None = None,
    max_lora_rank: int,
    base_model: str | os.PathLike[str],
    verify_min_agreement: float = 0.8,
    scorer: Scorer = exact_match,
    max_tokens: int = 96,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
    server_path: str | None = None,
    previous_server_path: str | None = None,
) -> DeployReport:
    """Validate ``adapter_dir``, then hot-swap it into the stable name on every endpoint.

    ``golden`` holds ``{"id", "prompt", "expected"}`` with the answers the evaluation measured
    for this adapter; ``scorer(answer, expected) -> [0, 1]`` (exact match by default) and
    ``verify_min_agreement`` decide whether a served name answers as it should. An empty
    ``golden`` (e.g. a manual redeploy with no eval scores at hand) is allowed but weaker: the
    report says ``verification: "smoke"``, and the stable name must answer a few smoke
    prompts exactly as staging did (which still catches a swap that did not take).
    ``previous_adapter_dir`` is what to restore on failure (None: first deploy; then the
    adapter the server lists for the stable name, if any, else the name is unloaded).
    ``server_path`` / ``previous_server_path``: where the servers hold these adapters when it
    is not the local directory (``vllm.adapter_source: store``: each server fetched its own
    copy, :mod:`tuneloop.serving.store_resolver`); the local ones are what is validated.
    Returns the report on success; raises :class:`DeployError` (with ``.report``) otherwise.
    """
    say = _reporter(progress)

    if not endpoints:
        raise ValueError("no vLLM endpoints given")
    if not 0.0 < verify_min_agreement <= 1.0:
        raise ValueError(f"verify_min_agreement must lie in (0, 1], got {verify_min_agreement}")
    started = time.perf_counter()
    path = server_path or str(Path(adapter_dir).resolve())
    previous_local = str(Path(previous_adapter_dir).resolve()) if previous_adapter_dir is not None else None
    previous = previous_server_path or previous_local
    report = DeployReport(
        adapter_dir=str(adapter_dir),
        served_path=path,
        served_name=served_name,
        staging_name=staging_name(served_name),
        base_model=str(base_model),
        previous_adapter_dir=previous,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        endpoints=[EndpointReport(endpoint=url.rstrip("/")) for url in endpoints],
    )

    def fail(step: str, endpoint: str | None, cause: str) -> DeployError:
        report.ok, report.failed_step, report.failed_endpoint = False, step, endpoint
        report.seconds = round(time.perf_counter() - started, 3)
        where = f" to {endpoint}" if endpoint else ""
        report.error = f"deploy of {path}{where} failed at step {step}: {cause}"
        return DeployError(report.error, step=step, endpoint=endpoint, report=report)

    try:
        cases = golden_cases(golden)
    except ValueError as err:
        raise fail("validate", None, str(err)) from err
    if not cases:
        cases = smoke_cases()
        report.verification = "smoke"
        logger.warning(
            "deploy of %s has no golden prompts: verifying only that %s answers like %s on smoke prompts",
            path, served_name, staging_name(served_name),
        )
    say(f"validate {adapter_dir}")
    try:
        info = validate_adapter(adapter_dir, base_model_dir_or_id=base_model, max_lora_rank=max_lora_rank)
    except AdapterValidationError as err:
        raise fail("validate", None, str(err)) from err
    report.adapter = info.to_dict()
    if previous_local is not None and previous_server_path is None and not (Path(previous_local) / ADAPTER_CONFIG).is_file():
        raise fail(
            "validate",
            None,
            f"the previous adapter {previous} (the rollback target) is gone; vLLM re-reads a served "
            "adapter from disk, so put it back, or pass previous_adapter_dir=None",
        )

    clients = [VllmClient(ep.endpoint, api_key=api_key, timeout_s=timeout_s) for ep in report.endpoints]
    plan = _Plan(
        served_name=served_name,
        staging=staging_name(served_name),
        path=path,
        cases=cases,
        previous=previous,
        scorer=scorer,
        min_agreement=verify_min_agreement,
        max_tokens=max_tokens,
        progress=say,
    )
    try:
        for client, ep in zip(clients, report.endpoints, strict=True):  # no swap before all answer
            with _step(ep, "preflight", say) as record:
                client.check_health()
                names = {str(m["id"]): m for m in client.models()}
                if base_name(served_name) not in names:
                    raise _StepFailed(
                        "preflight",
                        f"{client.base_url} does not serve {base_name(served_name)} (it serves {sorted(names)}): "
                        "start it with `make serve`",
                    )
                record.detail = f"serves {base_name(served_name)} from {names[base_name(served_name)].get('root')}"
    except _StepFailed as err:
        for client in clients:
            client.close()
        raise fail(err.step, ep.endpoint, err.cause) from (err.__cause__ or err)

    done: list[tuple[VllmClient, EndpointReport]] = []
    try:
        for client, ep in zip(clients, report.endpoints, strict=True):
            say(f"deploy {path} -> {ep.endpoint} ({len(done) + 1}/{len(clients)})")
            try:
                _deploy_endpoint(client, ep, plan)
            except BaseException as err:
                if ep.status == "pending":
                    ep.status = "failed"
                notes = [_rollback_note(ep, served_name)]
                for done_client, done_ep in reversed(done):
                    say(f"roll back {done_ep.endpoint} (deployed before {ep.endpoint} failed)")
                    ok = _restore_endpoint(done_client, done_ep, plan)
                    done_ep.status = "rolled_back" if ok else "rollback_failed"
                    notes.append(_rollback_note(done_ep, served_name))
                if not isinstance(err, _StepFailed):
                    raise
                cause = "; ".join([err.cause, *(note for note in notes if note)])
                raise fail(err.step, ep.endpoint, cause) from (err.__cause__ or err)
            done.append((client, ep))
    finally:
        for client in clients:
            client.close()
    report.ok = True
    report.seconds = round(time.perf_counter() - started, 3)
    say(f"deployed {path} as {served_name} on {len(done)} endpoint(s) in {report.seconds:.1f} s")
    return report


def _rollback_note(ep: EndpointReport, served_name: str) -> str:
    """A clause for the error message saying what happened to the stable name on ``ep``."""
    if ep.status == "rolled_back":
        return f"{ep.endpoint}: {served_name} rolled back ({ep.steps[-1].detail})"
    if ep.status == "rollback_failed":
        return f"{ep.endpoint}: ROLLBACK FAILED, {served_name} may serve the new adapter: {ep.steps[-1].detail}"
    if ep.status == "failed":
        return f"{ep.endpoint}: {served_name} untouched"
    return ""


# -- reconcile ------------------------------------------------------------------------------


@dataclass


class ReconcileRecord:
    """What reconcile found and did on one endpoint."""

    endpoint: str
    before: str | None = None  # the adapter directory the stable name served, None if not loaded
    action: str = "pending"  # in_sync | loaded | unloaded | failed
    detail: str = ""
    seconds: float = 0.0


def unload_stale_eval_names(client: VllmClient, served_name: str, max_age_s: float | None) -> list[str]:
    """Unload the evaluation names a killed evaluation left on this server (older than
    ``max_age_s``; None: none); returns them."""
    if max_age_s is None:
        return []
    from tuneloop.ml.vllm_backend import stale_eval_names

    stale = stale_eval_names(client.adapters(), served_name, max_age_s=max_age_s)
    for name in stale:
        client.unload_adapter(name)
    return stale


def reconcile(
    endpoints: Sequence[str],
    adapter_dir: str | os.PathLike[str] | None,
    *,
    served_name: str,
    base_model: str | os.PathLike[str],
    max_lora_rank: int,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
    server_path: str | None = None,
    stale_eval_after_s: float | None = None,
) -> list[ReconcileRecord]:
    """Make every endpoint's stable name serve exactly ``adapter_dir`` (None: no adapter at all).

    Run after a vLLM restart (the server forgot its runtime adapters), before a deploy (so the
    restore target is what really serves), and after a failed deploy, verify or registry
    write (so the servers agree with the registry again). An endpoint already serving
    ``adapter_dir`` is only checked to answer; another is loaded in place (no window without
    the name), checked to list the new root and to answer. Every endpoint is tried even if
    one fails; then :class:`DeployError` (step ``reconcile``) names each failure. With
    ``stale_eval_after_s``, evaluation names older than that (a killed evaluation's) are
    unloaded too.
    """

    say = _reporter(progress)

    path = (server_path or str(Path(adapter_dir).resolve())) if adapter_dir is not None else None
    if adapter_dir is not None:
        try:
            validate_adapter(adapter_dir, base_model_dir_or_id=base_model, max_lora_rank=max_lora_rank)
        except AdapterValidationError as err:
            raise DeployError(f"reconcile refused {path}: {err}", step="reconcile", endpoint=None) from err
    records = [ReconcileRecord(endpoint=url.rstrip("/")) for url in endpoints]
    for record in records:
        started = time.perf_counter()
        try:
            with VllmClient(record.endpoint, api_key=api_key, timeout_s=timeout_s) as client:
                client.check_health()
                swept = unload_stale_eval_names(client, served_name, stale_eval_after_s)
                record.before = client.adapters().get(served_name)
                if record.before == path:
                    if path is not None:
                        client.chat(served_name, "ping", max_tokens=1)
                    record.action, record.detail = "in_sync", f"{served_name} already serves {path or 'no adapter'}"
                else:  # the same in-place load (or unload) and checks a failed deploy's restore does
                    record.detail = restore(client, served_name=served_name, previous_adapter_dir=path)
                    record.action = "unloaded" if path is None else "loaded"
            if swept:
                record.detail += f"; unloaded {len(swept)} stale evaluation name(s): {', '.join(swept)}"
        except (DeployError, VllmError, ValueError, OSError) as err:
            record.action, record.detail = "failed", str(err)
        record.seconds = round(time.perf_counter() - started, 3)
        say(f"reconcile {record.endpoint}: {record.action}: {record.detail}")
    failed = [r for r in records if r.action == "failed"]
    if failed:
        want = path or "no adapter"
        raise DeployError(
            f"reconcile to {want} failed on {len(failed)} of {len(records)} endpoint(s): "
            + "; ".join(f"{r.endpoint}: {r.detail}" for r in failed)
            + ". Fix the server (is it up? `make serve`) and run `tuneloop reconcile` again",
            step="reconcile",
            endpoint=failed[0].endpoint,
        )
    return records
