"""The drift benchmarks' corpus builder: prose in, markup and code out, pools deterministic.

Runs on small files made here; the full pools (the whole .venv) take a minute and are the
benchmarks' business.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import drift_corpus  # noqa: E402

pytestmark = pytest.mark.unit

PROSE = (
    "The scheduler reads every file in the folder once a minute and keeps what it finds in "
    "memory, so a change shows up without a restart."
)
README = f"""\
Example package
===============

![build badge](https://img.shields.io/badge/build-passing-green)

See the [user guide](https://example.org/guide) for details: this paragraph explains how the
package is installed and configured, and why it exists in the first place.

```python
import example
example.run(path="/tmp/x")
```

>>> example.run()
'ok'

| column | other |
| ------ | ----- |
| a      | b     |

Too short to keep.

{PROSE}
"""
DOCSTRING = f'''\
"""Module docstring with a paragraph long enough to be kept as prose by the corpus builder here.

Parameters
----------
path : str
    Where to look. Uses :func:`os.path.join` and ``pathlib`` under the hood, as the docs say.
"""


def f():
    """{PROSE}"""
'''


def write_fake_site(root: Path) -> tuple[Path, Path]:
    """A stdlib-like folder with one module and a site-packages with two distributions."""
    stdlib, site = root / "stdlib", root / "site"
    (stdlib / "test").mkdir(parents=True)
    (stdlib / "mod.py").write_text(DOCSTRING)
    (stdlib / "test" / "test_mod.py").write_text('"""' + "A test module paragraph. " * 10 + '"""\n')
    (stdlib / "broken.py").write_text("def (:\n")
    for name, body in (("pkg_a-1.0", README), ("pkg_b-2.0", "")):
        dist = site / f"{name}.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nDescription-Content-Type: text/markdown\n\n{body}"
        )
    return stdlib, site


def test_paragraphs_keep_prose_and_drop_markup_and_code() -> None:
    kept = list(drift_corpus.paragraphs(README))
    assert kept == [
        "See the user guide for details: this paragraph explains how the package is installed "
        "and configured, and why it exists in the first place.",
        PROSE,
    ]
    doc = (
        "Uses :func:`os.path.join` and ``pathlib`` under the hood, as described in the "
        "`docs <https://x.org>`_ and <b>elsewhere</b> in the manual."
    )
    assert list(drift_corpus.paragraphs(doc)) == [
        "Uses os.path.join and pathlib under the hood, as described in the docs and "
        "elsewhere in the manual."
    ]
    heading = "Returns\n-------\nThe value the scheduler computed for the next run, in seconds since the Unix epoch."
    assert list(drift_corpus.paragraphs(heading)) == [
        "The value the scheduler computed for the next run, in seconds since the Unix epoch."
    ]
    assert list(drift_corpus.paragraphs("x = compute(a, b) == [1, 2] and {k: v} " * 4)) == []


def test_real_text_pools_are_deterministic_deduplicated_and_disjoint(tmp_path: Path) -> None:
    stdlib, site = write_fake_site(tmp_path)
    messages: list[str] = []
    pools = drift_corpus.build_real_text_pools(stdlib, site, progress=messages.append)
    again = drift_corpus.build_real_text_pools(stdlib, site, progress=lambda _: None)
    assert pools == again
    docs, readmes = pools["docstrings"], pools["readmes"]
    # PROSE is in both a docstring and a README: removed from both pools
    assert PROSE not in docs and PROSE not in readmes
    assert any("1 texts in both pools" in m for m in messages)
    assert readmes == [
        "See the user guide for details: this paragraph explains how the package is installed "
        "and configured, and why it exists in the first place."
    ]
    assert (
        "Module docstring with a paragraph long enough to be kept as prose by the corpus builder here."
        in docs
    )
    assert not any("test module paragraph" in text for text in docs)  # test folders skipped
    # the language reference (pydoc_data.topics) joins the docstring pool
    assert len(docs) > 500
    for pool in (docs, readmes):
        assert pool == sorted(set(pool))
        assert all(drift_corpus.MIN_CHARS <= len(t) <= drift_corpus.MAX_CHARS for t in pool)
    assert drift_corpus.fingerprint(docs) == drift_corpus.fingerprint(list(again["docstrings"]))


def test_invoice_pools_are_seeded_and_differ_by_domain() -> None:
    pools = drift_corpus.load_pools(
        ["invoices-original", "invoices-drifted"],
        invoice_pool_size={"original": 60, "drifted": 60},
        progress=lambda _: None,
    )
    assert pools == drift_corpus.load_pools(
        ["invoices-original", "invoices-drifted"],
        invoice_pool_size={"original": 60, "drifted": 60},
        progress=lambda _: None,
    )
    original, drifted = pools["invoices-original"], pools["invoices-drifted"]
    assert len(original) == len(drifted) == 60 and not set(original) & set(drifted)
    assert sum("€" in t or "EUR" in t for t in drifted) > 50
    assert not any("€" in t for t in original)


def test_draw_pair_makes_disjoint_windows_with_the_drifted_share() -> None:
    pools = {"a": [f"a{i}" for i in range(100)], "b": [f"b{i}" for i in range(20)]}
    corpus = drift_corpus.Corpus("toy", "a", "b", "")
    pair = drift_corpus.draw_pair(pools, corpus, 40, 0.25, np.random.default_rng(0))
    reference, current = pair.texts(pools)
    assert len(reference) == len(current) == 40
    assert not set(reference) & set(current)
    assert sum(t.startswith("b") for t in current) == 10 and all(
        t.startswith("a") for t in reference
    )
    null = drift_corpus.draw_pair(pools, corpus, 50, 0.0, np.random.default_rng(1))
    assert sorted(null.texts(pools)[0] + null.texts(pools)[1]) == sorted(pools["a"])
    with pytest.raises(ValueError, match="need 102 texts of a"):
        drift_corpus.draw_pair(pools, corpus, 51, 0.0, np.random.default_rng(0))
