"""Text pools for the drift benchmarks: real text nobody on this project wrote, plus the demo world.

Everything is built offline from files already on the machine, deterministically:

* ``docstrings`` (domain A, reference-manual prose): every docstring paragraph of the CPython
  standard library (``sysconfig`` stdlib directory; ``test``, ``idlelib``, ``lib2to3`` and
  ``site-packages`` left out) and of every package in the repository's ``.venv`` (numpy,
  scipy, scikit-learn, pandas, SQLAlchemy, networkx, sympy, matplotlib, Airflow...; folders
  named ``test``/``tests`` left out), read with ``ast`` (nothing is imported), plus the
  paragraphs of the Python language reference that ships as ``pydoc_data.topics``.
* ``readmes`` (domain B, package README prose): the long descriptions (the README, often
  with a changelog) in the ``METADATA`` file of every distribution in ``.venv``.
* ``invoices-original`` / ``invoices-drifted``: the demo world's invoice prompts
  (``tuneloop.demo.invoices.make_document`` + ``make_prompt``) from each domain, row ``i`` drawn from
  ``random.Random("tuneloop-bench-drift|DOMAIN|i")``, a stream the world's days never use.

``.venv`` is built from ``requirements/airflow.lock``, so the real-text pools are the same on
every machine with that lock and the same CPython 3.11 patch release; ``--show`` prints a
fingerprint (sha256 of the sorted pool) per pool to check that. Nothing is downloaded.

Normalisation, the same for both real-text pools: split on blank lines; drop code (doctest
``>>>``, fenced or ``::`` literal blocks, shell prompts), tables, rST directives, heading
underlines and the headings above them; unwrap Markdown links/images, rST roles and
inline literals, HTML tags and URLs; collapse whitespace; keep paragraphs of 80-1000
characters, at least 10 words, mostly letters and few brackets or ``=`` (unmarked code). Exact duplicates are removed within a
pool, and a text found in both real-text pools (a README that repeats a module docstring)
is removed from both, so "the other domain" never contains a reference text. Pools are
sorted, so the order in which the file system lists files does not matter.

Building the real-text pools parses ~13k source files (about 70 s on 2 cores); the
result is cached in ``.tuneloop/bench/`` under a key made of this module's version, the
Python version and the list of distributions in ``.venv``.

    .venv/bin/python bench/drift_corpus.py            # pool sizes, fingerprints, samples
    .venv/bin/python bench/drift_corpus.py --rebuild --show 5
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import random
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))

#: Bump when the extraction or normalisation changes: it invalidates the cache.
CORPUS_VERSION = 2
CACHE_DIR = REPO / ".tuneloop" / "bench"
MIN_CHARS, MAX_CHARS, MIN_WORDS = 80, 1000, 10
#: Stdlib top-level folders whose text is tests, an IDE or a dead tool, not the library's docs.
STDLIB_SKIP = frozenset({"site-packages", "test", "idlelib", "lib2to3", "__pycache__"})
SKIP_DIRS = frozenset({"test", "tests", "__pycache__"})
INVOICE_POOL_SIZE = {"original": 20_000, "drifted": 10_000}


@dataclass(frozen=True)
class Corpus:
    """A reference pool and the pool the drift comes from."""

    name: str
    reference: str
    other: str
    about: str


CORPORA: dict[str, Corpus] = {
    "real-text": Corpus(
        "real-text", "docstrings", "readmes", "docstring prose -> package README prose"
    ),
    "demo-world": Corpus(
        "demo-world",
        "invoices-original",
        "invoices-drifted",
        "US/UK invoices -> DE/FR/NL/ES invoices",
    ),
}
REAL_TEXT_POOLS = ("docstrings", "readmes")
POOL_NAMES = (*REAL_TEXT_POOLS, "invoices-original", "invoices-drifted")

# --- normalisation --------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~).*?^\s*(```|~~~)[^\n]*$", re.M | re.S)
_UNDERLINE = re.compile(r"^\s*([-=~^*#+`'\".:_])\1{2,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(\||\+[-=+]{2,}|={2,}\s+={2,})")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.\s|\$ |In \[\d+\]:|Out\[\d+\]:)")
_DIRECTIVE = re.compile(r"^\s*\.\.\s")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)|\[([^\]]+)\]\[[^\]]*\]")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
_RST_ROLE = re.compile(r":[\w:+-]+:`~?([^`]+)`")
_LITERAL = re.compile(r"`{1,2}([^`]+)`{1,2}_{0,2}")
_HTML_TAG = re.compile(r"<[^>\n]{1,200}>")
_URL = re.compile(r"(https?|ftp)://\S+|www\.\S+")
_BULLET = re.compile(r"^\s*([-*+•]|\d+[.)]|#+)\s+")
_EMPHASIS = re.compile(r"\*\*|__")
_CODE_HINT = re.compile(r"\bdef \w+\(|\bassert \S|\bawait \w|(^|\s)import \w|==")
_CODE_CHARS = frozenset("(){}[]=;<>")


def paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of a docstring or README, normalised (see the module docstring)."""
    text = _FENCE.sub("\n\n", text.replace("\r\n", "\n").replace("\t", "    "))
    literal_block_follows = False
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        indented = all(line.startswith("    ") or not line.strip() for line in lines)
        if literal_block_follows and indented:
            continue  # the indented body of a "::" literal block: code
        literal_block_follows = block.rstrip().endswith("::")
        kept = _prose_lines(lines)
        if kept is None:
            continue
        normalised = normalise(" ".join(kept))
        if normalised is not None:
            yield normalised


def _prose_lines(lines: list[str]) -> list[str] | None:
    """The lines of one block worth keeping, or None when the block is code or a table."""
    kept: list[str] = []
    for line in lines:
        if _CODE_LINE.match(line) or _TABLE_LINE.match(line):
            return None
        if _DIRECTIVE.match(line):
            continue
        if _UNDERLINE.match(line):
            if kept:
                kept.pop()  # the heading this line underlines
            continue
        kept.append(_BULLET.sub("", line))
    return kept


def normalise(text: str) -> str | None:
    """Strip light markup and collapse whitespace; None if what is left is not prose."""
    text = _MD_IMAGE.sub(" ", text)
    text = _MD_LINK.sub(lambda m: m.group(1) or m.group(2), text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_ROLE.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _HTML_TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _EMPHASIS.sub("", text)
    text = " ".join(text.split())
    if not MIN_CHARS <= len(text) <= MAX_CHARS or len(text.split()) < MIN_WORDS:
        return None
    visible = text.replace(" ", "")
    if sum(ch.isalpha() for ch in visible) < 0.7 * len(visible):
        return None  # formulas, numbers, leftovers of code
    if _CODE_HINT.search(text) or sum(ch in _CODE_CHARS for ch in text) > 0.05 * len(text):
        return None  # code that was not marked up as code (indented Markdown blocks)
    return text


# --- sources --------------------------------------------------------------------------------


def default_site_packages() -> Path:
    """The site-packages of the repository's ``.venv`` (built from requirements/airflow.lock)."""
    found = sorted((REPO / ".venv" / "lib").glob("python3.*/site-packages"))
    if not found:
        raise SystemExit(f"no {REPO / '.venv'}/lib/python3.*/site-packages: run `make setup` first")
    return found[-1]


def _python_files(root: Path, skip_top: frozenset[str]) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] in skip_top or SKIP_DIRS.intersection(parts[:-1]):
            continue
        files.append(path)
    return sorted(files)


def _docstrings_of(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (
        ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, nodes)
    )
    return [doc for doc in found if doc]


def docstring_texts(
    stdlib: Path, site_packages: Path | None, progress: Callable[[str], None] = print
) -> Iterator[str]:
    """Docstring paragraphs of the stdlib and of ``site_packages``, then the language reference."""
    roots = [(stdlib, STDLIB_SKIP)]
    if site_packages is not None:
        roots.append((site_packages, frozenset({"__pycache__"})))
    for root, skip in roots:
        files = _python_files(root, skip)
        progress(f"  parsing {len(files)} files under {root}")
        for index, path in enumerate(files, 1):
            for doc in _docstrings_of(path):
                yield from paragraphs(doc)
            if index % 5000 == 0:
                progress(f"    {index}/{len(files)} files")
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield from paragraphs(topics[key])


def readme_texts(site_packages: Path) -> Iterator[str]:
    """Paragraphs of every distribution's long description (its README) in ``site_packages``."""
    from email import policy
    from email.parser import BytesParser

    for metadata in sorted(site_packages.glob("*.dist-info/METADATA")):
        message = BytesParser(policy=policy.compat32).parsebytes(metadata.read_bytes())
        body = message.get_payload()
        if not isinstance(body, str) or not body.strip():
            body = str(message.get("Description") or "")
        yield from paragraphs(body)


def invoice_texts(domain: str, count: int) -> list[str]:
    """``count`` demo-world invoice prompts of ``domain``, row i from its own seeded stream."""
    from tuneloop.demo.invoice_documents import make_document
    from tuneloop.demo.invoice_task import make_prompt

    return [
        make_prompt(make_document(random.Random(f"tuneloop-bench-drift|{domain}|{i}"), domain)[0])
        for i in range(count)
    ]


# --- pools ----------------------------------------------------------------------------------


def dedupe(texts: Iterable[str]) -> list[str]:
    """Distinct texts, sorted (so the pool does not depend on file listing order)."""
    return sorted(set(texts))


def fingerprint(texts: list[str]) -> str:
    """sha256 of the pool, to compare pools across machines."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def build_real_text_pools(
    stdlib: Path, site_packages: Path | None, progress: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Domain A (docstrings) and B (READMEs), deduplicated within and across the two."""
    docs = set(docstring_texts(stdlib, site_packages, progress))
    readmes = set(readme_texts(site_packages)) if site_packages is not None else set()
    shared = docs & readmes
    progress(f"  {len(shared)} texts in both pools removed from both")
    return {"docstrings": dedupe(docs - shared), "readmes": dedupe(readmes - shared)}


def _cache_key(stdlib: Path, site_packages: Path) -> str:
    dists = sorted(p.name for p in site_packages.glob("*.dist-info"))
    basis = json.dumps([CORPUS_VERSION, sys.version, str(stdlib), dists])
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def load_real_text_pools(
    site_packages: Path | None = None,
    *,
    rebuild: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """The real-text pools, from the cache when its key matches, else built (and cached)."""
    site_packages = site_packages or default_site_packages()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cache = CACHE_DIR / f"drift-corpus-{_cache_key(stdlib, site_packages)}.json.gz"
    if cache.is_file() and not rebuild:
        progress(f"real-text pools from cache {cache.relative_to(REPO)}")
        with gzip.open(cache, "rt", encoding="utf-8") as handle:
            pools: dict[str, list[str]] = json.load(handle)
        return pools
    started = time.perf_counter()
    progress(f"building real-text pools (stdlib {stdlib}, {site_packages})")
    pools = build_real_text_pools(stdlib, site_packages, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp")
    with gzip.open(partial, "wt", encoding="utf-8") as handle:
        json.dump(pools, handle)
    partial.replace(cache)
    for stale in CACHE_DIR.glob("drift-corpus-*.json.gz"):
        if stale != cache:
            stale.unlink()
    progress(f"built in {time.perf_counter() - started:.0f} s; cached in {cache.relative_to(REPO)}")
    return pools


def load_pools(
    names: Iterable[str] = POOL_NAMES,
    *,
    invoice_pool_size: dict[str, int] | None = None,
    rebuild: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """The named pools (see POOL_NAMES), each a sorted list of distinct texts."""
    names = list(names)
    unknown = set(names) - set(POOL_NAMES)
    if unknown:
        raise ValueError(f"unknown pools {sorted(unknown)}; expected some of {POOL_NAMES}")
    sizes = {**INVOICE_POOL_SIZE, **(invoice_pool_size or {})}
    pools: dict[str, list[str]] = {}
    if set(names) & set(REAL_TEXT_POOLS):
        pools.update(load_real_text_pools(rebuild=rebuild, progress=progress))
    for name in names:
        if name.startswith("invoices-"):
            domain = name.removeprefix("invoices-")
            pools[name] = dedupe(invoice_texts(domain, sizes[domain]))
    return {name: pools[name] for name in names}


@dataclass(frozen=True)
class WindowPair:
    """Row indices into named pools: what the reference and the current window hold."""

    reference: tuple[tuple[str, NDArray[np.int64]], ...]
    current: tuple[tuple[str, NDArray[np.int64]], ...]

    def texts(self, pools: dict[str, list[str]]) -> tuple[list[str], list[str]]:
        """The two windows' texts (reference parts first, then the drifted part)."""
        return (
            [pools[name][i] for name, rows in self.reference for i in rows],
            [pools[name][i] for name, rows in self.current for i in rows],
        )


def draw_pair(
    pools: dict[str, list[str]],
    corpus: Corpus,
    n: int,
    fraction: float,
    rng: np.random.Generator,
) -> WindowPair:
    """Two windows of ``n`` texts; ``fraction`` of the current one from ``corpus.other``.

    Reference texts and the current window's reference-pool texts are drawn together without
    replacement, so no text is in both windows: with ``fraction == 0`` H0 holds exactly
    (both windows are a random split of a random sample of one pool).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    injected = round(fraction * n)
    same, other = len(pools[corpus.reference]), len(pools[corpus.other])
    if 2 * n - injected > same or injected > other:
        raise ValueError(
            f"{corpus.name}: windows of {n} with {injected} drifted texts need "
            f"{2 * n - injected} texts of {corpus.reference} (has {same}) and {injected} of "
            f"{corpus.other} (has {other})"
        )
    rows = rng.choice(same, size=2 * n - injected, replace=False)
    current: list[tuple[str, NDArray[np.int64]]] = [(corpus.reference, rows[n:])]
    if injected:
        current.append((corpus.other, rng.choice(other, size=injected, replace=False)))
    return WindowPair(reference=((corpus.reference, rows[:n]),), current=tuple(current))


def describe(pools: dict[str, list[str]]) -> list[str]:
    """One line per pool: size, mean length, fingerprint."""
    return [
        f"{name:<18} {len(texts):>7} texts, mean {sum(map(len, texts)) / max(len(texts), 1):5.0f} "
        f"chars, fingerprint {fingerprint(texts)}"
        for name, texts in pools.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache")
    parser.add_argument("--show", type=int, default=2, help="random samples printed per pool")
    parser.add_argument("--seed", type=int, default=0, help="which samples --show prints")
    args = parser.parse_args()

    pools = load_pools(rebuild=args.rebuild)
    print("\npools:")
    for line in describe(pools):
        print("  " + line)
    rng = random.Random(args.seed)
    for name, texts in pools.items():
        for text in rng.sample(texts, min(args.show, len(texts))):
            print(f"\n[{name}] {text[:400]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
