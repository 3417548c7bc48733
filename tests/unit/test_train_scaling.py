"""The trainer's scaling features: packing, the supervised-only loss head, gradient
checkpointing, early stopping, replay, kill-and-resume, and torchrun on two CPU processes.

Each one must change speed or memory, never the result: packed and unpacked batches give the
same loss and gradients; a run killed with SIGKILL and resumed writes the adapter an
uninterrupted run writes; two processes take the same steps as one with twice the
accumulation.
"""

from __future__ import annotations

import json
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
from tuneloop.ml import train as train_module  # noqa: E402
from tuneloop.ml.checkpoint import checkpoint_path  # noqa: E402
from tuneloop.ml.model import load_lora_model  # noqa: E402
from tuneloop.ml.train import _loss_head, loss_sum, train_lora  # noqa: E402
from tuneloop.ml.training_data import (  # noqa: E402
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    collate_packed,
    micro_batch_stream,
    mix_replay,
    pack_rows,
    split_validation,
    tokenize_records,
)

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


def test_pack_rows_fills_rows_without_splitting_or_losing_an_example() -> None:
    lengths = [300, 200, 120, 100, 90, 60, 500, 12]
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) == 3  # 1382 tokens: the fewest 512-token rows that can hold them
    assert pack_rows([600], 512) == [[0]]  # longer than a row: a row of its own


def test_collate_packed_restarts_positions_and_masks_padding() -> None:
    examples = [TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), TokenizedExample([4, 5], [IGNORE_INDEX, 5])]
    batch = collate_packed(examples, pad_id=0, capacity=8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    two_rows = collate_packed(examples, pad_id=0, capacity=4)
    assert two_rows["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert two_rows["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert two_rows["labels"].tolist()[1] == [IGNORE_INDEX, 5, IGNORE_INDEX]


def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(tiny_model: Path, records: list[dict[str, Any]]) -> None:
    settings = TrainingSettings(**SMALL)
    model, tokenizer = load_lora_model(tiny_model, settings, "cpu", "float32")
    examples, _ = tokenize_records(tokenizer, records[:6], 512)
    with torch.no_grad():  # move the LoRA B matrices off zero so the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pad = tokenizer.pad_token_id
    results = []
    for batch in (collate(examples, pad), collate_packed(examples, pad, 1024)):
        model.zero_grad()
        loss = loss_sum(model, batch, _loss_head(model))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), grads, batch["input_ids"].shape))
    (padded_loss, padded_grads, padded_shape), (packed_loss, packed_grads, packed_shape) = results
    assert packed_shape[0] < padded_shape[0], "six examples must share rows when packed"
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    # float32 sums over ~1,000 tokens in another order; a leak across examples differs by ~1e-1
    assert _max_diff(padded_grads, packed_grads) < 1e-4


def test_supervised_only_head_equals_the_full_forward(tiny_model: Path, records: list[dict[str, Any]]) -> None:
    settings = TrainingSettings(**SMALL)
    model, tokenizer = load_lora_model(tiny_model, settings, "cpu", "float32")
    examples, _ = tokenize_records(tokenizer, records[:4], 512)
    batch = collate(examples, tokenizer.pad_token_id)
    head = _loss_head(model)
    assert head is not None, "the demo Llama must take the fast path"
    with torch.no_grad():
        assert float(loss_sum(model, batch, head)) == pytest.approx(float(loss_sum(model, batch, None)), rel=1e-5)


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


@pytest.mark.parametrize("grouped", [True, False])
def test_micro_batch_stream_skip_continues_the_same_order(grouped: bool) -> None:
    lengths = [random.Random(i).randint(10, 90) for i in range(37)]
    stream = micro_batch_stream(lengths, 4, seed=3, grouped=grouped)
    full = [next(stream) for _ in range(25)]
    resumed = micro_batch_stream(lengths, 4, seed=3, skip=11, grouped=grouped)
    assert [next(resumed) for _ in range(14)] == full[11:]
    assert sorted(i for batch in full[:10] for i in batch) == list(range(37))  # one epoch = every row once
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in full[:9]]
    assert (sum(spreads) < 9 * 25) == grouped  # grouped batches hold rows of similar length


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
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    weights_seen: list[dict[str, Any]] = []

    def fake_eval_loss(model: Any, *args: Any, **kwargs: Any) -> float:
        weights_seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return next(scripted)

    monkeypatch.setattr(train_module, "eval_loss", fake_eval_loss)
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
    assert not checkpoint_path(tmp_path / "straight").exists(), "a finished run removes its checkpoint"

    killed = _run_train(tiny_model, tmp_path / "resumed", 6, settings)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert "checkpoint saved at step 6/12" in killed.stdout
    assert not (tmp_path / "resumed").exists()
    assert checkpoint_path(tmp_path / "resumed").is_file()

    resumed = _run_train(tiny_model, tmp_path / "resumed", 0, settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = _result(resumed)
    assert again["resumed_from_step"] == 6
    assert "resumed from the checkpoint at step 6/12" in resumed.stdout
    assert again["loss_history"] == pytest.approx(reference["loss_history"], abs=1e-5)
    assert _max_diff(_adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")) < 1e-6
    assert not list(tmp_path.glob(".resumed.training-*")), "the killed run's staging directory is cleaned up"

    changed = _run_train(tiny_model, tmp_path / "resumed-other", 6, settings)  # a checkpoint of other settings...
    assert changed.returncode == -signal.SIGKILL
    os.replace(checkpoint_path(tmp_path / "resumed-other"), checkpoint_path(tmp_path / "other"))
    other = _run_train(tiny_model, tmp_path / "other", 0, {**settings, "learning_rate": 1e-3})
    assert other.returncode == 0 and _result(other)["resumed_from_step"] is None  # ...is not resumed
    assert "belongs to another run" in other.stderr


def test_torchrun_two_cpu_processes_match_one_process_with_double_accumulation(tiny_model: Path, tmp_path: Path) -> None:
    settings = {**SMALL, "max_steps": 4, "batch_size": 2, "checkpoint_every": 0}
    single = _run_train(tiny_model, tmp_path / "single", 0, {**settings, "grad_accum": 2})
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = _run_train(tiny_model, tmp_path / "ddp", 0, settings, extra=torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    assert _result(double)["loss_history"] == pytest.approx(_result(single)["loss_history"], rel=1e-4)
    assert _max_diff(_adapter(tmp_path / "single"), _adapter(tmp_path / "ddp")) < 1e-5
    metrics = json.loads((tmp_path / "ddp" / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2
