"""Text similarity for intake: one vectorised pass over many texts (:func:`scan_texts`: pre-token
counts, card-number candidates, special tokens, MinHash signatures), and near-duplicate and
eval-leakage search over word shingles with MinHash (one-permutation hashing, 64 bins with
optimal densification) and LSH (12 bands x 5); every candidate pair is confirmed on the exact
shingle sets, so a reported pair is always at or above its Jaccard threshold."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

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
    band_keys: np.ndarray | RowBlocks | None = None  # (n, LSH_BANDS) uint64, 0 = empty band
    signatures: np.ndarray | RowBlocks | None = None  # (n, OPH_BINS) uint16: densified MinHash, truncated


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


class RowBlocks:
    """Rows of several 2-D arrays, each optionally through a row index, read as one array by
    global row number without concatenating them. The bounded-memory intake keeps its MinHash
    keys and signatures once; a concatenated or fancy-indexed copy of them would be the largest
    allocation of a big batch."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> None:
        self.parts = list(parts)
        sizes = [len(index) if index is not None else len(array) for array, index in self.parts]
        self.bounds = np.cumsum([0, *sizes])

    @classmethod
    def of(cls, value: np.ndarray | RowBlocks) -> RowBlocks:
        return value if isinstance(value, RowBlocks) else cls([(value, None)])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __add__(self, other: RowBlocks) -> RowBlocks:
        return RowBlocks([*self.parts, *other.parts])

    @property
    def width(self) -> int:
        return int(self.parts[0][0].shape[1])

    def column(self, j: int) -> np.ndarray:
        return np.concatenate([array[index, j] if index is not None else array[:, j] for array, index in self.parts])

    def rows(self, at: np.ndarray) -> np.ndarray:
        first = self.parts[0][0]
        out = np.empty((len(at), first.shape[1]), dtype=first.dtype)
        for part, (array, index) in enumerate(self.parts):
            inside = (at >= self.bounds[part]) & (at < self.bounds[part + 1])
            local = at[inside] - self.bounds[part]
            out[inside] = array[index[local]] if index is not None else array[local]
        return out

    def nonzero_rows(self) -> np.ndarray:
        """Rows with any non-zero value (for band keys: texts with at least one word)."""
        found = np.zeros(len(self), dtype=bool)
        for j in range(self.width):
            found |= self.column(j) != 0
        return found


def candidate_pairs(keys: np.ndarray | RowBlocks) -> np.ndarray:
    """(earlier, later) row pairs sharing an LSH bucket: each member with the bucket's first and
    previous member. Shape (n, 2), unique, earlier < later."""
    keys = RowBlocks.of(keys)
    pairs = []
    n = len(keys)
    for band in range(keys.width):
        column = keys.column(band)
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


def _screen(pairs: np.ndarray, signatures: np.ndarray | RowBlocks, threshold: float) -> np.ndarray:
    """Candidate pairs whose signatures agree on enough bins to possibly reach ``threshold``
    (3 standard errors of the OPH_BINS-bin estimate below it: 0.15 at 0.8 with 64 bins)."""
    if len(pairs) == 0:
        return pairs
    rows = RowBlocks.of(signatures)
    floor = threshold - 3 * (threshold * (1 - threshold) / OPH_BINS) ** 0.5
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), 200_000):
        block = pairs[start : start + 200_000]
        agree = (rows.rows(block[:, 0]) == rows.rows(block[:, 1])).mean(axis=1)
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
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    threshold: float,
    k: int = 3,
    *,
    train_scan: TextScan | None = None,
    eval_scan: TextScan | None = None,
    prefix: str = "",
) -> dict[int, int]:
    """{train index: eval index} for training texts equal or near-equal to an evaluation text.
    The texts are read only for candidate pairs and for texts without words when both scans
    are given (``texts`` may then be lazy sequences over a file)."""
    if not train_texts or not eval_texts:
        return {}
    if train_scan is None or train_scan.band_keys is None or train_scan.signatures is None:
        train_scan = scan_texts(train_texts, shingle_words=k, strip_prefix=prefix)
    if eval_scan is None or eval_scan.band_keys is None or eval_scan.signatures is None:
        eval_scan = scan_texts(eval_texts, shingle_words=k, strip_prefix=prefix)
    assert train_scan.band_keys is not None and train_scan.signatures is not None
    assert eval_scan.band_keys is not None and eval_scan.signatures is not None
    n_eval = len(eval_texts)
    eval_keys, train_keys = RowBlocks.of(eval_scan.band_keys), RowBlocks.of(train_scan.band_keys)
    signatures = RowBlocks.of(eval_scan.signatures) + RowBlocks.of(train_scan.signatures)
    pairs = candidate_pairs(eval_keys + train_keys)
    pairs = _screen(pairs[(pairs[:, 0] < n_eval) & (pairs[:, 1] >= n_eval)], signatures, threshold)
    eval_shingles, train_shingles = ShingleCache(eval_texts, k, prefix), ShingleCache(train_texts, k, prefix)
    leaks: dict[int, int] = {}
    for eval_index, index in pairs.tolist():
        train_index = index - n_eval
        if train_index not in leaks and jaccard(eval_shingles[eval_index], train_shingles[train_index]) >= threshold:
            leaks[train_index] = eval_index
    # Texts without words have no shingles: equal ones leak. (Equal texts with words share every
    # band and were confirmed above at Jaccard 1.)
    exact: dict[str, int] = {}
    for i in np.flatnonzero(~eval_keys.nonzero_rows()).tolist():
        exact[eval_texts[i]] = i
    if exact:
        for i in np.flatnonzero(~train_keys.nonzero_rows()).tolist():
            if i not in leaks and train_texts[i] in exact:
                leaks[i] = exact[train_texts[i]]
    return leaks
