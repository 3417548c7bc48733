"""Is a served name answering as it should? The names on a server (``<name>``, ``<name>-staging``,
``<name>-base``), golden prompts with the answers evaluation measured, and the check that asks
a name those prompts (greedy) and scores the answers with the task's agreement (the smoke
prompts, compared between two names, when there is no golden set)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneloop.serving.vllm_client import Prompt, VllmClient
    pass


STAGING_SUFFIX = "-staging"
BASE_SUFFIX = "-base"

Scorer = Callable[[str, str], float]


def staging_name(served_name: str) -> str:
    """The adapter name new versions are loaded and verified under before the stable name."""
    return served_name + STAGING_SUFFIX


def base_name(served_name: str) -> str:
    """The name the base model is served under (``--served-model-name``)."""
    return served_name + BASE_SUFFIX


def exact_match(answer: str, expected: str) -> float:
    """1.0 if the answer equals the expected text (surrounding whitespace ignored), else 0.0."""
    return float(answer.strip() == expected.strip())


@dataclass(frozen=True)


class GoldenCase:
    """A prompt and the answer the evaluation measured (None: only compared between names)."""

    id: str
    prompt: Prompt
    expected: str | None

# Asked when the caller has no golden set: the stable name must then answer them exactly as
# the staging name did, which still catches a load that did not take or stale cached blocks.
SMOKE_PROMPTS = (
    "Reply with one word: ready?",
    "What is 2 + 3? Answer with the number.",
    "Summarise: the quick brown fox jumps over the lazy dog.",
)


def smoke_cases() -> list[GoldenCase]:
    """Prompts without expectations, for a deploy that has no golden set."""
    return [GoldenCase(id=f"smoke-{i}", prompt=prompt, expected=None) for i, prompt in enumerate(SMOKE_PROMPTS)]


def golden_cases(golden: Sequence[Mapping[str, Any] | GoldenCase]) -> list[GoldenCase]:
    """Normalise ``[{"id", "prompt", "expected"}, ...]``; raise ValueError if malformed."""
    cases: list[GoldenCase] = []
    for index, item in enumerate(golden):
        if isinstance(item, GoldenCase):
            cases.append(item)
            continue
        missing = {"prompt", "expected"} - set(item)
        if missing:
            raise ValueError(f"golden[{index}] lacks {sorted(missing)}")
        cases.append(GoldenCase(id=str(item.get("id", index)), prompt=item["prompt"], expected=str(item["expected"])))
    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("golden ids must be unique")
    return cases


@dataclass


class Verification:
    """How one served name answered the golden prompts."""

    model: str
    n: int
    agreement: float | None  # None: no expectations to score (smoke prompts)
    min_agreement: float
    consistency: float | None = None
    ok: bool = False
    seconds: float = 0.0
    answers: dict[str, str] = field(default_factory=dict)
    mismatches: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        if self.agreement is None:
            text = f"{self.model}: answered {self.n} smoke prompts (no golden set)"
        else:
            text = f"{self.model}: golden agreement {self.agreement:.2f} (min {self.min_agreement:.2f}, n={self.n})"
        if self.consistency is not None:
            text += f", same answers as reference {self.consistency:.2f}"
        if self.mismatches:
            first = self.mismatches[0]
            text += f"; e.g. {first['id']}: expected {first['expected']!r}, got {first['got']!r}"
        return text

    def to_dict(self, *, with_answers: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_answers:
            data.pop("answers")
        return data


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def verify_served(
    client: VllmClient,
    model: str,
    golden: Sequence[Mapping[str, Any] | GoldenCase],
    *,
    min_agreement: float,
    scorer: Scorer = exact_match,
    max_tokens: int = 96,
    concurrency: int = 8,
    reference: Mapping[str, str] | None = None,
) -> Verification:
    """Ask ``model`` the golden prompts (greedy) and score the answers against the expectations.

    ``reference`` (answers by id, e.g. from the staging name) adds an exact-match consistency
    figure that must also reach ``min_agreement``: it catches a name that still answers with
    old weights even where the golden expectations cannot tell the versions apart.
    Cases whose ``expected`` is None are asked but not scored. Request failures raise
    :class:`VllmError`.
    """
    cases = golden_cases(golden)
    if not cases:
        raise ValueError("verify_served needs at least one prompt")
    started = time.perf_counter()
    answers = client.chat_many(model, [case.prompt for case in cases], max_tokens=max_tokens, concurrency=concurrency)
    scores = []
    mismatches = []
    for case, answer in zip(cases, answers, strict=True):
        if case.expected is None:
            continue
        score = float(scorer(answer, case.expected))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"scorer returned {score} for golden {case.id}; scores must lie in [0, 1]")
        scores.append(score)
        if score < 1.0:
            mismatches.append({"id": case.id, "expected": _clip(case.expected), "got": _clip(answer)})
    result = Verification(
        model=model,
        n=len(cases),
        agreement=sum(scores) / len(scores) if scores else None,
        min_agreement=min_agreement,
        answers={case.id: answer for case, answer in zip(cases, answers, strict=True)},
        mismatches=mismatches[:5],
    )
    if reference is not None:
        same = [exact_match(result.answers[case.id], reference.get(case.id, "\0")) for case in cases]
        result.consistency = sum(same) / len(same)
        if not result.mismatches:
            result.mismatches = [
                {"id": case.id, "expected": _clip(reference.get(case.id, "")), "got": _clip(result.answers[case.id])}
                for case, agrees in zip(cases, same, strict=True)
                if not agrees
            ][:5]
    result.ok = (result.agreement is None or result.agreement >= min_agreement) and (
        result.consistency is None or result.consistency >= min_agreement
    )
    result.seconds = round(time.perf_counter() - started, 4)
    return result
