"""``task.metric: judge``: an LLM grades each answer against the reference, through any
OpenAI-compatible ``/chat/completions`` endpoint (a bigger vLLM model, a hosted API).

Verdicts are cached on disk by the content hash of (judge model, rubric, conversation,
reference, answer), so re-evaluating the same answers never pays twice. With
``task.judge.pairwise`` the judge compares the answer with the reference as A/B in both
orders and the two verdicts are averaged, which cancels the judge's position bias. The API
key comes from ``task.judge.api_key`` (an env var or an Airflow connection) and never
appears in a message or a log line.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.tasks.scoring import Scored, Scorer, ScoringError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tuneloop.config import TaskSettings
    from tuneloop.tasks.spec import Example

POINTWISE = (
    "You grade an assistant's answer. {rubric}\n"
    "Reply with JSON only: {{\"score\": <a number from 0 to 1>, \"reason\": \"<one sentence>\"}}.\n\n"
    "CONVERSATION:\n{conversation}\n\nREFERENCE ANSWER:\n{reference}\n\nANSWER TO GRADE:\n{answer}"
)
PAIRWISE = (
    "You compare two answers to the same conversation. {rubric}\n"
    "Reply with JSON only: {{\"better\": \"A\" | \"B\" | \"tie\", \"reason\": \"<one sentence>\"}}.\n\n"
    "CONVERSATION:\n{conversation}\n\nANSWER A:\n{a}\n\nANSWER B:\n{b}"
)
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeScorer(Scorer):
    """Scores from an LLM judge (pointwise 0..1, or pairwise against the reference)."""

    name = "judge"

    def __init__(self, settings: TaskSettings, *, cache_root: str | None = None) -> None:
        super().__init__(settings)
        cfg = settings.judge
        if not (cfg.endpoint and cfg.model):
            raise ScoringError("task.metric=judge needs task.judge.endpoint and task.judge.model")
        self.cfg = cfg
        self.cache_dir = Path(cfg.cache_dir or cache_root or ".tuneloop/judge-cache")
        self.calls = 0
        self.cache_hits = 0
        self._calibration: dict[str, Any] | None = None

    def _conversation(self, example: Example | None) -> str:
        if example is None:
            return "(not available)"
        return "\n".join(f"{turn['role'].upper()}: {turn['content']}" for turn in example.context)

    def _key(self, kind: str, payload: dict[str, Any]) -> str:
        body = json.dumps({"kind": kind, "model": self.cfg.model, "rubric": self.cfg.rubric, **payload}, sort_keys=True)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()

    def _ask(self, prompt: str, key: str) -> dict[str, Any]:
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            self.cache_hits += 1
            return dict(json.loads(path.read_text(encoding="utf-8")))
        import httpx

        headers = {"Authorization": f"Bearer {self.cfg.api_key.get_secret_value()}"} if self.cfg.api_key else {}
        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": 200}
        url = f"{self.cfg.endpoint}/chat/completions"
        last = ""
        for attempt in range(4):
            try:
                reply = httpx.post(url, json=body, headers=headers, timeout=self.cfg.timeout_s)
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}"
            else:
                if reply.status_code == 200:
                    self.calls += 1
                    text = reply.json()["choices"][0]["message"]["content"] or ""
                    verdict = _parse_verdict(text)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
                    tmp.write_text(json.dumps(verdict), encoding="utf-8")
                    tmp.replace(path)
                    return verdict
                last = f"HTTP {reply.status_code}"
                if reply.status_code not in _RETRY_STATUS:
                    break
            time.sleep(min(8.0, 0.5 * 2**attempt))
        raise ScoringError(f"the judge at {self.cfg.endpoint} (model {self.cfg.model}) did not answer: {last}")

    def score(self, prediction: str, gold: str, example: Example | None = None) -> Scored:
        conversation = self._conversation(example)
        if not self.cfg.pairwise:
            payload = {"conversation": conversation, "reference": gold, "answer": prediction}
            verdict = self._ask(POINTWISE.format(rubric=self.cfg.rubric, **payload), self._key("pointwise", payload))
            value = verdict.get("score")
            if not isinstance(value, int | float) or isinstance(value, bool):
                return Scored(0.0, {"judge_parsed": False, "judge_reason": verdict.get("raw", "")[:200]})
            return Scored(min(1.0, max(0.0, float(value))), {"judge_parsed": True, "judge_reason": str(verdict.get("reason", ""))[:200]})
        wins = []
        for a, b, answer_is in ((prediction, gold, "A"), (gold, prediction, "B")):
            payload = {"conversation": conversation, "a": a, "b": b}
            verdict = self._ask(PAIRWISE.format(rubric=self.cfg.rubric, **payload), self._key("pairwise", payload))
            better = str(verdict.get("better", "")).strip().upper()
            wins.append(1.0 if better == answer_is else 0.5 if better == "TIE" else 0.0)
        return Scored(sum(wins) / 2, {"judge_parsed": True, "judge_orders": wins})

    def score_batch(self, predictions: Sequence[str], golds: Sequence[str], examples: Sequence[Example | None]) -> list[Scored]:
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="judge") as pool:
            return list(pool.map(self.score, predictions, golds, examples))

    def agreement(self, answer: str, expected: str) -> float:
        # Deploy verification compares a served answer with the one evaluation saw: same text.
        return 1.0 if self.normalise(answer) == self.normalise(expected) else 0.0

    def calibration(self) -> dict[str, Any] | None:
        """The judge against human verdicts (``task.judge.calibration_set``): the share of rows
        where both fall on the same side of 0.5, and the mean absolute difference. Computed once."""
        if not self.cfg.calibration_set:
            return None
        if self._calibration is None:
            from tuneloop.tasks.spec import Example

            rows = [json.loads(line) for line in Path(self.cfg.calibration_set).read_text(encoding="utf-8").splitlines() if line.strip()]
            examples = [Example(str(i), [{"role": "user", "content": str(r["prompt"])}], str(r["reference"]), "calibration") for i, r in enumerate(rows)]
            judged = self.score_batch([str(r["answer"]) for r in rows], [str(r["reference"]) for r in rows], examples)
            human = [float(r["score"]) for r in rows]
            n = len(rows)
            self._calibration = {
                "n": n,
                "agreement": sum((j.score >= 0.5) == (h >= 0.5) for j, h in zip(judged, human, strict=True)) / n if n else None,
                "mean_abs_diff": sum(abs(j.score - h) for j, h in zip(judged, human, strict=True)) / n if n else None,
                "source": self.cfg.calibration_set,
            }
        return self._calibration

    def aggregate(self, rows: Sequence[Any]) -> dict[str, Any]:
        if not rows:
            return {}
        block: dict[str, Any] = {
            "judge_parsed": sum(bool(r.get("judge_parsed")) for r in rows) / len(rows),
            "judge_calls": self.calls,
            "judge_cache_hits": self.cache_hits,
        }
        calibration = self.calibration()
        if calibration is not None:
            block["judge_agreement_with_humans"] = calibration
        return block


def _parse_verdict(text: str) -> dict[str, Any]:
    match = re.search(r"\{.*\}", text, flags=re.DOTALL)
    if match:
        try:
            found = json.loads(match.group(0))
            if isinstance(found, dict):
                return found
        except ValueError:
            pass
    number = re.search(r"\b(0(\.\d+)?|1(\.0+)?)\b", text)
    return {"score": float(number.group(1)), "raw": text[:200]} if number else {"raw": text[:200]}
