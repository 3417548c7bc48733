"""Bounded-memory intake: every check of a labelled batch over a stream of lines, one chunk of
rows in memory at a time, accepted rows spilled to local disk.

    run = run_intake(lines, spec, workdir, options=IntakeOptions(...), quality=QualitySuite(...))
    run.iter_accepted()      # (record, source, line) in id order
    run.iter_quarantined()   # QuarantinedRow.to_json() in (source, line) order

**Pass 1** reads ``chunk_rows`` lines at a time: the row checks, duplicate ids (against every
earlier row of the batch, as 64-bit BLAKE2b hashes of the ids), the per-row intake checks
(tokens, chat template, PII, labels) and the MinHash of every accepted input; accepted rows go to
a spill file. **Between the passes** near-duplicates and eval leakage are found over the whole
batch from the MinHash keys, reading back only the rows of candidate pairs, so they find what a
whole-batch run finds. **Pass 2** reads the spill a chunk at a time: rows those checks dropped
go to quarantine, the Great Expectations suite runs on the rest, and what it accepts is written
as id-sorted runs that :meth:`IntakeRun.iter_accepted` merges.

Memory: one chunk of parsed rows, plus ~130 bytes per accepted row (12 LSH band keys of 4 bytes,
a 64-byte signature, a file offset, the id hash) for the whole-batch checks. The shared prefix
left out of the similarity checks (a fixed instruction) is the one the first chunk's inputs share.
A false duplicate id needs two ids with one 64-bit hash: about once in 3 million batches of 3.5
million rows.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tuneloop.intake.rows import CheckedBatch, QuarantinedRow, check_lines
from tuneloop.intake.similarity import (
    RowBlocks,
    TextScan,
    find_leaks,
    find_near_duplicates,
    scan_texts,
    shared_prefix,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

    from tuneloop.intake.checks import IntakeOptions, IntakeReport
    from tuneloop.intake.expectations import QualitySuite
    from tuneloop.progress import ProgressSink
    from tuneloop.tasks import TaskSpec

DEFAULT_CHUNK_ROWS = 50_000


class IdHashes:
    """The ids seen so far as 64-bit hashes: a sorted numpy array plus a set of recent ones."""

    FLUSH_AT = 100_000

    def __init__(self) -> None:
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._recent: set[int] = set()

    @staticmethod
    def _key(row_id: object) -> int:
        digest = hashlib.blake2b(str(row_id).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def __contains__(self, row_id: object) -> bool:
        key = self._key(row_id)
        if key in self._recent:
            return True
        at = int(np.searchsorted(self._sorted, np.uint64(key)))
        return at < len(self._sorted) and int(self._sorted[at]) == key

    def add(self, row_id: str) -> None:
        self._recent.add(self._key(row_id))
        if len(self._recent) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._recent:
            recent = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.sort(np.concatenate((self._sorted, recent)))
            self._recent = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


class SpilledTexts(Sequence[str]):
    """A read-only sequence of texts kept in spill files: item ``i`` is the line at byte
    ``offsets[i]`` of file ``files[i]``, turned into text by that file's ``parse`` (given the
    line's bytes). Only the rows of candidate pairs are ever read back."""

    def __init__(self, sources: Sequence[tuple[Path, Callable[[bytes], str]]], files: np.ndarray, offsets: np.ndarray) -> None:
        self.sources, self.files, self.offsets = list(sources), files, offsets
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        source = int(self.files[index])
        handle = self._handles.get(source)
        if handle is None:
            handle = self._handles[source] = open(self.sources[source][0], "rb")  # noqa: SIM115 - closed by close()
        handle.seek(int(self.offsets[index]))
        return self.sources[source][1](handle.readline())

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


@dataclass
class IntakeRun:
    """The outcome of :func:`run_intake`: counts, reports and the spilled rows in ``workdir``."""

    workdir: Path
    total: int = 0
    accepted: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    intake: IntakeReport | None = None
    quality: QualitySuite | None = None
    quarantined: int = 0
    chunks: int = 0
    accepted_runs: list[Path] = field(default_factory=list)
    quarantine_runs: list[Path] = field(default_factory=list)

    def iter_accepted(self, order: Literal["id", "input"] = "id") -> Iterator[tuple[dict[str, Any], str, int]]:
        """``(record, source, line)`` of every accepted row, in id order (merged from the runs)
        or in input order (each run covers consecutive rows: one run in memory at a time)."""
        if order == "input":
            for path in self.accepted_runs:
                for (_, _, source, line), payload in sorted(_read_spill(path), key=lambda item: item[0][1]):
                    yield json.loads(payload), source, line
            return
        for (_, _, source, line), payload in heapq.merge(*(_read_spill(path) for path in self.accepted_runs), key=lambda item: item[0][0]):
            yield json.loads(payload), source, line

    def iter_quarantined(self) -> Iterator[dict[str, Any]]:
        """Every quarantined row (``QuarantinedRow.to_json()``), in (source, line) order."""
        yield from heapq.merge(*(_read_jsonl(path) for path in self.quarantine_runs), key=lambda row: (row["source"], row["line"]))


def _read_jsonl(path: Path) -> Iterator[Any]:
    with open(path, "rb") as handle:
        for line in handle:
            yield json.loads(line)


def _spill_line(header: list[Any], payload: bytes) -> bytes:
    """One spill line: a JSON header (ASCII: no raw tab), a tab, the record's JSON as it came in
    (a record is written again only when a check changed it): the row is never re-serialised."""
    return json.dumps(header).encode("ascii") + b"\t" + payload + b"\n"


def _split_spill(line: bytes) -> tuple[Any, bytes]:
    header, _, payload = line.rstrip(b"\n").partition(b"\t")
    return json.loads(header), payload


def _read_spill(path: Path) -> Iterator[tuple[Any, bytes]]:
    with open(path, "rb") as handle:
        for line in handle:
            yield _split_spill(line)


def _write_jsonl(path: Path, items: Iterable[Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def _fold_keys(keys: np.ndarray) -> np.ndarray:
    """LSH band keys folded to 32 bits (0 still means an empty band; collisions only add
    candidates, which are confirmed on the exact shingle sets)."""
    folded = ((keys ^ (keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    folded[(folded == 0) & (keys != 0)] = 1
    return folded


def chunked(lines: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last may be shorter) from ``lines``."""
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def run_intake(
    lines: Iterable[tuple[str, int, bytes]],
    spec: TaskSpec,
    workdir: Path,
    *,
    options: IntakeOptions | None = None,
    eval_records: Iterable[dict[str, Any]] = (),
    is_eval: Callable[[str], bool] | None = None,
    quality: QualitySuite | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressSink | None = None,
) -> IntakeRun:
    """Check every ``(source, line, raw)`` of a batch in bounded memory (see the module doc).

    ``options`` adds the intake checks (None: the row checks only); ``eval_records`` are
    evaluation rows to keep out of training and ``is_eval`` the split by id (this batch's own
    eval-side rows then join them); ``quality`` adds the GX suite (its thresholds are the
    caller's: :meth:`QualitySuite.report`). ``workdir`` (local disk) receives the spill files,
    about twice the accepted rows' size."""
    from tuneloop.intake.checks import IntakeReport, run_intake_checks

    say = progress or (lambda _message: None)
    workdir.mkdir(parents=True, exist_ok=True)
    run = IntakeRun(workdir=workdir, quality=quality)
    similarity_k = options.shingle_words if options is not None and (options.near_duplicate_jaccard or options.eval_leakage_jaccard) else None
    per_row = replace(options, near_duplicate_jaccard=None, eval_leakage_jaccard=None) if options is not None else None
    if options is not None:
        run.intake = IntakeReport(
            pii_mode=options.pii, near_duplicate_jaccard=options.near_duplicate_jaccard, eval_leakage_jaccard=options.eval_leakage_jaccard,
        )
    ids = IdHashes()
    spill_path = workdir / "accepted.spill.jsonl"
    keys: list[np.ndarray] = []
    signatures: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    eval_side: list[np.ndarray] = []
    prefix: str | None = None

    # pass 1: row checks, per-row intake checks, MinHash; accepted rows spilled
    position = 0
    with open(spill_path, "wb") as spill:
        for chunk in chunked(lines, chunk_rows):
            run.chunks += 1
            where = f" (chunk {run.chunks}, lines {run.total + 1}..{run.total + len(chunk)})"
            batch = check_lines(chunk, spec, seen_ids=ids)
            run.total += batch.total
            raw_of = {(source, number): raw.removeprefix(b"\xef\xbb\xbf") for source, number, raw in chunk}
            parsed = dict(zip(batch.origins, batch.accepted, strict=True))  # held: identity tells a changed record
            if per_row is not None and run.intake is not None:
                run.intake.add(run_intake_checks(batch, per_row, spec))
            if similarity_k and batch.accepted:
                inputs = [spec.example(record).input_text for record in batch.accepted]
                if prefix is None:
                    prefix = shared_prefix(inputs)
                scan = scan_texts(inputs, shingle_words=similarity_k, strip_prefix=prefix)
                assert isinstance(scan.band_keys, np.ndarray) and isinstance(scan.signatures, np.ndarray)
                keys.append(_fold_keys(scan.band_keys))
                signatures.append((scan.signatures & 0xFF).astype(np.uint8))
                if is_eval is not None:
                    eval_side.append(np.fromiter((is_eval(str(spec.row_id(r))) for r in batch.accepted), dtype=bool, count=len(batch.accepted)))
            starts = np.zeros(len(batch.accepted), dtype=np.int64)
            for index, (record, origin) in enumerate(zip(batch.accepted, batch.origins, strict=True)):
                payload = raw_of[origin] if record is parsed[origin] else json.dumps(record, ensure_ascii=False).encode("utf-8")
                data = _spill_line(list(origin), payload)
                starts[index] = position
                spill.write(data)
                position += len(data)
            offsets.append(starts)
            del raw_of, parsed
            _spill_quarantine(run, batch.quarantined)
            if run.chunks > 1 or len(chunk) == chunk_rows:
                say(f"intake: {run.total} lines read{where}, {sum(len(o) for o in offsets)} pass the row checks so far")
    ids = IdHashes()  # free the id hashes before the whole-batch checks
    offset = np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)
    n = len(offset)

    # between the passes: near-duplicates and eval leakage over the whole batch
    dropped: dict[int, tuple[str, str | None]] = {}
    if options is not None and similarity_k and n:
        texts = SpilledTexts([(spill_path, lambda line: spec.example(json.loads(_split_spill(line)[1])).input_text)], np.zeros(n, dtype=np.uint8), offset)
        row_ids = SpilledTexts([(spill_path, lambda line: str(spec.row_id(json.loads(_split_spill(line)[1]))))], np.zeros(n, dtype=np.uint8), offset)
        all_keys, all_signatures = np.concatenate(keys), np.concatenate(signatures)
        keys, signatures = [], []
        try:
            dropped, eval_rows = _similar_rows(
                options, texts, row_ids, all_keys, all_signatures, prefix or "",
                eval_mask=np.concatenate(eval_side) if eval_side else None, eval_records=eval_records, spec=spec,
                workdir=workdir, say=say,
            )
        finally:
            texts.close()
            row_ids.close()
        del all_keys, all_signatures
        if run.intake is not None:
            run.intake.eval_rows = eval_rows
            for reason, _ in dropped.values():
                run.intake.quarantined[reason] = run.intake.quarantined.get(reason, 0) + 1

    # pass 2: quarantine what they dropped, the GX suite on the rest, id-sorted runs
    index = 0
    with open(spill_path, "rb") as spill:
        for part, chunk_lines in enumerate(chunked(spill, chunk_rows), 1):
            batch = CheckedBatch(total=len(chunk_lines))
            payload_of: dict[tuple[str, int], bytes] = {}
            for raw in chunk_lines:
                (source, line), payload = _split_spill(raw)
                if index in dropped:
                    reason, matched = dropped[index]
                    batch.quarantined.append(QuarantinedRow(source, line, payload.decode("utf-8"), [reason], matched_id=matched))
                else:
                    batch.accepted.append(json.loads(payload))
                    batch.origins.append((source, line))
                    payload_of[(source, line)] = payload
                index += 1
            if quality is not None and batch.accepted:
                quality.check(batch, where=f" (rows {index - len(chunk_lines) + 1}..{index} of those that passed the intake checks)" if n > chunk_rows else "")
            run.accepted += len(batch.accepted)
            path = workdir / f"accepted.{part:05d}.jsonl"
            rows: list[list[Any]] = sorted(
                ([str(spec.row_id(r)), at, s, line] for at, (r, (s, line)) in enumerate(zip(batch.accepted, batch.origins, strict=True))),
                key=lambda header: str(header[0]),
            )
            with open(path, "wb") as out:
                out.writelines(_spill_line(header, payload_of[(header[2], header[3])]) for header in rows)
            run.accepted_runs.append(path)
            _spill_quarantine(run, batch.quarantined)
    spill_path.unlink()
    if run.accepted + run.quarantined != run.total:
        raise RuntimeError(f"intake lost rows: {run.total} lines but {run.accepted} accepted + {run.quarantined} quarantined")
    return run


def _spill_quarantine(run: IntakeRun, rows: list[QuarantinedRow]) -> None:
    if not rows:
        return
    for row in rows:
        run.reasons.update(row.reasons)
    run.quarantined += len(rows)
    path = run.workdir / f"quarantine.{len(run.quarantine_runs):05d}.jsonl"
    _write_jsonl(path, sorted((row.to_json() for row in rows), key=lambda row: (row["source"], row["line"])))
    run.quarantine_runs.append(path)


def _similar_rows(
    options: IntakeOptions,
    texts: SpilledTexts,
    row_ids: SpilledTexts,
    keys: np.ndarray,
    signatures: np.ndarray,
    prefix: str,
    *,
    eval_mask: np.ndarray | None,
    eval_records: Iterable[dict[str, Any]],
    spec: TaskSpec,
    workdir: Path,
    say: Callable[[str], None],
) -> tuple[dict[int, tuple[str, str | None]], int]:
    """{spill index: (reason, matched id)} for near-duplicates and rows leaking an eval row, and
    the number of eval rows compared."""
    n = len(texts)
    empty = np.zeros(0, dtype=np.int64)
    dropped: dict[int, tuple[str, str | None]] = {}
    k = options.shingle_words
    if options.near_duplicate_jaccard is not None and n > 1:
        say(f"near-duplicates: MinHash/LSH over {n} prompts, Jaccard >= {options.near_duplicate_jaccard}")
        found = find_near_duplicates(texts, options.near_duplicate_jaccard, k, scan=TextScan(empty, empty, {}, keys, signatures), prefix=prefix)
        for later, earlier in found.items():
            dropped[later] = ("near_duplicate", row_ids[earlier])
    # the eval side: stored eval rows (spilled with their MinHash), then this batch's eval-side survivors
    stored_path = workdir / "eval.spill.jsonl"
    stored_offsets: list[int] = []
    stored_keys: list[np.ndarray] = []
    stored_signatures: list[np.ndarray] = []
    block: list[str] = []
    block_ids: list[str] = []

    def flush_block(out: Any) -> None:
        if not block:
            return
        scan = scan_texts(block, shingle_words=k, strip_prefix=prefix)
        assert isinstance(scan.band_keys, np.ndarray) and isinstance(scan.signatures, np.ndarray)
        stored_keys.append(_fold_keys(scan.band_keys))
        stored_signatures.append((scan.signatures & 0xFF).astype(np.uint8))
        for row_id, text in zip(block_ids, block, strict=True):
            stored_offsets.append(out.tell())
            out.write(_spill_line([row_id], json.dumps(text, ensure_ascii=False).encode("utf-8")))
        block.clear()
        block_ids.clear()

    with open(stored_path, "wb") as out:
        for record in eval_records:
            text = spec.input_text(record) if isinstance(record, dict) else None
            if text is not None:
                block.append(text)
                block_ids.append(str(spec.row_id(record)))
                if len(block) >= DEFAULT_CHUNK_ROWS:
                    flush_block(out)
        flush_block(out)
    alive = np.ones(n, dtype=bool)
    alive[np.fromiter(dropped, dtype=np.int64, count=len(dropped))] = False
    on_eval_side = alive & eval_mask if eval_mask is not None else np.zeros(n, dtype=bool)
    batch_eval, train = np.flatnonzero(on_eval_side), np.flatnonzero(alive & ~on_eval_side)
    n_stored = len(stored_offsets)
    if options.eval_leakage_jaccard is not None and (n_stored or len(batch_eval)) and len(train):
        say(f"eval leakage: {len(train)} training prompts against {n_stored + len(batch_eval)} eval prompts")
        sources = [(stored_path, lambda line: json.loads(_split_spill(line)[1])), texts.sources[0]]
        eval_texts = SpilledTexts(
            sources,
            np.concatenate((np.zeros(n_stored, dtype=np.uint8), np.ones(len(batch_eval), dtype=np.uint8))),
            np.concatenate((np.asarray(stored_offsets, dtype=np.int64), texts.offsets[batch_eval])),
        )
        train_texts = SpilledTexts(texts.sources, np.zeros(len(train), dtype=np.uint8), texts.offsets[train])
        # the keys and signatures are read through row indices (RowBlocks), never copied
        eval_keys = RowBlocks([*((block, None) for block in stored_keys), (keys, batch_eval)])
        eval_signatures = RowBlocks([*((block, None) for block in stored_signatures), (signatures, batch_eval)])
        try:
            leaks = find_leaks(
                train_texts, eval_texts, options.eval_leakage_jaccard, k,
                train_scan=TextScan(empty, empty, {}, RowBlocks([(keys, train)]), RowBlocks([(signatures, train)])),
                eval_scan=TextScan(empty, empty, {}, eval_keys, eval_signatures),
                prefix=prefix,
            )
            stored_ids = SpilledTexts(
                [(stored_path, lambda line: _split_spill(line)[0][0])], np.zeros(n_stored, dtype=np.uint8), np.asarray(stored_offsets, dtype=np.int64)
            )
            for train_index, eval_index in leaks.items():
                matched = stored_ids[eval_index] if eval_index < n_stored else row_ids[int(batch_eval[eval_index - n_stored])]
                dropped[int(train[train_index])] = ("eval_leakage", matched)
            stored_ids.close()
        finally:
            eval_texts.close()
            train_texts.close()
    os.unlink(stored_path)
    return dropped, n_stored + len(batch_eval)
