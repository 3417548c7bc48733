"""The trainer's scaling features on TRL's SFTTrainer: padding-free packing, gradient
checkpointing, early stopping, replay, kill-and-resume, two CPU processes (torchrun and
``accelerate launch``), and QLoRA on bitsandbytes' CPU backend.

Each one must change speed or memory, never the result: padding-free packed and padded
batches give the same loss and gradients; a run killed with SIGKILL and resumed writes the
adapter an uninterrupted run writes; two processes take the same steps as one with twice the
accumulation.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tuneloop.config import TrainingSettings  # noqa: E402
from tuneloop.demo.basemodel import build_demo_model  # noqa: E402
from tuneloop.demo.invoices import make_labelled_record  # noqa: E402
from tuneloop.ml.checkpoint import checkpoint_path  # noqa: E402
from tuneloop.ml.model import load_lora_model  # noqa: E402
from tuneloop.ml.train import train_lora  # noqa: E402
from tuneloop.ml.training_data import mix_replay, split_validation, tokenize_records  # noqa: E402

pytestmark = pytest.mark.ml

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"batch_size": 4, "max_seq_len": 512, "log_every": 1, "learning_rate": 5e-3, "lora_rank": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("scaling") / "tiny-model", preset="tiny", progress=lambda _: None)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return [make_labelled_record(random.Random(i), "original" if i % 3 else "drifted", f"s-{i}", when) for i in range(24)]


def _adapter(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_padding_free_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(tiny_model: Path, records: list[dict[str, Any]]) -> None:
    """TRL's padding-free collator (what ``packing: true`` trains on) concatenates the rows with
    restarting position ids and no attention mask; no token may attend across rows."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    settings = TrainingSettings(**SMALL)
    model, tokenizer = load_lora_model(tiny_model, settings, "cpu", "float32")
    examples, _ = tokenize_records(tokenizer, records[:6], 512)
    with torch.no_grad():  # move the LoRA B matrices off zero so the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    results = []
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(rows)
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), grads, batch["input_ids"].shape))
    (padded_loss, padded_grads, padded_shape), (packed_loss, packed_grads, packed_shape) = results
    assert packed_shape[0] == 1 < padded_shape[0], "six examples must share one row when padding-free"
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    # float32 sums over ~1,000 tokens in another order; a leak across examples differs by ~1e-1
    assert _max_diff(padded_grads, packed_grads) < 1e-4


def test_gradient_checkpointing_changes_memory_not_the_adapter(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    quiet = {"progress": lambda _: None}
    # packed end to end as well (packing is off by default)
    plain = train_lora(tiny_model, records, tmp_path / "plain", TrainingSettings(max_steps=3, packing=True, **SMALL), **quiet)
    checkpointed = train_lora(
        tiny_model, records, tmp_path / "gc", TrainingSettings(max_steps=3, packing=True, gradient_checkpointing=True, **SMALL), **quiet
    )
    assert plain.packing and checkpointed.packing
    assert checkpointed.loss_history == pytest.approx(plain.loss_history, rel=1e-4)
    assert _max_diff(_adapter(tmp_path / "plain"), _adapter(tmp_path / "gc")) < 1e-5


def test_split_validation_is_stable_and_disjoint(records: list[dict[str, Any]]) -> None:
    train, validation = split_validation(records, 0.25)
    assert len(train) + len(validation) == len(records) and validation
    assert not {r["id"] for r in train} & {r["id"] for r in validation}
    assert split_validation(list(reversed(records)), 0.25)[1] == list(reversed(validation))
    assert split_validation(records, 0.0) == (records, [])


def test_mix_replay_adds_the_requested_share_of_earlier_rows(records: list[dict[str, Any]]) -> None:
    new, earlier = records[:12], records[6:]
    mixed, n = mix_replay(new, earlier, 0.25, seed=1)
    assert n == 4 and len(mixed) == 16  # 4 of 16 = 25%
    assert mixed[:12] == new
    assert all(row["id"] not in {r["id"] for r in new} for row in mixed[12:])
    assert mix_replay(new, earlier, 0.25, seed=1) == (mixed, n)
    assert mix_replay(new, earlier, 0.0) == (new, 0)
    assert mix_replay(new, records[:12], 0.5) == (new, 0)  # nothing earlier that is not already there


def test_early_stopping_keeps_the_best_weights(
    tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Trainer
    from transformers.trainer_utils import EvalLoopOutput

    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    weights_seen: list[dict[str, Any]] = []

    def scripted_eval(self: Any, dataloader: Any, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any) -> EvalLoopOutput:
        weights_seen.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
        return EvalLoopOutput(predictions=None, label_ids=None, metrics={f"{metric_key_prefix}_loss": next(scripted)}, num_samples=1)

    monkeypatch.setattr(Trainer, "evaluation_loop", scripted_eval)
    settings = TrainingSettings(max_steps=20, validation_fraction=0.25, eval_every=2, early_stopping_patience=2, **SMALL)
    result = train_lora(tiny_model, records, tmp_path / "a", settings, progress=lambda _: None)
    assert result.stopped_early and result.steps == 8 and result.best_step == 4
    assert result.eval_loss_history == [[2, 3.0], [4, 2.0], [6, 2.5], [8, 2.6]]
    assert result.n_validation > 0 and result.n_examples + result.n_validation == len(records)
    saved = _adapter(tmp_path / "a")
    best = weights_seen[1]
    for name, tensor in saved.items():
        match = [v for k, v in best.items() if k.replace(".default", "").endswith(name.split("base_model.model.", 1)[-1])]
        assert len(match) == 1 and torch.equal(match[0], tensor), name


_TRAIN_SCRIPT = """
import json, os, random, signal, sys
from datetime import UTC, datetime
from tuneloop.config import TrainingSettings
from tuneloop.ml.train import train_lora
from tuneloop.demo.invoices import make_labelled_record
base, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
when = datetime(2026, 1, 1, tzinfo=UTC)
records = [make_labelled_record(random.Random(i), "original", f"k-{i}", when) for i in range(24)]
settings = TrainingSettings(**json.loads(os.environ["SETTINGS"]))
def progress(line):
    print(line, flush=True)
    if kill_at and line.endswith(f"checkpoint saved at step {kill_at}/{settings.max_steps}"):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as on a pre-empted node
result = train_lora(base, records, out, settings, progress=progress)
print("RESULT " + json.dumps({"resumed_from_step": result.resumed_from_step, "steps": result.steps, "loss_history": result.loss_history}))
"""


def _run_train(base: Path, out: Path, kill_at: int, settings: dict[str, Any], extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SETTINGS": json.dumps(settings), "PYTHONPATH": str(ROOT / "include")}
    script = out.parent / "train_script.py"
    script.write_text(_TRAIN_SCRIPT)
    command = [*(extra or [sys.executable]), str(script), str(base), str(out), str(kill_at)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_killed_run_resumes_to_the_uninterrupted_adapter(tiny_model: Path, tmp_path: Path) -> None:
    settings = {**SMALL, "max_steps": 12, "checkpoint_every": 3, "lora_dropout": 0.1}  # dropout: RNG state must resume too
    straight = _run_train(tiny_model, tmp_path / "straight", 0, settings)
    assert straight.returncode == 0, straight.stderr[-2000:]
    reference = _result(straight)
    assert reference["resumed_from_step"] is None
    assert not checkpoint_path(tmp_path / "straight").exists(), "a finished run removes its checkpoints"

    killed = _run_train(tiny_model, tmp_path / "resumed", 6, settings)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert "checkpoint saved at step 6/12" in killed.stdout
    assert not (tmp_path / "resumed").exists()
    assert (checkpoint_path(tmp_path / "resumed") / "checkpoint-6" / "trainer_state.json").is_file()

    resumed = _run_train(tiny_model, tmp_path / "resumed", 0, settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = _result(resumed)
    assert again["resumed_from_step"] == 6
    assert "resumed from the checkpoint at step 6/12" in resumed.stdout
    assert again["loss_history"] == pytest.approx(reference["loss_history"], abs=1e-5)
    assert _max_diff(_adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")) < 1e-6
    assert not list(tmp_path.glob(".resumed.training*")), "the staging directory is cleaned up"

    changed = _run_train(tiny_model, tmp_path / "resumed-other", 6, settings)  # a checkpoint of other settings...
    assert changed.returncode == -signal.SIGKILL
    os.replace(checkpoint_path(tmp_path / "resumed-other"), checkpoint_path(tmp_path / "other"))
    other = _run_train(tiny_model, tmp_path / "other", 0, {**settings, "learning_rate": 1e-3})
    assert other.returncode == 0 and _result(other)["resumed_from_step"] is None  # ...is not resumed
    assert "belong to another run" in other.stderr


def test_two_cpu_processes_match_one_process_with_double_accumulation(tiny_model: Path, tmp_path: Path) -> None:
    """torchrun, and ``accelerate launch`` with the config tuneloop renders for processes: 2."""
    from tuneloop.ml.launch import write_config

    settings = {**SMALL, "max_steps": 4, "batch_size": 2, "checkpoint_every": 0}
    single = _run_train(tiny_model, tmp_path / "single", 0, {**settings, "grad_accum": 2})
    assert single.returncode == 0, single.stderr[-2000:]
    config = tmp_path / "accelerate.yaml"
    write_config(TrainingSettings(**settings, processes=2, device="cpu"), str(config), cpu=True)
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)],
    }
    for name, launcher in launchers.items():
        double = _run_train(tiny_model, tmp_path / name, 0, settings, extra=launcher)
        assert double.returncode == 0, (name, double.stderr[-3000:])
        assert _result(double)["loss_history"] == pytest.approx(_result(single)["loss_history"], rel=1e-4), name
        assert _max_diff(_adapter(tmp_path / "single"), _adapter(tmp_path / name)) < 1e-5, name
        metrics = json.loads((tmp_path / name / "train_metrics.json").read_text())
        assert metrics["world_size"] == 2


@pytest.mark.parametrize("distributed", ["ddp", "fsdp", "deepspeed"])
def test_launch_config_is_what_accelerate_reads(distributed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered config goes through accelerate's own parser and validation; for FSDP, the
    plugin accelerate builds from it in each process (this machine has no GPUs to run it)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    from tuneloop.ml.launch import launch_command, write_config

    path = tmp_path / "accelerate.yaml"
    training = TrainingSettings(processes=4, distributed=distributed, dtype="bfloat16", gradient_checkpointing=True, grad_accum=2)
    write_config(training, str(path), cpu=False)
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[distributed]
    assert (config.num_processes, config.mixed_precision) == (4, "no")  # each process's Trainer sets bf16 from training.dtype
    command = launch_command("python", str(path), ["train", "--snapshot", "latest", "--version", "v3"])
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    assert args.num_processes == 4 and args.module and args.training_script == "tuneloop.cli"
    if distributed == "fsdp":
        env = prepare_multi_gpu_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.activation_checkpointing and plugin.cpu_ram_efficient_loading
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # the adapter file is gathered whole
    if distributed == "deepspeed":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["gradient_accumulation_steps"] == 2


def test_qlora_trains_a_4bit_base_model(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    """QLoRA through bitsandbytes' CPU backend (slow; the same code path runs CUDA's kernels)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from tuneloop.ml.model import load_lora_model as load

    settings = TrainingSettings(max_steps=2, quantization="4bit", checkpoint_every=0, device="cpu", dtype="float32", **SMALL)
    model, _ = load(tiny_model, settings, "cpu", "float32")
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules()), "the base model is not 4-bit"
    del model
    result = train_lora(tiny_model, records[:8], tmp_path / "q", settings, progress=lambda _: None)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.loss_history)
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model)
    assert _adapter(tmp_path / "q"), "the adapter is vLLM's plain LoRA file (no quantised weights in it)"
