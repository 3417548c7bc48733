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

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from tuneloop.config import Settings
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

_PIECE_CLASS = np.zeros(256, dtype=np.uint8)  # 0 space, 1 letter (or any non-ASCII byte), 2 digit, 3 other
_PIECE_CLASS[33:127] = 3
_PIECE_CLASS[[ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"]] = 1
_PIECE_CLASS[[ord(c) for c in "0123456789"]] = 2
_PIECE_CLASS[128:] = 1


@dataclass
class TextScan:
    """Per-text features from one vectorised pass over the UTF-8 bytes of many texts."""

    pretokens: np.ndarray  # letter runs + single digits + single other characters
    card_rows: np.ndarray  # texts with a run of >= 13 digits (single spaces/dashes allowed): card candidates
    special_rows: dict[int, str]  # text index -> a special token it contains
    band_keys: np.ndarray | None = None  # (n, LSH_BANDS) uint64, 0 = empty band
    signatures: np.ndarray | None = None  # (n, OPH_BINS) uint16: densified MinHash, truncated


def scan_texts(
    texts: Sequence[str], *, special_tokens: Sequence[str] = (), shingle_words: int | None = None, strip_prefix: str = "", chunk_rows: int = 4_000
) -> TextScan:
    """Encode ``texts`` once per chunk and derive every byte-level feature the checks need;
    the shingles leave out ``strip_prefix`` where a text starts with it."""
    n = len(texts)
    pretokens = np.zeros(n, dtype=np.int64)
    card_rows: list[np.ndarray] = []
    keys = np.zeros((n, LSH_BANDS), dtype=np.uint64) if shingle_words else None
    signatures = np.zeros((n, OPH_BINS), dtype=np.uint16) if shingle_words else None
    tokens = [t.encode("utf-8") for t in special_tokens if t and "\0" not in t]
    token_groups: dict[bytes, list[tuple[int, bytes]]] = {}
    for rank, token in enumerate(tokens):
        token_groups.setdefault(token[:2], []).append((rank, token))
    found_rank: dict[int, int] = {}
    for start in range(0, n, chunk_rows):
        chunk = texts[start : start + chunk_rows]
        encoded = [t.encode("utf-8") for t in chunk]
        lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        buf = b"\0".join(encoded) + b"\0"
        raw = np.frombuffer(buf, dtype=np.uint8)
        classes = _PIECE_CLASS[raw]
        letter = classes == 1
        digit = classes == 2
        piece = (classes >= 2).astype(np.int32)
        piece[1:] += letter[1:] & ~letter[:-1]
        piece[0] += letter[0]
        pretokens[start : start + len(chunk)] = np.add.reduceat(piece, offsets)
        # card candidates: digit runs where single ' ' or '-' between two digits do not break the run
        joiner = np.zeros(len(raw), dtype=bool)
        joiner[1:-1] = ((raw[1:-1] == 32) | (raw[1:-1] == 45)) & digit[:-2] & digit[2:]
        cardish = (digit | joiner).astype(np.int8)
        edges = np.flatnonzero(np.diff(cardish, prepend=np.int8(0), append=np.int8(0)))
        run_start, run_end = edges[0::2], edges[1::2]
        digit_cumsum = np.concatenate(([0], np.cumsum(digit)))
        long_runs = run_start[(digit_cumsum[run_end] - digit_cumsum[run_start]) >= 13]
        card_rows.append(np.unique(np.searchsorted(offsets, long_runs, side="right") - 1) + start)
        for prefix, group in token_groups.items():  # one pass per shared prefix ("<|"), not per token
            position = buf.find(prefix)
            while position != -1:
                row = int(np.searchsorted(offsets, position, side="right") - 1) + start
                for rank, token in group:
                    if buf.startswith(token, position) and rank < found_rank.get(row, len(tokens)):
                        found_rank[row] = rank  # the row reports the first of ``special_tokens`` it holds
                position = buf.find(prefix, position + 1)
        if shingle_words:
            stripped = np.fromiter((i for i, text in enumerate(chunk) if strip_prefix and text.startswith(strip_prefix)), dtype=np.int64)
            chunk_keys, chunk_signatures = _minhash(buf, offsets, stripped, shingle_words, len(strip_prefix.encode("utf-8")))
            keys[start : start + len(chunk)] = chunk_keys  # type: ignore[index]
            signatures[start : start + len(chunk)] = chunk_signatures  # type: ignore[index]
    special_rows = {row: tokens[rank].decode("utf-8") for row, rank in sorted(found_rank.items())}
    cards = np.concatenate(card_rows) if card_rows else np.zeros(0, dtype=np.int64)
    return TextScan(pretokens, cards, special_rows, keys, signatures)


def pretoken_counts(texts: Sequence[str]) -> np.ndarray:
    """Letter runs + single digits + single other characters per text (see :func:`scan_texts`)."""
    return scan_texts(texts).pretokens


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


# --- near-duplicates -----------------------------------------------------------------------

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]] = True
_WORD_BYTE[128:] = True
_PREFIX_MASKS = np.array([(1 << (8 * n)) - 1 if n < 8 else _MASK64 for n in range(9)], dtype=np.uint64)
_WORD_RE = re.compile(rb"[a-z0-9\x80-\xff]+")
OPH_BINS, LSH_BANDS, LSH_ROWS = 64, 12, 5
_BIN_SHIFT = 64 - (OPH_BINS.bit_length() - 1)  # a shingle hash's top bits pick its bin


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash of 64-bit values (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


_EMPTY_BIN = np.iinfo(np.uint64).max
# every bin's probe order over all bins (a fixed pseudo-random permutation per bin)
_PROBES_FLAT = np.argsort(_mix(np.arange(OPH_BINS * OPH_BINS, dtype=np.uint64) + _U64(0x5851F42D4C957F2D)).reshape(OPH_BINS, OPH_BINS), axis=1).ravel()


def _densify(signature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal densification (Shrivastava, ICML 2017): an empty bin takes the value of the first
    non-empty bin in its own fixed probe order. Two texts then agree on a bin with probability
    equal to their Jaccard similarity, as with independent MinHashes; filling from the next bin
    along (rotation) instead copies one shared value into whole runs of empty bins, so short
    texts sharing a few shingles agreed on entire LSH bands. Returns the dense signatures and
    the rows without any shingle (left as they are)."""
    n = signature.shape[0]
    empty = signature == _EMPTY_BIN
    no_words = empty.all(axis=1)
    filled, values = ~empty.ravel(), signature.ravel()
    dense = values.copy()
    target = np.flatnonzero(empty & ~no_words[:, None])  # flat (row, bin) positions to fill
    row_start = target - target % OPH_BINS
    probe_row = (target % OPH_BINS) * OPH_BINS
    for attempt in range(OPH_BINS):  # every text with a shingle is done by the last attempt
        if len(target) == 0:
            break
        source = row_start + _PROBES_FLAT[probe_row + attempt]
        found = filled[source]
        dense[target[found]] = values[source[found]]
        missed = ~found
        target, row_start, probe_row = target[missed], row_start[missed], probe_row[missed]
    return dense.reshape(n, OPH_BINS), no_words


def shared_prefix(texts: Sequence[str], *, min_chars: int = 16, sample: int = 2_000) -> str:
    """The prefix every text shares (a fixed instruction in each prompt), cut back to a word
    boundary; "" when shorter than ``min_chars``. Left out of the similarity checks, it would
    make every short input a near-duplicate of every other."""
    if len(texts) < 2:
        return ""
    import os

    prefix = os.path.commonprefix(list(texts[:sample]))
    if prefix and not all(t.startswith(prefix) for t in texts[sample:]):
        prefix = os.path.commonprefix(list(texts))
    cut = max(prefix.rfind(" "), prefix.rfind("\n"))
    prefix = prefix[: cut + 1] if cut >= 0 else ""
    return prefix if len(prefix) >= min_chars else ""


def similarity_text(prompt: str, prefix: str = "") -> str:
    """What near-duplicate and leakage checks compare: the input without the shared prefix."""
    return prompt[len(prefix) :] if prefix and prompt.startswith(prefix) else prompt


def shingle_set(text: str, k: int, prefix: str = "") -> set[tuple[bytes, ...]]:
    """Exact word k-shingles (lower-cased ASCII letters/digits and non-ASCII runs are words)."""
    words = _WORD_RE.findall(similarity_text(text, prefix).encode("utf-8").lower())
    if len(words) < k:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _minhash(buf: bytes, row_starts: np.ndarray, stripped_rows: np.ndarray, k: int, prefix_bytes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Densified one-permutation MinHash of the word k-shingles of each text in ``buf`` (texts
    joined by NUL bytes, starting at ``row_starts``); the first ``prefix_bytes`` of
    ``stripped_rows`` are left out, as :func:`similarity_text` does.

    Returns the LSH band keys, shape (n, LSH_BANDS), 0 for a text with no words, and the
    signatures truncated to 16 bits, shape (n, OPH_BINS), to pre-screen candidate pairs."""
    n = len(row_starts)
    buf = (buf + b"\0" * 8).lower()
    raw = np.frombuffer(buf, dtype=np.uint8)
    is_word = _WORD_BYTE[raw]
    is_word[-8:] = False
    if len(stripped_rows) and prefix_bytes:
        is_word[(row_starts[stripped_rows][:, None] + np.arange(prefix_bytes)).ravel()] = False
    edges = np.flatnonzero(np.diff(is_word.astype(np.int8), prepend=np.int8(0)))
    starts, ends = edges[0::2], edges[1::2]
    # a word's hash: its first and last 8 bytes and its length (exact sets confirm every pair)
    words64 = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    length = ends - starts
    first = words64[starts] & _PREFIX_MASKS[np.minimum(length, 8)]
    last = np.where(length > 8, words64[np.maximum(ends - 8, 0)], _U64(0))
    word_hash = _mix(first ^ _mix(last ^ length.astype(np.uint64)))
    word_row = np.searchsorted(row_starts, starts, side="right") - 1
    n_words = np.bincount(word_row, minlength=n)
    count = len(word_hash) - k + 1
    if count > 0:
        acc = word_hash[:count].copy()
        with np.errstate(over="ignore"):
            for j in range(1, k):
                acc = _mix(acc * _U64(0x9E3779B97F4A7C15) + word_hash[j : j + count])
        inside = word_row[:count] == word_row[k - 1 : k - 1 + count]
        sh_hash, sh_row = acc[inside], word_row[:count][inside]
    else:
        sh_hash, sh_row = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    short_rows = np.flatnonzero((n_words > 0) & (n_words < k))
    if len(short_rows):  # fewer than k words: the whole word sequence is the one shingle
        first_word = np.searchsorted(word_row, short_rows)
        extra = []
        for row, begin in zip(short_rows.tolist(), first_word.tolist(), strict=True):
            one = word_hash[begin : begin + 1].copy()
            with np.errstate(over="ignore"):
                for j in range(1, int(n_words[row])):
                    one = _mix(one * _U64(0x9E3779B97F4A7C15) + word_hash[begin + j : begin + j + 1])
            extra.append(one[0])
        sh_hash = np.concatenate((sh_hash, np.array(extra, dtype=np.uint64)))
        sh_row = np.concatenate((sh_row, short_rows.astype(np.int64)))
    flat = np.full(n * OPH_BINS, _EMPTY_BIN, dtype=np.uint64)
    np.minimum.at(flat, sh_row * OPH_BINS + (sh_hash >> _U64(_BIN_SHIFT)).astype(np.int64), sh_hash & _U64((1 << _BIN_SHIFT) - 1))
    dense, no_words = _densify(flat.reshape(n, OPH_BINS))
    bands = dense[:, : LSH_BANDS * LSH_ROWS].reshape(n, LSH_BANDS, LSH_ROWS)
    with np.errstate(over="ignore"):
        keys = bands[:, :, 0].copy()
        for j in range(1, LSH_ROWS):
            keys = _mix(keys * _U64(0x9E3779B97F4A7C15) + bands[:, :, j])
    keys[keys == 0] = 1
    keys[no_words] = 0
    return keys, (dense & _U64(0xFFFF)).astype(np.uint16)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(earlier, later) row pairs sharing an LSH bucket: each member with the bucket's first and
    previous member. Shape (n, 2), unique, earlier < later."""
    pairs = []
    n = keys.shape[0]
    for band in range(keys.shape[1]):
        column = keys[:, band]
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        same = (ordered[1:] == ordered[:-1]) & (ordered[1:] != 0)
        if not same.any():
            continue
        group_start = np.maximum.accumulate(np.where(np.concatenate(([True], ~same)), np.arange(n), 0))
        later = np.flatnonzero(np.concatenate(([False], same)))
        pairs.append(np.stack((order[group_start[later]], order[later]), axis=1))
        pairs.append(np.stack((order[later - 1], order[later]), axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    allpairs = np.concatenate(pairs)
    allpairs = allpairs[allpairs[:, 0] != allpairs[:, 1]]
    allpairs.sort(axis=1)
    codes = np.unique(allpairs[:, 0].astype(np.int64) * n + allpairs[:, 1])  # 1-D unique: far faster than axis=0
    return np.stack((codes // n, codes % n), axis=1)


class ShingleCache:
    """Exact shingle sets of texts, computed once each (candidate verification)."""

    def __init__(self, texts: Sequence[str], k: int, prefix: str = "") -> None:
        self.texts, self.k, self.prefix = texts, k, prefix
        self.sets: dict[int, set[tuple[bytes, ...]]] = {}

    def __getitem__(self, index: int) -> set[tuple[bytes, ...]]:
        found = self.sets.get(index)
        if found is None:
            found = self.sets[index] = shingle_set(self.texts[index], self.k, self.prefix)
        return found


def _screen(pairs: np.ndarray, signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Candidate pairs whose signatures agree on enough bins to possibly reach ``threshold``
    (3 standard errors of the OPH_BINS-bin estimate below it: 0.15 at 0.8 with 64 bins)."""
    if len(pairs) == 0:
        return pairs
    floor = threshold - 3 * (threshold * (1 - threshold) / OPH_BINS) ** 0.5
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), 200_000):
        block = pairs[start : start + 200_000]
        agree = (signatures[block[:, 0]] == signatures[block[:, 1]]).mean(axis=1)
        keep[start : start + len(block)] = agree >= floor
    return pairs[keep]


def find_near_duplicates(texts: Sequence[str], threshold: float, k: int = 3, *, scan: TextScan | None = None, prefix: str = "") -> dict[int, int]:
    """{later index: earlier index} for texts whose Jaccard with an earlier *kept* text is at
    least ``threshold`` (greedy in order: a text matched only by a dropped one is kept).
    ``scan`` (from :func:`scan_texts` with ``shingle_words=k``) saves the MinHash pass."""
    if len(texts) < 2:
        return {}
    if scan is None or scan.band_keys is None or scan.signatures is None:
        scan = scan_texts(texts, shingle_words=k, strip_prefix=prefix)
    assert scan.band_keys is not None and scan.signatures is not None
    pairs = _screen(candidate_pairs(scan.band_keys), scan.signatures, threshold)
    shingles = ShingleCache(texts, k, prefix)
    earlier_of: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        earlier_of.setdefault(b, []).append(a)
    dropped: dict[int, int] = {}
    for later in sorted(earlier_of):
        for earlier in sorted(earlier_of[later]):
            if earlier not in dropped and jaccard(shingles[earlier], shingles[later]) >= threshold:
                dropped[later] = earlier
                break
    return dropped


def find_leaks(
    train_texts: Sequence[str], eval_texts: Sequence[str], threshold: float, k: int = 3, *, train_scan: TextScan | None = None, prefix: str = ""
) -> dict[int, int]:
    """{train index: eval index} for training texts equal or near-equal to an evaluation text."""
    if not train_texts or not eval_texts:
        return {}
    if train_scan is None or train_scan.band_keys is None or train_scan.signatures is None:
        train_scan = scan_texts(train_texts, shingle_words=k, strip_prefix=prefix)
    eval_scan = scan_texts(eval_texts, shingle_words=k, strip_prefix=prefix)
    assert train_scan.band_keys is not None and train_scan.signatures is not None
    assert eval_scan.band_keys is not None and eval_scan.signatures is not None
    n_eval = len(eval_texts)
    keys = np.concatenate((eval_scan.band_keys, train_scan.band_keys))
    signatures = np.concatenate((eval_scan.signatures, train_scan.signatures))
    pairs = candidate_pairs(keys)
    pairs = _screen(pairs[(pairs[:, 0] < n_eval) & (pairs[:, 1] >= n_eval)], signatures, threshold)
    texts = [*eval_texts, *train_texts]
    shingles = ShingleCache(texts, k, prefix)
    leaks: dict[int, int] = {}
    for eval_index, index in pairs.tolist():
        train_index = index - n_eval
        if train_index not in leaks and jaccard(shingles[eval_index], shingles[index]) >= threshold:
            leaks[train_index] = eval_index
    exact = {text: i for i, text in enumerate(eval_texts)}  # texts without words have no shingles
    for i, text in enumerate(train_texts):
        if i not in leaks and text in exact:
            leaks[i] = exact[text]
    return leaks


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
    return TextScan(scan.pretokens[index], np.zeros(0, dtype=np.int64), {}, scan.band_keys[index], scan.signatures[index])


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


def write_review_sample(batch: CheckedBatch, out_dir: Path, n: int, spec: TaskSpec, *, seed: int = 0) -> dict[str, Any]:
    """``n`` rows drawn (seeded) from every row that reached the label check: accepted rows and
    rows held back for ``label_disagreement``. Writes review_sample.jsonl and review_sample.csv."""
    pool: list[dict[str, Any]] = []
    for record, (source, line) in zip(batch.accepted, batch.origins, strict=True):
        pool.append({"record": record, "status": "accepted", "reasons": [], "source": source, "line": line})
    for held in batch.quarantined:
        if "label_disagreement" in held.reasons:
            pool.append({"record": json.loads(held.raw), "status": "held_back", "reasons": held.reasons, "source": held.source, "line": held.line})
    chosen = random.Random(seed).sample(range(len(pool)), min(n, len(pool)))
    sample = []
    for index in sorted(chosen, key=lambda i: (pool[i]["source"], pool[i]["line"])):
        item, record = pool[index], pool[index]["record"]
        labels = record.get("labels") or []
        example = spec.example(record)
        answer = example.target or ""
        sample.append(
            {
                "id": record.get("id"),
                "status": item["status"],
                "reasons": item["reasons"],
                "labels_agree": (len({spec.scorer.normalise(a) for a in [answer, *labels]}) == 1) if labels else None,
                "source": item["source"],
                "line": item["line"],
                "prompt": example.input_text,
                "completion": answer,
                "labels": labels,
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "review_sample.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in sample)
    with open(out_dir / "review_sample.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for row in sample:
            writer.writerow({**row, "reasons": ";".join(row["reasons"]), "labels": json.dumps(row["labels"], ensure_ascii=False)})
    return {"rows": len(sample), "pool": len(pool), "seed": seed, "files": [str(out_dir / "review_sample.jsonl"), str(out_dir / "review_sample.csv")]}

