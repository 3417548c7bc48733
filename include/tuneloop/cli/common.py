"""What every subcommand shares: errors, output, settings, the store, the ML environment."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.config import Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from tuneloop.storage import Store

log = logging.getLogger("tuneloop")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(human)


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    def report(message: str) -> None:
        if not args.quiet:
            print(f"[tuneloop] {message}", file=sys.stderr, flush=True)

    return report


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "job", None):
        from tuneloop.config import settings_from_job

        return settings_from_job(args.job)  # exactly what the parent resolved: no config or env re-read
    return load_settings(args.config)


def _store(settings: Settings) -> Store:
    from tuneloop.storage import open_store_from_settings

    return open_store_from_settings(settings)


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from err


ML_COMMANDS = frozenset({"build-model", "train", "evaluate"})


def _reexec_in_ml_env(argv: Sequence[str], command: str, *, backend: str | None = None) -> None:
    """Run an ML subcommand in .venv-ml when this interpreter lacks torch (e.g. .venv/bin/tuneloop).

    ``evaluate`` through vLLM needs no torch (it only talks to the OpenAI-compatible API), so it
    stays here with ``backend`` ``vllm``, and with ``auto`` when there is no ML env to go to
    (then only vLLM can answer)."""
    from tuneloop.ml.backends import has_torch

    if has_torch():
        return
    from tuneloop.ml.runner import find_ml_python

    python = find_ml_python()
    if command == "evaluate" and (backend == "vllm" or (backend == "auto" and python is None)):
        return
    # venvs' pythons are symlinks to one interpreter: compare the paths, never what they resolve to
    if python is not None and Path(os.path.abspath(python)) == Path(os.path.abspath(sys.executable)):
        raise CliError(
            f"`{command}` needs torch, transformers and peft, and TUNELOOP_ML_PYTHON names this very Python "
            f"({sys.executable}), which lacks them: point it at the ML env (`make setup` builds .venv-ml)"
        )
    if python is None:
        raise CliError(
            f"`{command}` needs torch, transformers and peft, which this Python ({sys.executable}) lacks: "
            "run `make setup` to build .venv-ml (in a checkout), or `pip install 'tuneloop[ml]'` into another venv and "
            "point TUNELOOP_ML_PYTHON at its python"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), "-m", "tuneloop.cli", *argv])


def _adapter_dir(settings: Settings, version: str) -> Path:
    try:
        return Path(settings.work_dir) / "adapters" / layout.version_name(version)
    except ValueError as err:
        raise CliError(f"{err}: name an adapter version or an adapter directory that exists") from None


def _find_adapter(settings: Settings, store: Store, adapter: str) -> Path:
    """A local adapter directory for ``adapter``: a path, or a version fetched from the store."""
    adapter_dir = Path(adapter)
    if adapter_dir.is_dir():
        return adapter_dir
    adapter_dir = _adapter_dir(settings, adapter)
    if not adapter_dir.is_dir():
        try:
            store.get_dir(layout.adapter(adapter), adapter_dir)
        except KeyError:
            pass
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CliError(
            f"adapter {adapter!r} not found locally or in {store.uri}/adapters/; "
            f"train it with `tuneloop train --version {adapter}`"
        )
    return adapter_dir


def _load_jsonl_path(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise CliError(f"{path}:{number} is not JSON ({err.msg}); validate the file with `tuneloop pull`") from err
    return records


def _write_result_file(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, default=str) + "\n", encoding="utf-8")


def _as_dict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(obj).items()}
    return dict(obj)
