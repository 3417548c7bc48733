"""LLM-specific intake checks between the row checks (``validate``) and the GX suite (``quality``).

Each check moves failing rows from ``batch.accepted`` to ``batch.quarantined`` (raw line kept,
``accepted + quarantined == total`` holds) with one countable reason; the specifics (the row
matched, the token count, the template error) go to ``QuarantinedRow.matched_id``/``details``.

* ``too_many_tokens``: prompt + completion + the chat template's own tokens above
  ``data.max_tokens`` (default: ``training.max_seq_len``, so training would drop the row). Counted
  with the base model's ``tokenizer.json`` through the ``tokenizers`` library when importable,
  else approximated: 1.15 x the number of pre-tokens (letter runs, single digits, single other
  characters) -- within 0.93-1.07x of the demo BPE on world rows. The summary names the method.
* ``chat_template_error``: the base model's chat template (``chat_template.jinja`` or
  ``tokenizer_config.json``) raises on the row, or the row's text holds a special token of the
  tokenizer (``<|end|>`` inside a prompt would forge a turn). A template that uses message contents
  only by concatenation is rendered once, not per row. No template: skipped, with a note.
* ``pii:card_number`` (``data.pii: flag``): a 13-19 digit run that passes the Luhn checksum.
  E-mail addresses and phone numbers are flagged by the GX suite (``quality``). ``redact``
  replaces all three kinds in the prompt with ``[EMAIL]``, ``[PHONE]``, ``[CARD]`` and keeps the
  row; ``off`` does neither.
* ``label_disagreement``: a row may carry ``labels``, a list of completions from several
  annotators (the row's answer is the one trained on). Labels are compared in the task's
  normal form (``TaskSpec.scorer.normalise``: JSON keys sorted, labels mapped to the set...); a
  row whose labels and answer do not all agree is held back. :class:`LabelAgreement` reports the
  share of multi-labelled rows that agree and, for JSON answers, the agreement per key.
* ``near_duplicate``: word-shingle Jaccard similarity of two inputs (the prefix every input of
  the batch shares, such as a fixed instruction, stripped) at or above ``data.near_duplicate_jaccard``; the later row goes, ``matched_id`` names
  the earlier. Candidates come from MinHash (one-permutation hashing, 64 bins with optimal
  densification, LSH 12 bands x 5) in numpy; candidate pairs are screened on their signatures and
  confirmed with the exact Jaccard of the shingle sets, so a reported pair is always at or above
  the threshold (LSH finds pairs at Jaccard 0.8 with ~99% probability, at 0.85 with ~99.9%).
* ``eval_leakage``: a training row whose prompt is equal or near-equal (same measure,
  ``data.eval_leakage_jaccard``) to an evaluation row's prompt; ``matched_id`` names the eval row.
"""

from __future__ import annotations

import csv
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tuneloop.intake.rows import CheckedBatch, QuarantinedRow
from tuneloop.intake.similarity import (
    RowBlocks,
    TextScan,
    find_leaks,
    find_near_duplicates,
    pretoken_counts,
    scan_texts,
    shared_prefix,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from tuneloop.config import Settings
    from tuneloop.intake.stream import IntakeRun
    from tuneloop.progress import ProgressSink
    from tuneloop.tasks import Example, TaskSpec

PiiMode = Literal["flag", "redact", "off"]

APPROX_TOKENS_PER_PRETOKEN = 1.15
EMAIL_PATTERN = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE_PATTERN = re.compile(r"\+\d{1,3}[ -]?\(?\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}")
CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
REDACTIONS = {"email": "[EMAIL]", "phone": "[PHONE]", "card_number": "[CARD]"}


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)


class IntakeOptions:
    """What the intake checks do; :meth:`from_settings` maps ``data.*`` onto it."""

    max_tokens: int | None = None
    model_dir: Path | None = None  # tokenizer.json + chat template; None: approximate, no template check
    pii: PiiMode = "flag"
    near_duplicate_jaccard: float | None = 0.8
    eval_leakage_jaccard: float | None = 0.8
    shingle_words: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> IntakeOptions:
        data = settings.data
        return cls(
            max_tokens=data.max_tokens if data.max_tokens is not None else settings.training.max_seq_len,
            model_dir=resolve_model_dir(settings),
            pii=data.pii,
            near_duplicate_jaccard=data.near_duplicate_jaccard,
            eval_leakage_jaccard=data.eval_leakage_jaccard,
            shingle_words=data.shingle_words,
        )


def resolve_model_dir(settings: Settings) -> Path | None:
    """``data.tokenizer_dir``, else the base model's directory when it is local (the demo model's
    build directory for ``demo``); None when there is none on this machine."""
    if settings.data.tokenizer_dir:
        return Path(settings.data.tokenizer_dir)
    base = settings.model.base_model
    candidate = Path(settings.model.demo_model_dir) if base == "demo" else Path(base)
    return candidate if candidate.is_dir() else None


# --- token counts --------------------------------------------------------------------------


class TokenCounter:
    """Counts tokens with ``tokenizers`` + ``tokenizer.json`` when both exist, else approximately."""

    def __init__(self, model_dir: Path | None) -> None:
        self._tokenizer: Any = None
        path = model_dir / "tokenizer.json" if model_dir else None
        if path is not None and path.is_file():
            try:
                from tokenizers import Tokenizer
            except ImportError:
                pass
            else:
                self._tokenizer = Tokenizer.from_file(str(path))
        self.method = f"tokenizers:{path}" if self._tokenizer is not None else f"approx:{APPROX_TOKENS_PER_PRETOKEN}x pre-tokens"

    @property
    def exact(self) -> bool:
        return self._tokenizer is not None

    def count(self, texts: Sequence[str], pretokens: np.ndarray | None = None) -> np.ndarray:
        """Token counts of ``texts``; ``pretokens`` (from :func:`scan_texts`) saves a pass when approximating."""
        if self._tokenizer is not None:
            return np.fromiter((len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)), dtype=np.int64, count=len(texts))
        if pretokens is None:
            pretokens = pretoken_counts(texts)
        return np.ceil(pretokens * APPROX_TOKENS_PER_PRETOKEN).astype(np.int64)


# --- chat template -------------------------------------------------------------------------


class ChatTemplate:
    """The base model's chat template, rendered the way transformers does (sandboxed jinja2)."""

    SAFE_CONTENT_FILTERS = frozenset({"trim", "string", "e", "escape", "safe"})

    def __init__(self, source: str, special_tokens: dict[str, str], extra_special: Sequence[str]) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self.source = source
        self.template = env.from_string(source)
        self.variables = dict(special_tokens)
        self.special_tokens = sorted({t for t in [*special_tokens.values(), *extra_special] if t}, key=len, reverse=True)
        self.content_transparent = self._uses_content_only_as_text(env)

    @classmethod
    def load(cls, model_dir: Path | None) -> tuple[ChatTemplate | None, str]:
        """The template of ``model_dir`` and a note saying where it came from, or why there is none."""
        if model_dir is None:
            return None, "skipped: no base model directory on this machine (set data.tokenizer_dir)"
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {item.get("name"): item.get("template") for item in source if isinstance(item, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        where = str(config_path)
        if not source and (model_dir / "chat_template.jinja").is_file():
            source = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
            where = str(model_dir / "chat_template.jinja")
        if not source:
            return None, f"skipped: {model_dir} has no chat template"

        def content(token: Any) -> str:
            return str(token.get("content", "")) if isinstance(token, dict) else str(token or "")

        special = {name: content(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(name)}
        extra = [content(t) for t in config.get("extra_special_tokens") or config.get("additional_special_tokens") or []]
        extra += [content(t) for t in (config.get("added_tokens_decoder") or {}).values() if isinstance(t, dict) and t.get("special")]
        return cls(source, special, extra), f"checked against {where}"

    def _uses_content_only_as_text(self, env: Any) -> bool:
        """True when message contents reach the output only through concatenation (and
        harmless filters): then a row can fail only by holding a special token, and one render
        stands for all rows. A template that branches on, indexes or calls into a content is
        rendered for every row."""
        from jinja2 import nodes

        tree = env.parse(self.source)
        parents: dict[int, Any] = {}
        for node in tree.find_all(nodes.Node):
            for child in node.iter_child_nodes():
                parents[id(child)] = node
        for node in tree.find_all((nodes.Getitem, nodes.Getattr)):
            key = node.arg.value if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) else getattr(node, "attr", None)
            if key != "content":
                continue
            parent = parents.get(id(node))
            while isinstance(parent, (nodes.Add, nodes.Concat)) or (isinstance(parent, nodes.Filter) and parent.name in self.SAFE_CONTENT_FILTERS):
                parent = parents.get(id(parent))
            if not isinstance(parent, nodes.Output):
                return False
        return True

    def render(self, context: Sequence[dict[str, str]], completion: str) -> str:
        messages = [*context, {"role": "assistant", "content": completion}]
        return self.template.render(messages=messages, add_generation_prompt=False, **self.variables)

    def special_token_in(self, text: str) -> str | None:
        return next((token for token in self.special_tokens if token in text), None)


# --- PII -----------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number passes (cuts dates, amounts, ids)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def card_numbers(text: str) -> list[re.Match[str]]:
    """13-19 digit runs (spaces or dashes between digits allowed) that pass the Luhn check."""
    found = []
    for match in CARD_CANDIDATE.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            found.append(match)
    return found


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
    """``text`` with e-mails, phone numbers and Luhn-valid card numbers replaced; counts per kind."""
    counts = {"email": 0, "phone": 0, "card_number": 0}
    for match in reversed(card_numbers(text)):
        text = text[: match.start()] + REDACTIONS["card_number"] + text[match.end() :]
        counts["card_number"] += 1
    text, counts["email"] = EMAIL_PATTERN.subn(REDACTIONS["email"], text)
    text, counts["phone"] = PHONE_PATTERN.subn(REDACTIONS["phone"], text)
    return text, counts


# --- labels --------------------------------------------------------------------------------


@dataclass


class LabelAgreement:
    """Agreement among the labels of multi-labelled rows (``labels`` plus the row's answer),
    compared in the task's normal form (``normalise``); per key when the answers are JSON."""

    normalise: Callable[[str], str] = str.strip
    rows: int = 0
    agreeing: int = 0
    field_agreeing: dict[str, int] = field(default_factory=dict)
    field_rows: dict[str, int] = field(default_factory=dict)

    def add(self, completion: str, labels: Sequence[str]) -> bool:
        """Count one row; True when all its labels agree after normalisation."""
        from tuneloop.tasks.scoring import parse_json_answer, values_match

        answers = [completion, *labels]
        self.rows += 1
        agree = len({self.normalise(a) for a in answers}) == 1
        self.agreeing += agree
        parsed = [parse_json_answer(a) for a in answers]
        if all(p is not None for p in parsed):
            first = parsed[0] or {}
            for name in first:
                self.field_rows[name] = self.field_rows.get(name, 0) + 1
                same = all(p is not None and name in p and values_match(p[name], first[name]) for p in parsed)
                self.field_agreeing[name] = self.field_agreeing.get(name, 0) + same
        return agree

    def summary(self) -> dict[str, Any]:
        share = (lambda n: round(n / self.rows, 4)) if self.rows else (lambda n: None)
        return {
            "multi_labelled_rows": self.rows,
            "agreeing_rows": self.agreeing,
            "agreement": share(self.agreeing),
            "field_agreement": {name: round(n / self.field_rows[name], 4) for name, n in sorted(self.field_agreeing.items())},
        }


# --- the checks ----------------------------------------------------------------------------


@dataclass


class IntakeReport:
    """What the intake checks did; :meth:`summary` goes into ``summary.json`` as ``checks``."""

    rows_in: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    token_method: str = ""
    max_tokens: int | None = None
    template_overhead_tokens: int = 0
    chat_template: str = ""
    chat_template_rendered_per_row: bool = False
    pii_mode: str = "flag"
    redactions: dict[str, int] = field(default_factory=lambda: {"rows": 0, "email": 0, "phone": 0, "card_number": 0})
    labels: LabelAgreement = field(default_factory=LabelAgreement)
    near_duplicate_jaccard: float | None = None
    eval_leakage_jaccard: float | None = None
    eval_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, other: IntakeReport) -> None:
        """Add the counts of ``other`` (the same checks run on another chunk of the batch)."""
        self.rows_in += other.rows_in
        for reason, n in other.quarantined.items():
            self.quarantined[reason] = self.quarantined.get(reason, 0) + n
        for kind, n in other.redactions.items():
            self.redactions[kind] = self.redactions.get(kind, 0) + n
        self.labels.rows += other.labels.rows
        self.labels.agreeing += other.labels.agreeing
        for name, n in other.labels.field_rows.items():
            self.labels.field_rows[name] = self.labels.field_rows.get(name, 0) + n
        for name, n in other.labels.field_agreeing.items():
            self.labels.field_agreeing[name] = self.labels.field_agreeing.get(name, 0) + n
        for name, value in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value
        self.notes += [note for note in other.notes if note not in self.notes]
        self.token_method = self.token_method or other.token_method
        self.max_tokens = self.max_tokens if self.max_tokens is not None else other.max_tokens
        self.template_overhead_tokens = max(self.template_overhead_tokens, other.template_overhead_tokens)
        self.chat_template = self.chat_template or other.chat_template
        self.chat_template_rendered_per_row = self.chat_template_rendered_per_row or other.chat_template_rendered_per_row

    def summary(self) -> dict[str, Any]:
        return {
            "rows_checked": self.rows_in,
            "quarantined": dict(sorted(self.quarantined.items())),
            "tokens": {"method": self.token_method, "max_tokens": self.max_tokens, "template_overhead": self.template_overhead_tokens},
            "chat_template": {"status": self.chat_template, "rendered_per_row": self.chat_template_rendered_per_row},
            "pii": {"mode": self.pii_mode, "redactions": self.redactions},
            "labels": self.labels.summary(),
            "near_duplicate": {"jaccard": self.near_duplicate_jaccard},
            "eval_leakage": {"jaccard": self.eval_leakage_jaccard, "eval_rows": self.eval_rows},
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
            "notes": self.notes,
        }


def run_intake_checks(
    batch: CheckedBatch,
    options: IntakeOptions,
    spec: TaskSpec,
    *,
    eval_records: Iterable[dict[str, Any]] = (),
    is_eval: Callable[[str], bool] | None = None,
    progress: ProgressSink | None = None,
) -> IntakeReport:
    """Run every check on ``batch.accepted`` and move failing rows to ``batch.quarantined``.

    ``eval_records`` are evaluation rows to keep out of training; with ``is_eval`` (the split
    by id), this batch's own eval-side rows join them and only train-side rows can leak.
    """
    say = progress or (lambda _message: None)
    report = IntakeReport(
        rows_in=len(batch.accepted),
        pii_mode=options.pii,
        near_duplicate_jaccard=options.near_duplicate_jaccard,
        eval_leakage_jaccard=options.eval_leakage_jaccard,
    )
    rows = batch.accepted
    failed: dict[int, tuple[list[str], str | None, dict[str, Any]]] = {}

    def fail(index: int, reason: str, matched: str | None = None, **details: Any) -> None:
        reasons, old_match, old_details = failed.setdefault(index, ([], None, {}))
        reasons.append(reason)
        failed[index] = (reasons, matched or old_match, {**old_details, **details})

    report.labels.normalise = spec.scorer.normalise
    clock = time.perf_counter()
    if options.pii == "redact":
        for index, record in enumerate(rows):
            counts: dict[str, int] = {}

            def redact(text: str, counts: dict[str, int] = counts) -> str:
                if not any(mark in text for mark in "@+") and not CARD_CANDIDATE.search(text):
                    return text
                redacted, found = redact_pii(text)
                for kind, n in found.items():
                    counts[kind] = counts.get(kind, 0) + n
                return redacted

            changed = spec.map_texts(record, redact, inputs_only=True)
            if any(counts.values()):
                rows[index] = changed
                report.redactions["rows"] += 1
                for kind, n in counts.items():
                    report.redactions[kind] += n
    report.seconds["pii_redact"] = time.perf_counter() - clock

    clock = time.perf_counter()
    template, report.chat_template = ChatTemplate.load(options.model_dir)
    specials = template.special_tokens if template is not None else ()
    similarity_k = options.shingle_words if (options.near_duplicate_jaccard or options.eval_leakage_jaccard) else None
    say(f"scanning {len(rows)} inputs and answers (tokens, card numbers, special tokens, MinHash)")
    examples: list[Example] = [spec.example(r) for r in rows]  # the row checks passed: they read
    prompts = [_context_text(e) for e in examples]
    inputs = [e.input_text for e in examples]
    completions = [e.target or "" for e in examples]
    prefix = shared_prefix(inputs) if similarity_k else ""
    prompt_scan = scan_texts(prompts, special_tokens=specials)
    input_scan = scan_texts(inputs, shingle_words=similarity_k, strip_prefix=prefix) if similarity_k else None
    completion_scan = scan_texts(completions, special_tokens=specials)
    report.seconds["scan"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if options.pii == "flag":
        for index in prompt_scan.card_rows.tolist():
            found = card_numbers(prompts[index])
            if found:
                fail(index, "pii:card_number", card_numbers=len(found))
    report.seconds["pii_flag"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if template is None:
        report.notes.append(f"chat template check {report.chat_template}")
    else:
        report.chat_template_rendered_per_row = not template.content_transparent
        _check_chat_template(examples, template, {**completion_scan.special_rows, **prompt_scan.special_rows}, fail)
    report.seconds["chat_template"] = time.perf_counter() - clock

    clock = time.perf_counter()
    counter = TokenCounter(options.model_dir)
    report.token_method, report.max_tokens = counter.method, options.max_tokens
    if options.max_tokens is not None and rows:
        if template is not None:
            try:
                empty = template.render([{"role": "user", "content": ""}], "")
            except Exception:  # noqa: BLE001 - a template that refuses empty turns has no overhead to measure
                empty = ""
            overhead = sum(empty.count(token) for token in template.special_tokens)
            for token in template.special_tokens:
                empty = empty.replace(token, " ")
            report.template_overhead_tokens = overhead + (int(counter.count([empty])[0]) if empty.strip() else 0)
        tokens = counter.count(prompts, prompt_scan.pretokens) + counter.count(completions, completion_scan.pretokens) + report.template_overhead_tokens
        for index in np.flatnonzero(tokens > options.max_tokens).tolist():
            fail(index, "too_many_tokens", tokens=int(tokens[index]), max_tokens=options.max_tokens, token_count=counter.method.split(":")[0])
    report.seconds["tokens"] = time.perf_counter() - clock

    clock = time.perf_counter()
    for index, record in enumerate(rows):
        labels = record.get("labels")
        if labels and not report.labels.add(completions[index], labels):
            fail(index, "label_disagreement")
    report.seconds["labels"] = time.perf_counter() - clock

    clock = time.perf_counter()
    survivors = [i for i in range(len(rows)) if i not in failed]
    if options.near_duplicate_jaccard is not None and len(survivors) > 1:
        say(f"near-duplicates: MinHash/LSH over {len(survivors)} prompts, Jaccard >= {options.near_duplicate_jaccard}")
        dupes = find_near_duplicates(
            [inputs[i] for i in survivors], options.near_duplicate_jaccard, options.shingle_words, scan=_subset(input_scan, survivors), prefix=prefix
        )
        for later, earlier in dupes.items():
            fail(survivors[later], "near_duplicate", matched=examples[survivors[earlier]].id)
        survivors = [i for i in survivors if i not in failed]
    report.seconds["near_duplicate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    eval_side = []
    for record in eval_records:
        text = spec.input_text(record) if isinstance(record, dict) else None
        if text is not None:
            eval_side.append((str(spec.row_id(record)), text))
    train_side = survivors
    if is_eval is not None:
        eval_side += [(examples[i].id, inputs[i]) for i in survivors if is_eval(examples[i].id)]
        train_side = [i for i in survivors if not is_eval(examples[i].id)]
    report.eval_rows = len(eval_side)
    if options.eval_leakage_jaccard is not None and eval_side and train_side:
        say(f"eval leakage: {len(train_side)} training prompts against {len(eval_side)} eval prompts")
        leaks = find_leaks(
            [inputs[i] for i in train_side], [p for _, p in eval_side], options.eval_leakage_jaccard, options.shingle_words,
            train_scan=_subset(input_scan, train_side), prefix=prefix,
        )
        for train_index, eval_index in leaks.items():
            fail(train_side[train_index], "eval_leakage", matched=eval_side[eval_index][0])
    report.seconds["eval_leakage"] = time.perf_counter() - clock

    kept, kept_origins = [], []
    for index, (record, origin) in enumerate(zip(rows, batch.origins, strict=True)):
        if index in failed:
            reasons, matched, details = failed[index]
            raw = json.dumps(record, ensure_ascii=False)
            batch.quarantined.append(QuarantinedRow(origin[0], origin[1], raw, reasons, matched_id=matched, details=details))
            for reason in reasons:
                report.quarantined[reason] = report.quarantined.get(reason, 0) + 1
        else:
            kept.append(record)
            kept_origins.append(origin)
    batch.accepted, batch.origins = kept, kept_origins
    return report


def _context_text(example: Example) -> str:
    """Every turn's text before the answer, as the token bound and the PII scan see it."""
    return "\n".join(turn["content"] for turn in example.context)


def _subset(scan: TextScan | None, indices: Sequence[int]) -> TextScan | None:
    if scan is None or scan.band_keys is None or scan.signatures is None:
        return None
    index = np.asarray(indices, dtype=np.int64)
    keys, signatures = scan.band_keys, scan.signatures
    assert isinstance(keys, np.ndarray) and isinstance(signatures, np.ndarray), "scan_texts returns arrays"
    return TextScan(scan.pretokens[index], np.zeros(0, dtype=np.int64), {}, RowBlocks([(keys, index)]), RowBlocks([(signatures, index)]))


def _check_chat_template(
    examples: Sequence[Example], template: ChatTemplate, special_rows: dict[int, str], fail: Callable[..., None]
) -> None:
    """Rows holding a special token fail; the template is rendered once when it only
    concatenates contents, else for every row."""
    import jinja2

    for index, token in special_rows.items():
        fail(index, "chat_template_error", chat_template_error=f"holds the special token {token}")
    if template.content_transparent:
        try:
            template.render([{"role": "user", "content": "x"}], "y")
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            for index in range(len(examples)):
                if index not in special_rows:
                    fail(index, "chat_template_error", chat_template_error=str(err))
        return
    for index, example in enumerate(examples):
        if index in special_rows:
            continue
        try:
            template.render(example.context, example.target or "")
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            fail(index, "chat_template_error", chat_template_error=str(err))


# --- human review --------------------------------------------------------------------------

REVIEW_COLUMNS = ("id", "status", "reasons", "labels_agree", "source", "line", "prompt", "completion", "labels")


def write_review_sample(run: IntakeRun, out_dir: Path, n: int, spec: TaskSpec, *, seed: int = 0) -> dict[str, Any]:
    """``n`` rows drawn (seeded) from every row that reached the label check: accepted rows and
    rows held back for ``label_disagreement``. Writes review_sample.jsonl and review_sample.csv.
    Two passes over the run's files: one counts the pool, one picks the drawn rows."""

    def pool() -> Iterator[tuple[dict[str, Any], str, list[str], str, int]]:
        for record, source, line in run.iter_accepted():
            yield record, "accepted", [], source, line
        for held in run.iter_quarantined():
            if "label_disagreement" in held["reasons"]:
                yield json.loads(held["raw"]), "held_back", held["reasons"], held["source"], held["line"]

    size = sum(1 for _ in pool())
    chosen = set(random.Random(seed).sample(range(size), min(n, size)))
    sample: list[dict[str, Any]] = []
    for index, (record, status, reasons, source, line) in enumerate(pool()):
        if index not in chosen:
            continue
        labels = record.get("labels") or []
        example = spec.example(record)
        answer = example.target or ""
        sample.append(
            {
                "id": record.get("id"),
                "status": status,
                "reasons": reasons,
                "labels_agree": (len({spec.scorer.normalise(a) for a in [answer, *labels]}) == 1) if labels else None,
                "source": source,
                "line": line,
                "prompt": example.input_text,
                "completion": answer,
                "labels": labels,
            }
        )
    sample.sort(key=lambda row: (row["source"], row["line"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "review_sample.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in sample)
    with open(out_dir / "review_sample.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for row in sample:
            writer.writerow({**row, "reasons": ";".join(row["reasons"]), "labels": json.dumps(row["labels"], ensure_ascii=False)})
    return {"rows": len(sample), "pool": size, "seed": seed, "files": [str(out_dir / "review_sample.jsonl"), str(out_dir / "review_sample.csv")]}
