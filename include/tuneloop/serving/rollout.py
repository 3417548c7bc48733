"""Roll a new adapter version out behind a gateway: immutable names, switch or canary, bake, rollback.

``serving.rollout: inplace`` swaps weights behind the stable name (:mod:`tuneloop.serving.deploy`);
an answer in flight during that load can start on the old weights and end on the new. Here
every version loads under its own name (``<served>-<version>``) and never changes; the stable
name is an alias in the gateway (:mod:`tuneloop.serving.gateway`), so each request is answered
by exactly one version. Steps, as named in reports and errors:

``validate`` -> ``preflight`` (every endpoint healthy, serves the base model, has a LoRA slot)
-> ``load`` (the version's own name, on every endpoint) -> ``verify`` (golden prompts on that
name, as the evaluation answered them) -> ``shadow`` (recent traffic replayed to the candidate
and to production, compared; nothing reaches a user) -> ``shift`` (the alias's weights, in steps; ``switch``
is one step of 100) with a ``bake`` per step -> ``settle`` (the new version takes all
traffic; the previous one stays loaded as last-known-good) -> ``retire`` (after a grace
period, versions older than last-known-good are unloaded).

The bake reads the gateway's access log: per version, requests, errors (5xx, and 404: a name
that is not loaded) and p99 latency, and a sample of the candidate's answers scored with the
task's reference-free check (valid JSON of the schema, a label in the set); with
``live_sample``, some of those answers are graded against the previous version's answer to the
same request (asked again, greedy) by the task's judge or agreement. A breach (error rate, p99
against the previous version's in the same window, validity below the candidate's offline
figure minus a margin, live agreement below the shadow replay's minus a margin) returns all traffic to the previous versions (a change of
weights: the previous version is still loaded) and raises :class:`RolloutError` with the reason.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.serving.adapters import AdapterValidationError, validate_adapter
from tuneloop.serving.deploy import DeployError
from tuneloop.serving.gateway import Alias, LogRecord, RouteTable, read_access_log, version_name
from tuneloop.serving.verify import (
    GoldenCase,
    Scorer,
    base_name,
    exact_match,
    golden_cases,
    verify_served,
)
from tuneloop.serving.vllm_client import ChatReply, Prompt, VllmClient, VllmError

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
Validity = Callable[[str], bool]
# (answer, reference answer, the request's prompt) -> 0..1: the task's agreement, or its LLM judge
Grader = Callable[[str, str, Prompt], float]

STRATEGIES = ("inplace", "switch", "canary")


@dataclass
class RolloutPolicy:
    """How a version is shifted in and what the bake accepts (``serving.*`` in the loop config)."""

    strategy: str = "switch"
    steps: tuple[float, ...] = (10.0, 50.0, 100.0)  # canary weights, percent of the alias's traffic
    bake_s: float = 60.0  # per canary step; switch bakes its single step too
    poll_s: float = 1.0
    grace_s: float = 5.0  # before versions older than last-known-good are unloaded
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5  # candidate p99 / previous version's p99 in the same window
    p99_floor_ms: float = 50.0  # differences below this are never a breach
    validity_margin: float = 0.05
    capture_share: float = 0.25  # share of the candidate's answers the gateway logs for the bake
    min_requests: int = 20  # fewer requests than this in a step are reported, not judged
    live_sample: int = 0  # captured live answers per step graded against the previous version's answer
    live_margin: float = 0.15  # live agreement may fall this far below the shadow replay's
    min_live_agreement: float | None = None  # a fixed floor instead (also without a shadow replay)

    def __post_init__(self) -> None:
        if self.strategy not in ("switch", "canary"):
            raise ValueError(f"rollout strategy must be switch or canary here (inplace is tuneloop.serving.deploy), got {self.strategy!r}")
        steps = tuple(float(s) for s in self.steps)
        if not steps or steps[-1] != 100.0 or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(steps):
            raise ValueError(f"canary steps must rise within (0, 100] and end at 100, got {list(self.steps)}")
        self.steps = steps
        if not 0.0 < self.capture_share <= 1.0:
            raise ValueError(f"capture_share must lie in (0, 1], got {self.capture_share}")

    def weights(self) -> tuple[float, ...]:
        return (100.0,) if self.strategy == "switch" else self.steps


@dataclass
class VersionStats:
    """What the gateway's log shows for one version during one bake step."""

    requests: int = 0
    errors: int = 0
    p99_ms: float | None = None
    sampled: int = 0
    valid: int = 0
    graded: int = 0  # live answers graded against the previous version's answer to the same request
    agreement_sum: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def validity(self) -> float | None:
        return self.valid / self.sampled if self.sampled else None

    @property
    def agreement(self) -> float | None:
        return self.agreement_sum / self.graded if self.graded else None


@dataclass
class BakeRecord:
    weight: float
    seconds: float
    candidate: VersionStats
    previous: VersionStats
    verdict: str = "pass"  # pass | breach | not_judged
    reason: str = ""
    queue_max: float | None = None  # the most requests waiting on the servers (vLLM /metrics) at a poll


@dataclass
class RolloutReport:
    """The result of :func:`rollout_version` (artifact form: ``to_dict``)."""

    strategy: str
    version: str
    version_name: str
    alias: str
    adapter_path: str
    previous_routes: dict[str, float]
    started_at: str
    ok: bool = False
    seconds: float = 0.0
    offline_validity: float | None = None
    shadow: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    bakes: list[BakeRecord] = field(default_factory=list)
    retired: dict[str, list[str]] = field(default_factory=dict)
    last_known_good: str | None = None
    failed_step: str | None = None
    error: str | None = None
    rolled_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RolloutError(DeployError):
    """A rollout stopped; ``step``, ``rollout`` (the report) and the message say where, why and
    what was undone. A :class:`DeployError`, so every caller of a deploy handles it."""

    def __init__(self, message: str, *, step: str, report: RolloutReport) -> None:
        super().__init__(message, step=step)
        self.rollout = report


def versions_on(client: VllmClient, served_name: str, adapters: Mapping[str, str] | None = None) -> dict[str, str]:
    """This loop's version names loaded on a server (``<served>-v<N>`` -> path); other loops'
    names, the base model, staging and evaluation names are not versions. ``adapters``: the
    server's listing when the caller already has it."""
    pattern = re.compile(re.escape(served_name) + r"-v\d+")
    listed = client.adapters() if adapters is None else adapters
    return {name: root for name, root in listed.items() if pattern.fullmatch(name)}


def answer_text(raw: str) -> str | None:
    """The assistant text of a logged response: a chat or completion JSON body, or an SSE
    stream of chunks. None if it cannot be read (a truncated capture)."""
    raw = raw.strip()
    if raw.startswith("data:"):
        parts = []
        for line in raw.splitlines():
            line = line.strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            try:
                choice = json.loads(line[5:])["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                return None
            parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
        return "".join(parts)
    try:
        choice = json.loads(raw)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    message = choice.get("message")
    return (message.get("content") if isinstance(message, dict) else choice.get("text")) or ""


def _percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of durations in seconds, in milliseconds; None if empty."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 1)


def version_stats(records: Sequence[LogRecord], versions: str | Collection[str], validity: Validity | None = None) -> VersionStats:
    """What the gateway's log shows for one version (or several, merged): requests, errors
    (5xx, and 404: a name that is not loaded), p99 of the answered, and with ``validity`` the
    valid share of the sampled answers."""
    wanted = {versions} if isinstance(versions, str) else set(versions)
    mine = [r for r in records if r.version in wanted]
    stats = VersionStats(
        requests=len(mine),
        errors=sum(r.status >= 500 or r.status == 404 for r in mine),
        p99_ms=_percentile_ms([r.seconds for r in mine if r.status < 400], 0.99),
    )
    if validity is not None:
        for record in mine:
            if record.answer and record.status == 200:
                text = answer_text(record.answer)
                if text is None:
                    continue
                stats.sampled += 1
                stats.valid += bool(validity(text))
    return stats


def live_requests(records: Sequence[LogRecord], version: str, n: int) -> list[tuple[Prompt, int | None, str]]:
    """Up to ``n`` of ``version``'s captured answers that can be asked again: ``(messages,
    max_tokens, answer text)``. A request too long to capture or of the completions API is skipped."""
    found: list[tuple[Prompt, int | None, str]] = []
    for record in records:
        if len(found) >= n:
            break
        if record.version != version or record.status != 200 or not record.request or not record.answer:
            continue
        text = answer_text(record.answer)
        try:
            asked = json.loads(record.request)
        except ValueError:
            continue
        messages = asked.get("messages") if isinstance(asked, dict) else None
        if text is None or not isinstance(messages, list) or not messages:
            continue
        max_tokens = asked.get("max_tokens")
        found.append((messages, max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None, text))
    return found


def grade_live(
    client: VllmClient, previous: str, asked: Sequence[tuple[Prompt, int | None, str]], grader: Grader, *, max_tokens: int
) -> tuple[int, float]:
    """Ask ``previous`` each captured request again (greedy) and grade the candidate's live
    answer against its answer: ``(graded, sum of grades)``. Nothing reaches a user."""
    graded, total = 0, 0.0
    for prompt, asked_tokens, answer in asked:
        limit = min(asked_tokens or max_tokens, 4 * max_tokens)  # a client's huge max_tokens is not ours to pay
        reference = client.chat_reply(previous, prompt, max_tokens=limit).text
        total += float(grader(answer, reference, prompt))
        graded += 1
    return graded, total


def judge_bake(
    candidate: VersionStats,
    previous: VersionStats | None,
    policy: RolloutPolicy,
    validity_floor: float | None,
    agreement_floor: float | None = None,
) -> tuple[str, str]:
    """``(verdict, reason)`` for what a step has seen so far."""
    if candidate.requests < policy.min_requests:
        return "not_judged", f"{candidate.requests} requests reached the candidate (fewer than {policy.min_requests})"
    if candidate.error_rate > policy.max_error_rate:
        return "breach", f"error rate {candidate.error_rate:.3f} ({candidate.errors} of {candidate.requests}) above {policy.max_error_rate}"
    if validity_floor is not None and candidate.validity is not None and candidate.sampled >= min(10, policy.min_requests):
        if candidate.validity < validity_floor:
            return "breach", (
                f"validity of live answers {candidate.validity:.2f} ({candidate.valid} of {candidate.sampled} sampled) "
                f"below {validity_floor:.2f} (offline figure minus {policy.validity_margin})"
            )
    if agreement_floor is not None and candidate.agreement is not None and candidate.agreement < agreement_floor:
        return "breach", (
            f"live answers agree {candidate.agreement:.2f} with the previous version's answers to the same requests "
            f"({candidate.graded} graded), below {agreement_floor:.2f}"
        )
    if previous is not None and previous.p99_ms and candidate.p99_ms and previous.requests >= policy.min_requests:
        ratio = candidate.p99_ms / previous.p99_ms
        if ratio > policy.max_p99_ratio and candidate.p99_ms - previous.p99_ms > policy.p99_floor_ms:
            return "breach", f"p99 {candidate.p99_ms:.0f} ms is {ratio:.2f}x the previous version's {previous.p99_ms:.0f} ms (max {policy.max_p99_ratio}x)"
    return "pass", ""


def shadow_compare(
    client: VllmClient,
    production: str,
    candidate: str,
    prompts: Sequence[Prompt],
    *,
    scorer: Scorer,
    validity: Validity | None,
    max_tokens: int,
    concurrency: int = 4,
    grader: Grader | None = None,
) -> dict[str, Any]:
    """Replay ``prompts`` (recent production traffic) to both names on one server and compare:
    the candidate's agreement with production's answers (the task's scorer), the validity of
    each side's answers, and each side's latency. ``grader`` (the task's judge) replaces the
    scorer for the agreement when given. Nothing reaches a user."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(name: str) -> list[ChatReply]:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="shadow") as pool:
            return list(pool.map(lambda p: client.chat_reply(name, p, max_tokens=max_tokens), prompts))

    theirs, ours = ask(production), ask(candidate)

    def p_ms(replies: list[ChatReply], q: float) -> float | None:
        return _percentile_ms([r.seconds for r in replies], q)

    agreement = [
        float(grader(c.text, p.text, prompt) if grader is not None else scorer(c.text, p.text))
        for c, p, prompt in zip(ours, theirs, prompts, strict=True)
    ]
    result: dict[str, Any] = {
        "n": len(prompts),
        "production": production,
        "candidate": candidate,
        "agreement": round(sum(agreement) / len(agreement), 4),
        "identical": sum(c.text.strip() == p.text.strip() for c, p in zip(ours, theirs, strict=True)),
        "latency_ms": {
            "production": {"p50": p_ms(theirs, 0.5), "p99": p_ms(theirs, 0.99)},
            "candidate": {"p50": p_ms(ours, 0.5), "p99": p_ms(ours, 0.99)},
        },
    }
    if validity is not None:
        result["validity"] = {
            "production": round(sum(bool(validity(r.text)) for r in theirs) / len(theirs), 4),
            "candidate": round(sum(bool(validity(r.text)) for r in ours) / len(ours), 4),
        }
    return result


def waiting_requests(metrics_text: str) -> float:
    """``vllm:num_requests_waiting`` summed over the exposition's series (one per engine)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(("vllm:num_requests_waiting{", "vllm:num_requests_waiting ")):  # not ..._by_reason
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return total


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def rollout_version(
    endpoints: Sequence[str],
    adapter_dir: str | os.PathLike[str],
    *,
    routes: RouteTable,
    access_log: str | os.PathLike[str] | None,
    served_name: str,
    version: str,
    golden: Sequence[Mapping[str, Any] | GoldenCase],
    policy: RolloutPolicy,
    max_lora_rank: int,
    max_loras: int,
    max_cpu_loras: int | None = None,
    base_model: str | os.PathLike[str],
    validity: Validity | None = None,
    offline_validity: float | None = None,
    scorer: Scorer = exact_match,
    verify_min_agreement: float = 0.8,
    max_tokens: int = 96,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    server_path: str | None = None,
    shadow_prompts: Sequence[Prompt] = (),
    min_shadow_agreement: float | None = None,
    grader: Grader | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutReport:
    """Load ``version`` under its own name on every endpoint, verify it, shift the alias
    ``served_name`` to it by ``policy`` with a bake per step, and retire old versions.

    ``validity(answer)`` is the task's reference-free check the bake applies to sampled live
    answers; ``offline_validity`` its share on the candidate's evaluated answers (default: on
    the golden answers). ``shadow_prompts`` (recent traffic) are replayed to the candidate and to
    production before any traffic shifts (``report.shadow``); with ``min_shadow_agreement`` a
    candidate that agrees less with production stops there. ``grader(answer, reference, prompt)``
    (the task's judge, or its agreement) grades the shadow replay and, with
    ``policy.live_sample``, that many captured live answers per bake step against the previous
    version's answer to the same request (floor: ``policy.min_live_agreement``, else the shadow
    figure minus ``policy.live_margin``). Raises :class:`RolloutError` (with ``.rollout``); by then the alias
    routes as before the rollout (the candidate's name stays loaded until the next reconcile or
    rollout retires it).
    """
    say = progress or (lambda message: logger.info("%s", message))
    started = time.perf_counter()
    name = version_name(served_name, version)
    path = server_path or str(Path(adapter_dir).resolve())
    before = routes.alias(served_name)
    report = RolloutReport(
        strategy=policy.strategy,
        version=version,
        version_name=name,
        alias=served_name,
        adapter_path=path,
        previous_routes=dict(before.routes),
        started_at=_stamp(),
    )
    clients = [VllmClient(url, api_key=api_key, timeout_s=timeout_s) for url in endpoints]
    grade: Grader = grader or (lambda answer, reference, _prompt: float(scorer(answer, reference)))

    def step(label: str, detail: str, t0: float) -> None:
        report.steps.append({"step": label, "seconds": round(time.perf_counter() - t0, 3), "detail": detail})
        say(f"{label}: {detail}")

    def fail(label: str, cause: str, *, restore: bool) -> RolloutError:
        if restore and before.routes:
            routes.set_alias(served_name, before.routes, capture={})
            report.rolled_back = True
            cause += f"; traffic returned to {before.serving()}"
        report.failed_step, report.error = label, f"rollout of {name} failed at step {label}: {cause}"
        report.seconds = round(time.perf_counter() - started, 3)
        say(report.error)
        return RolloutError(report.error, step=label, report=report)

    try:
        t0 = time.perf_counter()
        cases = golden_cases(golden)
        try:
            validate_adapter(adapter_dir, base_model_dir_or_id=base_model, max_lora_rank=max_lora_rank)
        except AdapterValidationError as err:
            raise fail("validate", str(err), restore=False) from err
        report.offline_validity = offline_validity
        if validity is not None and offline_validity is None and cases:  # else: the golden answers' own figure
            expected = [c.expected for c in cases if c.expected is not None]
            report.offline_validity = sum(bool(validity(e)) for e in expected) / len(expected) if expected else None
        step("validate", f"{adapter_dir} fits {base_model}", t0)

        t0 = time.perf_counter()
        keep = set(before.serving()) | ({before.last_known_good} if before.last_known_good else set())
        for client in clients:
            try:
                client.check_health()
                models = {str(m["id"]) for m in client.models()}
                if base_name(served_name) not in models:
                    raise fail("preflight", f"{client.base_url} does not serve {base_name(served_name)}: start it with `make serve`", restore=False)
                adapters = client.adapters()
                loaded = versions_on(client, served_name, adapters)
            except VllmError as err:
                raise fail("preflight", str(err), restore=False) from err
            if name in loaded and loaded[name] != path:
                raise fail(
                    "preflight",
                    f"{client.base_url} already serves {name} from {loaded[name]}, not {path}: version names are immutable; "
                    "unload it (`tuneloop reconcile`) or roll out a new version",
                    restore=False,
                )
            spare = [n for n in loaded if n not in keep and n != name]
            busy = len([v for v in before.serving() if v != name]) + 1  # routed versions + the candidate, at once in a canary
            if busy > max_loras:
                raise fail(
                    "preflight",
                    f"{busy} versions of {served_name} would take traffic at once, more than --max-loras {max_loras} "
                    "(more busy adapters than slots stall requests): raise --max-loras",
                    restore=False,
                )
            held = len(adapters) - len(spare) + (name not in loaded)
            if max_cpu_loras is not None and held > max_cpu_loras:
                raise fail(
                    "preflight",
                    f"{client.base_url} would hold {held} adapters, more than --max-cpu-loras {max_cpu_loras}: raise it, "
                    "or unload evaluation names left behind (`tuneloop reconcile`)",
                    restore=False,
                )
            for spare_name in spare:  # versions nobody routes to any more: make room first
                client.unload_adapter(spare_name)
        step("preflight", f"{len(clients)} endpoint(s) healthy; keeping {sorted(keep) or 'nothing'} loaded", t0)

        t0 = time.perf_counter()
        for client in clients:
            try:
                if name not in versions_on(client, served_name):
                    client.load_adapter(name, path, inplace=False)
                listed = client.adapters().get(name)
                if listed != path:
                    raise fail("load", f"{client.base_url} lists {name} -> {listed!r} after the load, expected {path}", restore=False)
            except VllmError as err:
                raise fail("load", str(err), restore=False) from err
        step("load", f"{name} <- {path} on {len(clients)} endpoint(s)", t0)

        t0 = time.perf_counter()
        for client in clients:
            try:
                checked = verify_served(
                    client, name, cases or [GoldenCase(id="smoke", prompt="ping", expected=None)],
                    min_agreement=verify_min_agreement, scorer=scorer, max_tokens=max_tokens,
                )
            except VllmError as err:
                raise fail("verify", str(err), restore=False) from err
            if not checked.ok:
                raise fail("verify", f"{client.base_url}: {checked.summary()}", restore=False)
        step("verify", f"{name} answers its golden prompts as evaluated on every endpoint", t0)

        if shadow_prompts:
            t0 = time.perf_counter()
            production = before.serving()[0] if before.serving() else base_name(served_name)
            try:
                report.shadow = shadow_compare(
                    clients[0], production, name, shadow_prompts, scorer=scorer, validity=validity, max_tokens=max_tokens, grader=grade
                )
            except VllmError as err:
                raise fail("shadow", str(err), restore=False) from err
            except Exception as err:  # the judge: no traffic has moved, so stop here and say why
                raise fail("shadow", f"grading the replay failed ({type(err).__name__}: {err})", restore=False) from err
            shadow = report.shadow
            detail = (
                f"{shadow['n']} recent prompts: agreement with {production} {shadow['agreement']:.2f} ({shadow['identical']} identical), "
                f"p99 {shadow['latency_ms']['candidate']['p99']} vs {shadow['latency_ms']['production']['p99']} ms"
                + (f", validity {shadow['validity']['candidate']:.2f} vs {shadow['validity']['production']:.2f}" if "validity" in shadow else "")
            )
            step("shadow", detail, t0)
            if min_shadow_agreement is not None and shadow["agreement"] < min_shadow_agreement:
                raise fail("shadow", f"{detail}: below serving.min_shadow_agreement {min_shadow_agreement}", restore=False)

        floor = None if report.offline_validity is None else max(0.0, report.offline_validity - policy.validity_margin)
        previous_versions = [v for v in before.serving() if v != name]
        live = None
        if policy.live_sample > 0 and previous_versions:
            shadow_floor = report.shadow["agreement"] - policy.live_margin if report.shadow else None
            live = _LiveGrading(
                clients[0], previous_versions[0], grade, policy.live_sample, max_tokens, policy.min_live_agreement if policy.min_live_agreement is not None else shadow_floor,
            )
        capture = {name: policy.capture_share} if validity is not None or live is not None else {}
        for weight in policy.weights() if previous_versions else (100.0,):
            t0 = time.perf_counter()
            share = {v: w * (100.0 - weight) / sum(before.routes[p] for p in previous_versions) for v, w in before.routes.items() if v in previous_versions}
            new_routes = {**{v: round(w, 3) for v, w in share.items() if w > 0}, name: weight}
            offset = Path(access_log).stat().st_size if access_log and Path(access_log).is_file() else 0
            routes.set_alias(served_name, new_routes, capture=capture)
            step("shift", f"{served_name} -> {new_routes}", t0)
            if access_log is None or policy.bake_s <= 0:
                continue
            bake = _bake(access_log, offset, name, previous_versions, weight, policy, validity, floor, sleep, queue=lambda: _queue(clients), live=live)
            report.bakes.append(bake)
            say(f"bake at {weight:g}%: {bake.verdict}" + (f" ({bake.reason})" if bake.reason else "")
                + f"; candidate {bake.candidate.requests} requests, {bake.candidate.errors} errors, p99 {bake.candidate.p99_ms} ms"
                + (f", validity {bake.candidate.validity:.2f} of {bake.candidate.sampled}" if bake.candidate.validity is not None else "")
                + (f", live agreement {bake.candidate.agreement:.2f} of {bake.candidate.graded}" if bake.candidate.agreement is not None else ""))
            if bake.verdict == "breach":
                raise fail("bake", f"at {weight:g}% of traffic: {bake.reason}", restore=True)

        t0 = time.perf_counter()
        lkg = previous_versions[0] if previous_versions else before.last_known_good
        routes.set_alias(served_name, {name: 100.0}, capture={}, last_known_good=lkg)
        report.last_known_good = lkg
        step("settle", f"{served_name} -> {name} (100%); last-known-good {lkg or 'none'} stays loaded", t0)
    except RolloutError:
        for client in clients:
            client.close()
        raise
    except BaseException as err:  # an interrupt or a bug: leave the alias as it was
        for client in clients:
            client.close()
        if not isinstance(err, Exception):
            if before.routes:
                routes.set_alias(served_name, before.routes, capture={})
            raise
        raise fail("shift", f"{type(err).__name__}: {err}", restore=True) from err

    t0 = time.perf_counter()
    sleep(policy.grace_s)  # requests routed to an old version before the flip finish on it
    keep_after = {name} | ({report.last_known_good} if report.last_known_good else set())
    for client in clients:
        try:
            for old in sorted(set(versions_on(client, served_name)) - keep_after):
                client.unload_adapter(old)
                report.retired.setdefault(client.base_url, []).append(old)
        except VllmError as err:  # a leftover name costs a slot, not an answer: the next reconcile retries
            say(f"retire on {client.base_url} failed ({err}); reconcile will unload the leftovers")
        finally:
            client.close()
    step("retire", f"unloaded {sum(len(v) for v in report.retired.values())} old version name(s)", t0)
    report.ok = True
    report.seconds = round(time.perf_counter() - started, 3)
    return report


@dataclass
class _LiveGrading:
    """The bake's grading of live answers against the previous version (``live_sample`` > 0)."""

    client: VllmClient
    previous: str
    grader: Grader
    sample: int
    max_tokens: int
    floor: float | None


def _bake(
    access_log: str | os.PathLike[str],
    offset: int,
    name: str,
    previous_versions: list[str],
    weight: float,
    policy: RolloutPolicy,
    validity: Validity | None,
    floor: float | None,
    sleep: Callable[[float], None],
    queue: Callable[[], float | None] = lambda: None,
    live: _LiveGrading | None = None,
) -> BakeRecord:
    """Watch one step for ``policy.bake_s``; stop at the first breach. ``queue()`` reads the
    servers' waiting requests at each poll (vLLM's metrics are not split by adapter, so the
    per-version figures come from the gateway's log; the queue is reported beside them).
    ``live`` grades captured answers once the step's time is up (it costs requests)."""
    records: list[LogRecord] = []
    t0 = time.monotonic()
    verdict, reason = "not_judged", ""
    previous = VersionStats()
    candidate = VersionStats()
    queue_max: float | None = None
    while True:
        sleep(min(policy.poll_s, policy.bake_s))
        waiting = queue()
        if waiting is not None:
            queue_max = waiting if queue_max is None else max(queue_max, waiting)
        fresh, offset = read_access_log(access_log, offset)
        records.extend(fresh)
        candidate = version_stats(records, name, validity)
        previous = version_stats(records, previous_versions)
        verdict, reason = judge_bake(candidate, previous, policy, floor)
        if verdict == "breach" or time.monotonic() - t0 >= policy.bake_s:
            break
    if live is not None and verdict != "breach":
        asked = live_requests(records, name, live.sample)
        try:
            candidate.graded, candidate.agreement_sum = grade_live(live.client, live.previous, asked, live.grader, max_tokens=live.max_tokens)
        except Exception as err:  # the previous version or the judge could not answer: not the candidate's fault
            logger.warning("live grading against %s failed (%s: %s); the step is judged without it", live.previous, type(err).__name__, err)
        if candidate.requests >= policy.min_requests:
            verdict, reason = judge_bake(candidate, previous, policy, floor, live.floor)
    return BakeRecord(
        weight=weight, seconds=round(time.monotonic() - t0, 2), candidate=candidate, previous=previous, verdict=verdict, reason=reason, queue_max=queue_max
    )


def _queue(clients: Sequence[VllmClient]) -> float | None:
    try:
        return sum(waiting_requests(client.metrics()) for client in clients)
    except VllmError:
        return None  # a metrics hiccup is not a breach: the gateway's log still judges


def rollout_markdown(report: RolloutReport) -> str:
    """The rollout in a few lines of Markdown, to read beside the gate's report."""
    outcome = "rolled back" if report.rolled_back else ("settled" if report.ok else "stopped")
    lines = [
        f"# Rollout of {report.version} ({report.version_name}): {outcome}",
        "",
        f"Strategy `{report.strategy}`, started {report.started_at}, {report.seconds:.1f} s; before it, "
        f"`{report.alias}` routed to {report.previous_routes or 'nothing'}.",
    ]
    if report.error:
        lines += ["", f"**Why it stopped:** {report.error}"]
    if report.shadow:
        sh = report.shadow
        lines += [
            "",
            "## Shadow replay (before any traffic)",
            "",
            "| | production | candidate |",
            "| --- | --- | --- |",
            f"| name | {sh['production']} | {sh['candidate']} |",
            f"| p50 / p99 ms | {sh['latency_ms']['production']['p50']} / {sh['latency_ms']['production']['p99']} | "
            f"{sh['latency_ms']['candidate']['p50']} / {sh['latency_ms']['candidate']['p99']} |",
        ]
        if "validity" in sh:
            lines.append(f"| valid answers | {sh['validity']['production']:.2f} | {sh['validity']['candidate']:.2f} |")
        lines += ["", f"{sh['n']} recent prompts; agreement with production {sh['agreement']:.2f}, {sh['identical']} identical answers."]
    if report.bakes:
        lines += ["", "## Bake per step", "", "| weight | seconds | requests | errors | p99 ms (new / previous) | valid sampled | live agreement | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for bake in report.bakes:
            c, p = bake.candidate, bake.previous
            valid = f"{c.valid}/{c.sampled}" if c.sampled else "-"
            live = f"{c.agreement:.2f} of {c.graded}" if c.agreement is not None else "-"
            lines.append(
                f"| {bake.weight:g} % | {bake.seconds} | {c.requests} | {c.errors} | {c.p99_ms} / {p.p99_ms} | {valid} | {live} | "
                f"{bake.verdict}{': ' + bake.reason if bake.reason else ''} |"
            )
    if report.last_known_good:
        lines += ["", f"Last-known-good, still loaded: {report.last_known_good}."]
    return "\n".join(lines) + "\n"


def flip_back(routes: RouteTable, served_name: str) -> Alias:
    """Rollback by weights: route all of ``served_name`` to its last-known-good version (which
    stays loaded); returns the alias as it was. Raises ``ValueError`` when there is none."""
    alias = routes.alias(served_name)
    if not alias.last_known_good:
        raise ValueError(f"{served_name} has no last-known-good version in {routes.path}: roll back with a deploy of the previous version")
    current = alias.serving()
    routes.set_alias(served_name, {alias.last_known_good: 100.0}, capture={}, last_known_good=current[0] if current else None)
    return alias
