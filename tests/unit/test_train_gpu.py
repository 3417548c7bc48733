"""LoRA training on a CUDA GPU: bf16 autocast, base weights untouched, LoRA weights moved.

Skipped where torch sees no GPU (CI, the development machine); run on a GPU worker with
`pytest -m gpu tests/unit/test_train_gpu.py`.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.ml,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def test_lora_trains_in_bf16_on_cuda_and_leaves_base_weights_alone(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tuneloop.config import TrainingSettings
    from tuneloop.demo import invoices as world
    from tuneloop.demo.basemodel import build_demo_model
    from tuneloop.ml.train import train_lora

    base = build_demo_model(tmp_path / "base", preset="tiny")
    before = load_file(str(Path(base) / "model.safetensors"))
    rng = random.Random(0)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    records = [world.make_labelled_record(rng, "original", f"g-{i}", now) for i in range(64)]
    result = train_lora(base, records, tmp_path / "adapter", TrainingSettings(max_steps=20, batch_size=8, learning_rate=5e-3))
    assert (result.device, result.dtype) == ("cuda", "bfloat16")
    assert result.final_loss < result.loss_history[0]
    after = load_file(str(Path(base) / "model.safetensors"))
    assert all(torch.equal(before[name], after[name]) for name in before)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = {name: t for name, t in adapter.items() if "lora_B" in name}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values()), "peft starts B at zero: every B must have moved"


def test_qlora_trains_on_cuda_with_a_4bit_base_model(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from tuneloop.config import TrainingSettings
    from tuneloop.demo import invoices as world
    from tuneloop.demo.basemodel import build_demo_model
    from tuneloop.ml.train import train_lora

    base = build_demo_model(tmp_path / "base", preset="tiny")
    rng = random.Random(0)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    records = [world.make_labelled_record(rng, "original", f"q-{i}", now) for i in range(64)]
    settings = TrainingSettings(max_steps=20, batch_size=8, learning_rate=5e-3, quantization="4bit")
    result = train_lora(base, records, tmp_path / "adapter", settings)
    assert (result.device, result.dtype) == ("cuda", "bfloat16")
    assert result.final_loss < result.loss_history[0]
