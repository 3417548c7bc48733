"""Resumable training: the Trainer's checkpoints beside the adapter being written.

A run keeps its Hugging Face Trainer checkpoints (LoRA weights, optimizer, scheduler, RNG
states, data position, early-stopping state) in ``.<adapter>.checkpoints/`` next to the output,
with a fingerprint of its inputs. Running the same command again after a crash or a pre-empted
node resumes from the newest complete checkpoint; checkpoints of other data, settings, base
model, start adapter or process count are removed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from tuneloop.config import TrainingSettings


logger = logging.getLogger(__name__)

FINGERPRINT = "tuneloop-fingerprint.txt"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its resumable state (beside it, same volume)."""
    return out_dir.parent / f".{out_dir.name}.checkpoints"


def fingerprint(dataset_hash: str, settings: TrainingSettings, base_model: Any, init_adapter: Any, world: int) -> str:
    """What must be equal for a checkpoint to be resumed (not how often it logs or saves)."""
    config = settings.model_dump(mode="json", exclude={"log_every", "checkpoint_every", "report_to"})
    text = json.dumps([dataset_hash, config, str(base_model), str(init_adapter), world], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(directory: Path, expected: str, *, writer: bool) -> str | None:
    """The checkpoint to resume from in ``directory`` (None: start from the beginning).

    A directory of another run is removed (by the writing process) with a warning. Only
    checkpoints whose ``trainer_state.json`` exists count: the Trainer writes it last, so a
    checkpoint torn by a kill mid-save is skipped for the one before it.
    """
    if directory.exists():
        found = (directory / FINGERPRINT).read_text(encoding="utf-8").strip() if (directory / FINGERPRINT).is_file() else None
        if found != expected:
            logger.warning(
                "ignoring checkpoints in %s: they belong to another run (different data, settings, base model, "
                "start adapter or process count); training from the start", directory,
            )
            if writer:
                shutil.rmtree(directory, ignore_errors=True)
            return None
        complete = [
            (int(match.group(1)), path) for path in directory.iterdir()
            if (match := _STEP.match(path.name)) and (path / "trainer_state.json").is_file()
        ]
        if complete:
            return str(max(complete)[1])
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FINGERPRINT).write_text(expected + "\n", encoding="utf-8")
    return None


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
