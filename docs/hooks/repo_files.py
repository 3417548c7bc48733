"""MkDocs hook: links from the docs to repository files outside docs/ (``../examples/...``).

The pages link to the repository's own files the way GitHub renders them (a path relative to
the page). MkDocs only knows the files under docs/, so in strict mode it would reject every such
link. This hook checks each one instead: the file must exist in the repository (else a warning,
which ``mkdocs build --strict`` turns into a failure), it is copied into the site under
``repo/<path>``, and the link is rewritten to that copy, so the built site has no broken links.
A link to a directory is refused: link a file in it (its README.md, say).
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.hooks.repo_files")
# [text](target) and [text](target "title"); skips images' absolute URLs and anchors
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?(?P<title>\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
SITE_DIR = "repo"


def _outside_docs(page_src: str, target: str, docs_dir: Path, root: Path) -> Path | None:
    """The repository file a relative link leads to, when it leaves docs/; else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return None
    resolved = (docs_dir / posixpath.dirname(page_src) / target).resolve()
    try:
        resolved.relative_to(docs_dir)
        return None
    except ValueError:
        pass
    try:
        resolved.relative_to(root)
    except ValueError:
        return None
    return resolved


def _links(markdown: str) -> list[re.Match[str]]:
    found, in_fence = [], False
    for line_start, line in _lines(markdown):
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            found.extend(m for m in LINK.finditer(markdown, line_start, line_start + len(line)))
    return found


def _lines(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, line))
        pos += len(line)
    return out


def on_files(files: Files, config: Any) -> Files:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    wanted: dict[str, Path] = {}
    for file in files.documentation_pages():
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        for match in _links(text):
            target = _outside_docs(file.src_uri, match["target"], docs_dir, root)
            if target is not None and target.is_file():
                wanted[target.relative_to(root).as_posix()] = target
    for rel, path in sorted(wanted.items()):
        files.append(File.generated(config, f"{SITE_DIR}/{rel}", abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    out, last = [], 0
    for match in _links(markdown):
        target = _outside_docs(page.file.src_uri, match["target"], docs_dir, root)
        if target is None:
            continue
        rel = target.relative_to(root).as_posix()
        if not target.exists():
            log.warning("%s links to '%s', which is not in the repository", page.file.src_uri, match["target"])
            continue
        if target.is_dir():
            log.warning("%s links to the directory '%s': link a file in it", page.file.src_uri, match["target"])
            continue
        new = posixpath.relpath(f"{SITE_DIR}/{rel}", posixpath.dirname(page.file.src_uri) or ".")
        out.append(markdown[last : match.start("target")] + new)
        last = match.end("target")
    out.append(markdown[last:])
    return "".join(out)
