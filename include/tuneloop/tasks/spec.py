"""The user's rows, read the way the task config says: what the model sees and what it must answer.

Two row formats (``task.format``):

* ``prompt_completion``: ``{"id", <prompt_field>: str, <completion_field>: str, ...}``; the
  prompt is one user turn.
* ``messages``: ``{"id", <messages_field>: [{"role": "system"|"user"|"assistant", "content"}...]}``
  (OpenAI fine-tuning files, TRL's conversational datasets). The last assistant turn is the
  target; every turn before it is context. Traffic rows carry the context only.

Either way an :class:`Example` holds the chat ``context`` exactly as production sends it
(``task.system_prompt`` first when the row has no system turn), the ``target`` text and the
``slice`` (the value of ``task.slice_field``, else ``"all"``). Training, evaluation, the suites,
deploy verification and intake all read rows through :class:`TaskSpec`, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneloop.config import TaskSettings
    from tuneloop.tasks.scoring import Scorer

ROLES = ("system", "user", "assistant")
DEFAULT_SLICE = "all"
MAX_SLICE_CHARS = 120


class TaskRowError(ValueError):
    """A row does not fit the task's format; ``reason`` is the quarantine reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """One row as the model meets it."""

    id: str
    context: list[dict[str, str]]
    """Chat turns before the answer (system first when there is one, last one a user turn)."""
    target: str | None
    """The answer to learn and score; None for a traffic row."""
    slice: str

    @property
    def input_text(self) -> str:
        """The user-visible input (every non-system turn of the context), for drift and
        similarity checks: the system prompt is the same in every row and says nothing."""
        return "\n".join(turn["content"] for turn in self.context if turn["role"] != "system")


class TaskSpec:
    """Row reading, rendering and scoring for one task config (``Settings.task``)."""

    def __init__(self, settings: TaskSettings, *, base_dir: str | None = None) -> None:
        self.settings = settings
        self.base_dir = base_dir
        self._scorer: Scorer | None = None

    # --- reading rows ------------------------------------------------------------------

    @property
    def format(self) -> str:
        return self.settings.format

    def row_id(self, record: Mapping[str, Any]) -> Any:
        return record.get(self.settings.id_field)

    def slice_of(self, record: Mapping[str, Any]) -> str:
        """The row's slice name: the slice field's value as text, else ``"all"``."""
        field = self.settings.slice_field
        value = record.get(field) if field else None
        if value is None or isinstance(value, dict | list) or (isinstance(value, str) and not value.strip()):
            return DEFAULT_SLICE
        return str(value).strip()[:MAX_SLICE_CHARS]

    def _system_turn(self) -> list[dict[str, str]]:
        prompt = self.settings.system_prompt
        return [{"role": "system", "content": prompt}] if prompt else []

    def _turns(self, record: Mapping[str, Any]) -> list[dict[str, str]]:
        field = self.settings.messages_field
        turns = record.get(field)
        if turns is None:
            raise TaskRowError(f"missing_field:{field}", f"the row has no {field!r} list")
        if not isinstance(turns, list) or not turns:
            raise TaskRowError(f"bad_type_or_empty:{field}", f"{field!r} must be a non-empty list of turns")
        checked = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise TaskRowError("bad_turn", f"turn {index} is not an object")
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise TaskRowError("bad_role", f"turn {index} has role {role!r}; expected one of {ROLES}")
            if not isinstance(content, str):
                raise TaskRowError("bad_turn", f"turn {index} ({role}) has no text content")
            if role == "system" and index != 0:
                raise TaskRowError("bad_turn", f"turn {index}: a system turn may only come first")
            checked.append({"role": role, "content": content})
        return checked

    def example(self, record: Mapping[str, Any], *, labelled: bool = True) -> Example:
        """The row as an :class:`Example`; raises :class:`TaskRowError` naming what is wrong.

        ``labelled=False`` reads a traffic row: the context only (a final assistant turn, if
        any, is dropped as an answer that was given).
        """
        if not isinstance(record, Mapping):
            raise TaskRowError("not_an_object", "a row must be a JSON object")
        raw_id = self.row_id(record)
        if raw_id is None and not labelled:
            raw_id = ""  # a traffic row (drift) needs no id
        elif raw_id is None:
            raise TaskRowError(f"missing_field:{self.settings.id_field}", f"the row has no {self.settings.id_field!r}")
        elif not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or not str(raw_id).strip():
            raise TaskRowError(f"bad_type_or_empty:{self.settings.id_field}", "the id must be a non-empty string or an integer")
        slice_name = self.slice_of(record)
        if self.settings.format == "prompt_completion":
            prompt = self._text_field(record, self.settings.prompt_field)
            target = self._text_field(record, self.settings.completion_field) if labelled else None
            context = [*self._system_turn(), {"role": "user", "content": prompt}]
            return Example(str(raw_id), context, target, slice_name)
        turns = self._turns(record)
        target = None
        if turns[-1]["role"] == "assistant":
            target = turns[-1]["content"]
            turns = turns[:-1]
        elif labelled:
            raise TaskRowError("no_final_assistant", "a labelled messages row must end with the assistant turn to learn")
        if labelled and target is not None and not target.strip():
            raise TaskRowError("empty_target", "the last assistant turn is empty")
        if not turns or turns[-1]["role"] != "user":
            raise TaskRowError("no_user_turn", "the turn before the answer must be a user turn")
        if turns[0]["role"] != "system":
            turns = [*self._system_turn(), *turns]
        return Example(str(raw_id), turns, target, slice_name)

    @staticmethod
    def _text_field(record: Mapping[str, Any], name: str) -> str:
        value = record.get(name)
        if value is None:
            raise TaskRowError(f"missing_field:{name}", f"the row has no {name!r}")
        if not isinstance(value, str) or not value.strip():
            raise TaskRowError(f"bad_type_or_empty:{name}", f"{name!r} must be a non-empty string")
        return value

    def examples(self, records: Sequence[Mapping[str, Any]]) -> tuple[list[Example], list[str]]:
        """Every record that reads as an example, and ``"<id>: <reason>"`` for each that does not."""
        examples, problems = [], []
        for index, record in enumerate(records):
            try:
                examples.append(self.example(record))
            except TaskRowError as err:
                row_id = record.get(self.settings.id_field, f"row {index}") if isinstance(record, Mapping) else f"row {index}"
                problems.append(f"{row_id}: {err.reason}")
        return examples, problems

    def input_text(self, record: Mapping[str, Any]) -> str | None:
        """The user-visible input of a labelled or traffic row, or None when it has none."""
        try:
            return self.example(record, labelled=False).input_text
        except TaskRowError:
            return None

    # --- writing rows ------------------------------------------------------------------

    def with_target(self, record: Mapping[str, Any], target: str) -> dict[str, Any]:
        """A copy of ``record`` whose answer is ``target`` (teacher labels, redaction)."""
        row = dict(record)
        if self.settings.format == "prompt_completion":
            row[self.settings.completion_field] = target
            return row
        turns = [dict(turn) for turn in record.get(self.settings.messages_field) or []]
        if turns and turns[-1].get("role") == "assistant":
            turns[-1]["content"] = target
        else:
            turns.append({"role": "assistant", "content": target})
        row[self.settings.messages_field] = turns
        return row

    def map_texts(self, record: Mapping[str, Any], change: Callable[[str], str], *, inputs_only: bool = False) -> dict[str, Any]:
        """A copy of ``record`` with ``change(text)`` applied to every text the model reads or
        writes (PII redaction); with ``inputs_only`` the answer (the completion, or the last
        assistant turn) is left as it is."""
        row = dict(record)
        if self.settings.format == "prompt_completion":
            names = [self.settings.prompt_field] + ([] if inputs_only else [self.settings.completion_field])
            for name in names:
                if isinstance(row.get(name), str):
                    row[name] = change(row[name])
            return row
        turns = row.get(self.settings.messages_field)
        if isinstance(turns, list):
            last = len(turns) - 1
            row[self.settings.messages_field] = [
                {**turn, "content": change(turn["content"])}
                if isinstance(turn, dict) and isinstance(turn.get("content"), str)
                and not (inputs_only and index == last and turn.get("role") == "assistant")
                else turn
                for index, turn in enumerate(turns)
            ]
        return row

    # --- scoring -----------------------------------------------------------------------

    @property
    def scorer(self) -> Scorer:
        """The task's scorer (``task.metric``), built on first use."""
        if self._scorer is None:
            from tuneloop.tasks.scoring import make_scorer

            self._scorer = make_scorer(self.settings, base_dir=self.base_dir)
        return self._scorer

    def check_target(self, target: str) -> list[str]:
        """Why a gold answer cannot be scored by this task's metric (quarantine reasons)."""
        return self.scorer.check_gold(target)

    def describe(self) -> dict[str, Any]:
        """The task as reports and provenance show it."""
        cfg = self.settings
        return {
            "name": cfg.name,
            "format": cfg.format,
            "metric": cfg.metric,
            "slice_field": cfg.slice_field,
            "system_prompt": bool(cfg.system_prompt),
            "labels": list(cfg.labels) or None,
        }
