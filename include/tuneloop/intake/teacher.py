"""Distillation: a teacher model labels fresh traffic (``data.label_source: teacher``).

A bigger model behind any OpenAI-compatible ``/chat/completions`` endpoint (a bigger vLLM
model, a hosted API) answers a sample of the traffic window; its answers become labelled rows
that go through intake like any other (GX, PII, leakage, quarantine), then training and the
gate. What this module adds around the HTTP calls:

- **residency first**: ``teacher.data_residency: local_only`` refuses an endpoint that is not on
  loopback, a private network or ``teacher.private_hosts`` before anything is sent; PII in the
  prompts is redacted (or the row held back) before it goes to a teacher that is not local;
- **which rows**: exact and near-duplicate inputs dropped, then a seeded sample stratified by
  slice, capped at ``teacher.sample_rows``;
- **robust calls**: a thread pool (``max_concurrency``), a rate limit (``requests_per_minute``),
  retries with exponential backoff on 408/429/5xx and timeouts (``Retry-After`` honoured), a
  budget in requests, tokens or money; a content-addressed answer cache, so the same prompt,
  teacher and settings are never paid for twice (a killed run re-runs for free);
- **checks on the labels**: the task's validity check (schema, label set: a failing answer is
  quarantined with the reason), self-consistency on a sample (two more answers at
  ``consistency_temperature``, scored against each other with the task's scorer), and
  agreement with human labels where some exist for the same ids, per slice with an interval;
- **an account**: requests, cache hits, retries, tokens, seconds and estimated money.

Every selected row ends up labelled or quarantined with a reason; none is lost.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tuneloop.progress import Progress

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    from tuneloop.config import TeacherSettings
    from tuneloop.tasks import Example, TaskSpec

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class TeacherError(RuntimeError):
    """The labelling cannot start or cannot go on; the message says what to fix."""


# --- where the prompts may go ---------------------------------------------------------------


def is_local_host(host: str | None, private_hosts: Sequence[str] = ()) -> bool:
    """Loopback, a private or link-local address, ``localhost`` or a host named in ``private_hosts``.

    Names are not resolved: a cluster-internal name (``teacher.ml.svc``) counts as local only
    when listed, so a DNS change cannot send prompts outside without a config change."""
    if not host:
        return False
    if host.lower() in {"localhost", *(h.lower() for h in private_hosts)}:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def check_residency(cfg: TeacherSettings) -> bool:
    """Whether the teacher is local; raises before any request when ``local_only`` forbids it."""
    if not (cfg.endpoint and cfg.model):
        raise TeacherError("data.label_source=teacher needs teacher.endpoint and teacher.model")
    host = urlparse(cfg.endpoint).hostname
    local = is_local_host(host, cfg.private_hosts)
    if cfg.data_residency == "local_only" and not local:
        raise TeacherError(
            f"teacher.data_residency=local_only refuses teacher.endpoint {cfg.endpoint}: {host!r} is not loopback, a "
            "private network address or one of teacher.private_hosts; nothing was sent"
        )
    return local


# --- which rows -------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One traffic row to label: the row as it will be stored and the example the teacher sees."""

    row: dict[str, Any]
    example: Example
    key: str  # the content hash of its input (also its id when the row has none)


def label_id(record: Mapping[str, Any], spec: TaskSpec, key: str) -> str:
    """The id a labelled row gets: the traffic row's own, else ``t-`` + its input's content hash."""
    own = spec.row_id(record)
    return str(own) if own not in (None, "") else f"t-{key[:20]}"


def select_rows(
    rows: Sequence[Mapping[str, Any]], spec: TaskSpec, *, n: int, seed: int = 0, near_duplicate_jaccard: float | None = 0.8,
    shingle_words: int = 3, already: set[str] | frozenset[str] = frozenset(), novelty: Mapping[str, float] | None = None,
) -> tuple[list[Candidate], dict[str, int], list[tuple[dict[str, Any], str]]]:
    """(rows to label, counts of what was left out and why, unreadable rows with their reason).

    Rows whose label id is in ``already`` (labelled by an earlier run) and exact and
    near-duplicate inputs are dropped (the first kept), then up to ``n`` rows are drawn, seeded,
    stratified by slice in proportion to the slices' shares (each slice at least one row while
    ``n`` allows). With ``novelty`` (:func:`tuneloop.drift.novelty_key` of the input -> rank in
    [0, 1], from the drift check), each slice's rows are drawn without replacement with
    probability proportional to ``0.1 + 0.9 x novelty`` (0.5 for a row the check did not see):
    what the monitor found new is labelled first, the familiar still gets a share."""
    from tuneloop.intake.similarity import find_near_duplicates
    from tuneloop.tasks.spec import TaskRowError

    unreadable: list[tuple[dict[str, Any], str]] = []
    seen: set[str] = set()
    readable: list[Candidate] = []
    left_out = {"already_labelled": 0, "duplicate": 0, "near_duplicate": 0, "not_sampled": 0}
    for record in rows:
        try:
            example = spec.example(record, labelled=False)
        except TaskRowError as err:
            unreadable.append((dict(record) if isinstance(record, dict) else {"row": record}, f"teacher_unreadable:{err.reason}"))
            continue
        key = hashlib.sha256(json.dumps(example.context, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if already and label_id(record, spec, key) in already:
            left_out["already_labelled"] += 1
            continue
        if key in seen:
            left_out["duplicate"] += 1
            continue
        seen.add(key)
        readable.append(Candidate(dict(record), example, key))
    if near_duplicate_jaccard and len(readable) > 1:
        later = find_near_duplicates([c.example.input_text for c in readable], near_duplicate_jaccard, shingle_words)
        left_out["near_duplicate"] = len(later)
        readable = [c for i, c in enumerate(readable) if i not in later]
    by_slice: dict[str, list[Candidate]] = {}
    for candidate in readable:
        by_slice.setdefault(candidate.example.slice, []).append(candidate)
    rng = random.Random(seed)
    for members in by_slice.values():  # insertion order: the same seed draws the same rows as before
        if novelty:
            from tuneloop.drift import novelty_key

            # Efraimidis-Spirakis: sorting by u ** (1 / w) draws in proportion to w
            keys = {id(c): rng.random() ** (1.0 / (0.1 + 0.9 * novelty.get(novelty_key(c.example.input_text), 0.5))) for c in members}
            members.sort(key=lambda c: -keys[id(c)])
        else:
            rng.shuffle(members)
    quota = _quotas({name: len(members) for name, members in by_slice.items()}, n)
    chosen = [c for name, members in sorted(by_slice.items()) for c in members[: quota[name]]]
    left_out["not_sampled"] = len(readable) - len(chosen)
    return chosen, left_out, unreadable


def _quotas(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Rows per slice: proportional to its size (largest remainders), at least one each while
    ``n`` allows (taken from the largest quota), summing to min(n, total)."""
    total = sum(sizes.values())
    if total <= n:
        return dict(sizes)
    names = sorted(sizes)
    exact = {name: n * sizes[name] / total for name in names}
    quota = {name: math.floor(exact[name]) for name in names}
    for name in sorted(names, key=lambda x: (-(exact[x] - quota[x]), x))[: n - sum(quota.values())]:
        quota[name] += 1
    if n >= len(names):
        for name in names:
            if quota[name] == 0 and sizes[name]:
                quota[max(names, key=lambda x: (quota[x], x))] -= 1
                quota[name] = 1
    return quota


# --- the calls ----------------------------------------------------------------------------


@dataclass
class Account:
    """What one labelling run cost."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0
    budget_exhausted: str | None = None
    latency_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        latencies = sorted(data.pop("latency_ms"))
        data["latency_p50_ms"] = round(latencies[len(latencies) // 2], 1) if latencies else None
        data["seconds"] = round(self.seconds, 2)
        data["cost"] = round(self.cost, 6)
        return data


class BudgetExhaustedError(TeacherError):
    """A budget of the run is used up; the rows not yet labelled are left for the next run."""


class Teacher:
    """The teacher endpoint behind a cache, a rate limit, retries and a budget (thread-safe)."""

    def __init__(self, cfg: TeacherSettings, cache_dir: Path, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.account = Account()
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._sleep = sleep

    def cache_key(self, messages: Sequence[Mapping[str, str]], temperature: float, sample: int) -> str:
        cfg = self.cfg
        body = {"model": cfg.model, "messages": list(messages), "temperature": temperature, "max_tokens": cfg.max_tokens, "sample": sample}
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def ask(self, messages: Sequence[Mapping[str, str]], *, temperature: float | None = None, sample: int = 0) -> str:
        """The teacher's answer to ``messages`` (from the cache when it was asked before)."""
        temperature = self.cfg.temperature if temperature is None else temperature
        key = self.cache_key(messages, temperature, sample)
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            with self._lock:
                self.account.cache_hits += 1
            return str(json.loads(path.read_text(encoding="utf-8"))["answer"])
        self._reserve()
        answer, usage, latency = self._post(messages, temperature)
        with self._lock:
            self.account.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.account.completion_tokens += int(usage.get("completion_tokens") or 0)
            self.account.cost = (
                self.account.prompt_tokens * self.cfg.price_per_1k_prompt_tokens
                + self.account.completion_tokens * self.cfg.price_per_1k_completion_tokens
            ) / 1000
            self.account.latency_ms.append(latency * 1000)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{threading.get_ident()}")
        tmp.write_text(json.dumps({"answer": answer, "usage": usage}), encoding="utf-8")
        tmp.replace(path)
        return answer

    def _reserve(self) -> None:
        """Count a request against the budget and wait for the rate limit's slot."""
        cfg = self.cfg
        with self._lock:
            spent = self.account
            reason = (
                f"teacher.max_requests={cfg.max_requests}" if cfg.max_requests is not None and spent.requests >= cfg.max_requests
                else f"teacher.max_tokens_total={cfg.max_tokens_total}" if cfg.max_tokens_total is not None
                and spent.prompt_tokens + spent.completion_tokens >= cfg.max_tokens_total
                else f"teacher.max_cost={cfg.max_cost}" if cfg.max_cost is not None and spent.cost >= cfg.max_cost
                else None
            )
            if reason:
                spent.budget_exhausted = reason
                raise BudgetExhaustedError(f"the labelling budget is used up ({reason})")
            spent.requests += 1
            wait = 0.0
            if cfg.requests_per_minute:
                now = time.monotonic()
                start = max(now, self._next_start)
                self._next_start = start + 60.0 / cfg.requests_per_minute
                wait = start - now
        if wait > 0:
            self._sleep(wait)

    def _post(self, messages: Sequence[Mapping[str, str]], temperature: float) -> tuple[str, dict[str, Any], float]:
        import httpx

        cfg = self.cfg
        headers = {"Authorization": f"Bearer {cfg.api_key.get_secret_value()}"} if cfg.api_key else {}
        body = {"model": cfg.model, "messages": list(messages), "temperature": temperature, "max_tokens": cfg.max_tokens}
        url = f"{cfg.endpoint}/chat/completions"
        last = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                with self._lock:
                    self.account.retries += 1
            started = time.monotonic()
            retry_after: float | None = None
            try:
                reply = httpx.post(url, json=body, headers=headers, timeout=cfg.timeout_s)
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"[:200]
            else:
                if reply.status_code == 200:
                    try:
                        data = reply.json()
                        answer = data["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        last = f"an answer that is not a chat completion ({type(err).__name__})"
                    else:
                        if isinstance(answer, str):
                            return answer, dict(data.get("usage") or {}), time.monotonic() - started
                        last = "an answer with no text content"
                elif reply.status_code in (401, 403):
                    raise TeacherError(f"the teacher at {cfg.endpoint} refused the credentials (HTTP {reply.status_code}): check teacher.api_key")
                elif reply.status_code not in RETRY_STATUS:
                    raise TeacherError(f"the teacher at {cfg.endpoint} (model {cfg.model}) answered HTTP {reply.status_code}: {reply.text[:300]}")
                else:
                    last = f"HTTP {reply.status_code}"
                    retry_after = _retry_after(reply.headers.get("retry-after"))
            if attempt < cfg.max_retries:
                self._sleep(retry_after if retry_after is not None else min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        with self._lock:
            self.account.failed += 1
        raise TeacherUnavailableError(f"no answer after {cfg.max_retries + 1} tries: {last}")


class TeacherUnavailableError(TeacherError):
    """One prompt got no answer after every retry (the row is quarantined, the run goes on)."""


def _retry_after(value: str | None) -> float | None:
    try:
        return min(120.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


# --- one labelling run ------------------------------------------------------------------------


@dataclass
class LabelRun:
    """The outcome: labelled rows, quarantined rows with reasons, the checks and the account."""

    labelled: list[dict[str, Any]]
    quarantined: list[tuple[dict[str, Any], str]]
    left_out: dict[str, int]
    account: Account
    consistency: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None
    unlabelled_budget: int = 0

    def summary(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for _, reason in self.quarantined:
            reasons[reason.split(":", 1)[0]] = reasons.get(reason.split(":", 1)[0], 0) + 1
        return {
            "labelled": len(self.labelled), "quarantined": len(self.quarantined), "quarantine_reasons": reasons,
            "left_out": self.left_out, "unlabelled_budget": self.unlabelled_budget, "account": self.account.summary(),
            "consistency": self.consistency, "agreement": self.agreement,
        }


def label_rows(
    rows: Sequence[Mapping[str, Any]],
    spec: TaskSpec,
    cfg: TeacherSettings,
    *,
    cache_dir: Path,
    human: Sequence[Mapping[str, Any]] = (),
    seed: int = 0,
    near_duplicate_jaccard: float | None = 0.8,
    progress: Callable[[str], None] | None = None,
    teacher: Teacher | None = None,
    already: set[str] | frozenset[str] = frozenset(),
    novelty: Mapping[str, float] | None = None,
) -> LabelRun:
    """Label a sample of ``rows`` (traffic) with the teacher; ``human`` labelled rows with the
    same ids measure the teacher's agreement with people; rows of ids in ``already`` (labelled
    by an earlier run) are left out."""
    from tuneloop.intake.checks import redact_pii

    local = check_residency(cfg)
    candidates, left_out, quarantined = select_rows(
        rows, spec, n=cfg.sample_rows, seed=seed, near_duplicate_jaccard=near_duplicate_jaccard, already=already,
        novelty=novelty if cfg.prefer_novel else None,
    )
    teacher = teacher or Teacher(cfg, cache_dir)
    sendable: list[tuple[Candidate, list[dict[str, str]]]] = []
    for candidate in candidates:
        row = candidate.row
        if not local and cfg.pii != "off":
            found: dict[str, int] = {}

            def redact(text: str, found: dict[str, int] = found) -> str:
                clean, counts = redact_pii(text)
                for kind, count in counts.items():
                    found[kind] = found.get(kind, 0) + count
                return clean

            redacted = spec.map_texts(row, redact, inputs_only=True)
            kinds = sorted(kind for kind, count in found.items() if count)
            if kinds and cfg.pii == "flag":
                quarantined.append((row, f"teacher_pii_not_sent:{','.join(kinds)}"))
                continue
            if kinds:
                candidate = Candidate(redacted, spec.example(redacted, labelled=False), candidate.key)
        sendable.append((candidate, _messages(candidate.example, cfg)))

    tracker = Progress(label="label", every_s=10.0, sink=progress, unit="rows")
    tracker.start(len(sendable), step_name="row")
    done = 0
    lock = threading.Lock()
    started = time.monotonic()

    def one(item: tuple[Candidate, list[dict[str, str]]]) -> tuple[Candidate, str | None, str | None]:
        nonlocal done
        candidate, messages = item
        try:
            answer: str | None = teacher.ask(messages)
            error = None
        except BudgetExhaustedError:
            answer, error = None, "budget"
        except TeacherUnavailableError as err:
            answer, error = None, f"teacher_unavailable:{err}"
        with lock:
            done += 1
            tracker.update(done, items=1)
        return candidate, answer, error

    labelled: list[dict[str, Any]] = []
    answers: dict[str, str] = {}
    unlabelled_budget = 0
    with ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="teacher") as pool:
        outcomes = list(pool.map(one, sendable))
    for candidate, answer, error in outcomes:
        if error == "budget":
            unlabelled_budget += 1
            continue
        if answer is None:
            quarantined.append((candidate.row, error or "teacher_unavailable"))
            continue
        problems = spec.check_target(answer) if answer.strip() else ["empty_answer"]
        if problems:
            quarantined.append((candidate.row, f"teacher_invalid:{problems[0]}"))
            continue
        answers[candidate.key] = answer
        labelled.append(_labelled_row(candidate, answer, spec, cfg))
    if sendable and not labelled and teacher.account.failed == len(sendable):
        raise TeacherError(f"the teacher at {cfg.endpoint} (model {cfg.model}) answered none of {len(sendable)} prompts: is it running?")
    teacher.account.seconds = time.monotonic() - started
    tracker.finish()
    run = LabelRun(labelled, quarantined, left_out, teacher.account, unlabelled_budget=unlabelled_budget)
    run.consistency = _consistency(teacher, spec, [(c, m) for c, m in sendable if c.key in answers], answers, seed)
    run.agreement = _agreement(spec, labelled, human)
    if cfg.min_consistency is not None and run.consistency and run.consistency["n"] and run.consistency["agreement"] < cfg.min_consistency:
        raise TeacherError(
            f"the teacher agreed with itself on {run.consistency['agreement']:.2f} of {run.consistency['n']} rows, below "
            f"teacher.min_consistency={cfg.min_consistency}: its labels are not used (lower its temperature or use a stronger teacher)"
        )
    return run


def _messages(example: Example, cfg: TeacherSettings) -> list[dict[str, str]]:
    turns = [dict(turn) for turn in example.context]
    if cfg.system_prompt:
        turns = [{"role": "system", "content": cfg.system_prompt}, *[t for t in turns if t["role"] != "system"]]
    return turns


def _labelled_row(candidate: Candidate, answer: str, spec: TaskSpec, cfg: TeacherSettings) -> dict[str, Any]:
    row = spec.with_target(candidate.row, answer)
    row[spec.settings.id_field] = label_id(candidate.row, spec, candidate.key)
    row["label_source"] = "teacher"
    row["teacher_model"] = cfg.model
    return row


def _consistency(
    teacher: Teacher, spec: TaskSpec, items: Sequence[tuple[Candidate, list[dict[str, str]]]], answers: Mapping[str, str], seed: int
) -> dict[str, Any] | None:
    """Two more answers at ``consistency_temperature`` on a sample: how often they agree (the
    task's scorer, one against the other), and how often the first matches the label."""
    cfg = teacher.cfg
    if not cfg.consistency_sample or not items:
        return None
    sample = random.Random(seed).sample(list(items), min(cfg.consistency_sample, len(items)))
    pairs = []
    for candidate, messages in sample:
        try:
            a = teacher.ask(messages, temperature=cfg.consistency_temperature, sample=1)
            b = teacher.ask(messages, temperature=cfg.consistency_temperature, sample=2)
        except TeacherError:
            continue
        pairs.append((candidate, a, b))
    if not pairs:
        return {"n": 0, "agreement": None}
    from tuneloop.tasks.scoring import ScoringError

    unusable = 0

    def agreement(answer: str, reference: str, example: Any) -> float:
        # The reference is itself a sampled answer: one the task's scorer cannot take as gold (a
        # label outside task.labels, JSON that breaks the schema) agrees with nothing.
        nonlocal unusable
        try:
            return spec.scorer.score(answer, reference, example).score
        except ScoringError:
            unusable += 1
            return 0.0

    agree = [agreement(a, b, c.example) for c, a, b in pairs]
    with_label = [agreement(a, answers[c.key], c.example) for c, a, _ in pairs]
    return {"n": len(pairs), "temperature": cfg.consistency_temperature, "agreement": round(sum(agree) / len(agree), 4),
            "with_label": round(sum(with_label) / len(with_label), 4), "unusable_references": unusable}


def _agreement(spec: TaskSpec, labelled: Sequence[Mapping[str, Any]], human: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The teacher's labels scored against human labels of the same ids, per slice (mean and a
    95% normal interval)."""
    gold = _labelled_by_id(human, spec)
    per_slice: dict[str, list[float]] = {}
    for row in labelled:
        example = spec.example(row)
        reference = gold.get(example.id)
        if reference is None or example.target is None or reference.target is None:
            continue
        per_slice.setdefault(reference.slice, []).append(spec.scorer.score(example.target, reference.target, reference).score)
    if not per_slice:
        return None
    every = [v for values in per_slice.values() for v in values]
    return {"all": _interval(every), **{name: _interval(values) for name, values in sorted(per_slice.items())}}


def _labelled_by_id(records: Sequence[Mapping[str, Any]], spec: TaskSpec) -> dict[str, Example]:
    """The records that read as labelled examples of the task, by id (the others are skipped)."""
    from tuneloop.tasks.spec import TaskRowError

    found: dict[str, Example] = {}
    for record in records:
        try:
            example = spec.example(record)
        except TaskRowError:
            continue
        found[example.id] = example
    return found


def _interval(values: Sequence[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n) if n > 1 else 1.0
    return {"n": n, "mean": round(mean, 4), "low": round(max(0.0, mean - half), 4), "high": round(min(1.0, mean + half), 4)}


# --- the gate: the student as a share of the teacher -------------------------------------------


def teacher_retention(
    records: Sequence[Mapping[str, Any]],
    student_scores: Sequence[Mapping[str, Any]],
    spec: TaskSpec,
    cfg: TeacherSettings,
    *,
    cache_dir: Path,
    student: TeacherSettings | None = None,
    latency_prompts: int = 20,
) -> dict[str, Any]:
    """The teacher answers the held-out rows the candidate was scored on (``student_scores``:
    rows ``{id, slice, score}``), scored by the task's scorer against the same gold answers.
    ``retention`` is the candidate's mean score over the teacher's, per slice and over all.

    With ``student`` (an OpenAI-compatible client setting pointed at the served model), the
    same client times ``latency_prompts`` uncached requests to each, for the latency ratio;
    the cost ratio uses each side's prices per 1k tokens."""
    check_residency(cfg)
    by_id = _labelled_by_id(records, spec)
    rows = [row for row in student_scores if str(row.get("id")) in by_id]
    if not rows:
        return {"skipped": "no held-out row the candidate was scored on has a gold answer"}
    teacher = Teacher(cfg, cache_dir)

    def grade(row: Mapping[str, Any]) -> tuple[Mapping[str, Any], float | None]:
        example = by_id[str(row["id"])]
        try:
            answer = teacher.ask(_messages(example, cfg))
        except TeacherError:
            return row, None
        return row, spec.scorer.score(answer, example.target or "", example).score

    with ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="teacher-eval") as pool:
        graded = [(row, value) for row, value in pool.map(grade, rows) if value is not None]
    if not graded:
        return {"skipped": f"the teacher at {cfg.endpoint} answered none of {len(rows)} held-out rows"}
    per_slice: dict[str, list[tuple[float, float]]] = {}
    for row, value in graded:
        per_slice.setdefault(str(row.get("slice", "all")), []).append((float(row["score"]), value))

    def block(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
        student_mean = sum(p[0] for p in pairs) / len(pairs)
        teacher_mean = sum(p[1] for p in pairs) / len(pairs)
        retention = student_mean / teacher_mean if teacher_mean > 0 else None
        return {"n": len(pairs), "student": round(student_mean, 4), "teacher": round(teacher_mean, 4),
                "retention": round(retention, 4) if retention is not None else None}

    everything = [pair for pairs in per_slice.values() for pair in pairs]
    result: dict[str, Any] = {**block(everything), "slices": {name: block(pairs) for name, pairs in sorted(per_slice.items())},
                              "teacher_model": cfg.model, "not_answered": len(rows) - len(graded)}
    if student is not None and latency_prompts:
        result["latency"] = _latency_ratio(cfg, student, [by_id[str(row["id"])] for row, _ in graded[:latency_prompts]])
    return result


def _latency_ratio(teacher_cfg: TeacherSettings, student_cfg: TeacherSettings, examples: Sequence[Example]) -> dict[str, Any]:
    """Median latency and cost per 1k requests of student and teacher through the same client,
    on the same prompts, one at a time and never from the cache."""
    import tempfile
    from pathlib import Path

    figures: dict[str, dict[str, Any]] = {}
    for role, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
        with tempfile.TemporaryDirectory(prefix="tuneloop-latency-") as fresh:
            client = Teacher(cfg.model_copy(update={"max_concurrency": 1, "max_requests": None, "max_tokens_total": None, "max_cost": None}), Path(fresh))
            error = None
            for example in examples:
                try:
                    client.ask(_messages(example, cfg), sample=-1)
                except TeacherError as err:
                    error = str(err)
                    break  # a side that does not answer gets no latency figure (and costs no more waiting)
            account = client.account
            answered = len(account.latency_ms)
            figures[role] = {
                "model": cfg.model,
                "requests": answered,
                "latency_p50_ms": account.summary()["latency_p50_ms"],
                "cost_per_1k_requests": round(1000 * account.cost / answered, 6) if answered else None,
                **({"error": error} if error else {}),
            }
    student, teacher = figures["student"], figures["teacher"]
    ratio = (student["latency_p50_ms"] / teacher["latency_p50_ms"]) if student["latency_p50_ms"] and teacher["latency_p50_ms"] else None
    cost_ratio = (
        student["cost_per_1k_requests"] / teacher["cost_per_1k_requests"]
        if student["cost_per_1k_requests"] is not None and teacher["cost_per_1k_requests"]
        else None
    )
    return {**figures, "latency_ratio": round(ratio, 4) if ratio is not None else None,
            "cost_ratio": round(cost_ratio, 4) if cost_ratio is not None else None}
