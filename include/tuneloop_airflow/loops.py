"""Many loops on one Airflow: a folder of loop configs, one per adapter (``$TUNELOOP_LOOPS_DIR``),
each becoming its own four DAGs (``tuneloop_<id>_refresh``...) with its own assets
(``tuneloop://<id>/...``), store (so its own registry) and served name.

A task learns which loop it belongs to from :data:`CURRENT`, set around its body by
:func:`bound` (the DAG factory wraps every task callable): :func:`tuneloop_airflow.task_loop`
then opens that loop's config file instead of ``$TUNELOOP_CONFIG`` / the Variable, and its
vLLM connection ``tuneloop_vllm_<id>`` when it exists.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

LOOPS_DIR_ENV = "TUNELOOP_LOOPS_DIR"
LOOP_ID = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}\Z")


@dataclass(frozen=True)
class LoopRef:
    """One loop of the Airflow deployment: ``id`` None is the single loop of the plain DAG files
    (config from ``$TUNELOOP_CONFIG`` or the ``tuneloop_config`` Variable)."""

    id: str | None = None
    config: str | None = None

    def dag_id(self, stage: str) -> str:
        return f"tuneloop_{stage}" if self.id is None else f"tuneloop_{self.id}_{stage}"

    @property
    def vllm_connection(self) -> str:
        return "tuneloop_vllm" if self.id is None else f"tuneloop_vllm_{self.id}"


SINGLE = LoopRef()
CURRENT: contextvars.ContextVar[LoopRef] = contextvars.ContextVar("tuneloop_loop", default=SINGLE)


def bound(fn: Callable[..., Any], ref: LoopRef) -> Callable[..., Any]:
    """``fn`` running with :data:`CURRENT` = ``ref`` (same name and signature, which Airflow's
    ``@task`` reads for the task id and the context arguments it passes)."""
    if ref == SINGLE:
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = CURRENT.set(ref)
        try:
            return fn(*args, **kwargs)
        finally:
            CURRENT.reset(token)

    return run


def loops_in(directory: str | os.PathLike[str]) -> list[LoopRef]:
    """The loops of a folder: one ``<id>.yaml`` each (id: lower-case letters, digits, ``_``).
    Each must load, and no two may share a store (each keeps its registry there) or a served
    name (each swaps only its own on a shared fleet); any problem is one error naming the files."""
    from tuneloop.config import load_settings

    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"${LOOPS_DIR_ENV}={directory}: not a directory")
    refs: list[LoopRef] = []
    stores: dict[str, Path] = {}
    served: dict[str, Path] = {}
    for path in sorted(folder.glob("*.yaml")):
        if not LOOP_ID.match(path.stem):
            raise ValueError(f"{path}: a loop's file name is its id: lower-case letters, digits and '_', 40 at most")
        settings = load_settings(str(path), env={k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP__")})
        for seen, value, what in ((stores, settings.store.uri, "store.uri"), (served, settings.model.served_model_name, "model.served_model_name")):
            if value in seen:
                raise ValueError(f"{path} and {seen[value]} share {what} {value!r}: every loop needs its own")
            seen[value] = path
        refs.append(LoopRef(path.stem, str(path.resolve())))
    return refs


def current_assets() -> dict[str, tuple[str, str]]:
    """The assets of the running task's loop (see :func:`tuneloop.assets.for_loop`)."""
    from tuneloop import assets

    return assets.for_loop(CURRENT.get().id)
