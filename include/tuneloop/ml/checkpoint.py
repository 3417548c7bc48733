"""Resumable, distributed training state: the checkpoint beside the adapter being written (a
re-run with the same inputs resumes from it after a crash or a pre-empted node; one from other
settings is ignored with a warning), and the torchrun process group (gloo or NCCL) with the
gradient all-reduce."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from tuneloop.config import TrainingSettings


logger = logging.getLogger(__name__)

def distributed_world() -> tuple[int, int]:
    """(rank, world size) of a torchrun/accelerate launch, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> bool:
    """Join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1).

    Each process trains on its own share of every optimizer step's micro-batches; the LoRA
    gradients are summed across processes before the step, so N processes with ``grad_accum``
    A take the same steps as one process with ``grad_accum`` N x A. NCCL on GPUs, gloo on CPU.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return True


class Checkpointer:
    """Training state (LoRA weights, optimizer, step, RNG, early-stopping state) in one file.

    Written every ``every`` steps with write-then-rename, so a killed run leaves the previous
    checkpoint whole. A run finds a checkpoint with its own fingerprint (same data, settings,
    base model and start adapter) and continues from it; any other is ignored and replaced.
    """

    def __init__(self, path: Path | None, fingerprint: str, every: int, *, writer: bool = True) -> None:
        self.path = path if every > 0 else None
        self.fingerprint = fingerprint
        self.every = every
        self.writer = writer

    def load(self) -> dict[str, Any] | None:
        import torch

        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file: start over, say why
            logger.warning("ignoring unreadable checkpoint %s (%s); training from the start", self.path, err)
            return None
        if state.get("fingerprint") != self.fingerprint:
            logger.warning(
                "ignoring checkpoint %s: it belongs to another run (different data, settings, base model or "
                "start adapter); training from the start", self.path,
            )
            return None
        return state

    def due(self, step: int, total: int) -> bool:
        return self.path is not None and self.writer and step % self.every == 0 and step < total

    def save(self, state: dict[str, Any]) -> None:
        import torch

        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        torch.save({"fingerprint": self.fingerprint, **state}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None and self.writer:
            self.path.unlink(missing_ok=True)


def _all_reduce_gradients(parameters: Sequence[Any]) -> None:
    """Sum the LoRA gradients over processes (each loss is already divided by the global
    target count, so the sum is the gradient of the whole step)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    at = 0
    for g in grads:
        g.copy_(flat[at : at + g.numel()].view_as(g))
        at += g.numel()


def _all_reduce_sum(loss: float, tokens: int, device: str) -> tuple[float, int]:
    import torch
    import torch.distributed as dist

    values = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return float(values[0]), int(values[1])


def _fingerprint(dataset_hash: str, settings: TrainingSettings, base_model: Any, init_adapter: Any, world: int) -> str:
    config = settings.model_dump(mode="json", exclude={"log_every", "checkpoint_every"})
    text = json.dumps([dataset_hash, config, str(base_model), str(init_adapter), world], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its resumable state (beside it, same volume)."""
    return out_dir.parent / f".{out_dir.name}.checkpoint.pt"
