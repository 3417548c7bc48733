"""LoRA training: base weights untouched, LoRA weights trained, prompt masked, files vLLM loads."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.tiny_models import assert_only_lora_changed, capture_trained_model  # noqa: E402

from tuneloop.config import TrainingSettings  # noqa: E402
from tuneloop.demo.basemodel import build_demo_model  # noqa: E402
from tuneloop.demo.invoices import make_labelled_record  # noqa: E402
from tuneloop.ml.model import load_lora_model, resolve_device  # noqa: E402
from tuneloop.ml.train import train_lora  # noqa: E402
from tuneloop.ml.training_data import IGNORE_INDEX, TrainingError, tokenize_records  # noqa: E402

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.ml

FAST = {"batch_size": 4, "max_seq_len": 512, "log_every": 1, "learning_rate": 5e-3}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.getbasetemp() / "tiny-model", preset="tiny", progress=lambda _: None)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return [make_labelled_record(random.Random(i), "original", f"rec-{i}", when) for i in range(12)]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, records: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, TrainingSettings]:
    settings = TrainingSettings(max_steps=3, lora_rank=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], **FAST)
    out = tmp_path_factory.mktemp("adapter") / "v1"
    result = train_lora(tiny_model, records, out, settings, dataset_hash="snap-123", progress=lambda _: None)
    return out, result, settings


def test_training_changes_every_lora_b_and_no_base_weight(
    tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = capture_trained_model(monkeypatch)
    result = train_lora(tiny_model, records, tmp_path / "a", TrainingSettings(max_steps=3, **FAST), progress=lambda _: None)
    assert result.trainer == "trl.SFTTrainer" and result.steps == 3
    assert_only_lora_changed(seen)


def test_adapter_files_are_what_vllm_loads(trained: tuple[Path, Any, TrainingSettings], tiny_model: Path) -> None:
    out, result, settings = trained
    files = {path.name for path in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "provenance.json", "train_metrics.json"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt"))]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == settings.lora_rank == 8
    assert config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert config["base_model_name_or_path"] == str(tiny_model)

    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    assert not any("k_proj" in name for name in names)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging dir left behind"


def test_provenance_and_metrics(trained: tuple[Path, Any, TrainingSettings]) -> None:
    out, result, settings = trained
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["dataset_hash"] == "snap-123"
    assert provenance["config"]["lora_rank"] == 8
    assert len(provenance["base_model_hash"]) == 64
    for package in ("torch", "transformers", "peft"):
        assert provenance["packages"][package]
    assert provenance["created_at"].endswith("+00:00")
    assert provenance["git_sha"]

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == result.steps == 3
    assert len(metrics["loss_history"]) == 3
    assert (metrics["device"], metrics["dtype"]) == resolve_device("auto", "auto") == ("cpu", metrics["dtype"])
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert result.tokens_per_second > 0


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")],
)
def test_auto_dtype_on_cpu_follows_native_bf16(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_device("auto", "auto") == ("cpu", expected)
    assert resolve_device("cpu", "float32") == ("cpu", "float32"), "an explicit dtype is kept"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older torch without the probe
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolve_device("auto", "auto") == ("cpu", "float32")


def test_prompt_tokens_are_masked_and_match_inference(tiny_model: Path, records: list[dict[str, Any]]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    record = records[0]
    [example], dropped = tokenize_records(tokenizer, [record], 512)
    assert dropped == 0
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    # The trainer sees exactly the tokens vLLM/generate will see before the answer...
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    # ...and learns the gold completion followed by eos, nothing else.
    supervised = example.labels[len(prompt_ids) :]
    assert IGNORE_INDEX not in supervised
    assert tokenizer.decode(supervised) == record["completion"] + "<|eos|>"


def test_loss_decreases_on_a_small_repeated_dataset(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = TrainingSettings(max_steps=30, warmup_ratio=0.0, checkpoint_every=0, **FAST)
    result = train_lora(tiny_model, records[:4], tmp_path / "a", settings, progress=lambda _: None)
    first, last = result.loss_history[0], sum(result.loss_history[-5:]) / 5
    assert len(result.loss_history) == 30 and last < 0.7 * first, result.loss_history


def test_over_long_rows_are_dropped_not_cut(tiny_model: Path, records: list[dict[str, Any]]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short = {"id": "short", "prompt": "Total 5", "completion": '{"total":5.00}'}
    examples, dropped = tokenize_records(tokenizer, [short, records[0]], 64)
    assert dropped == 1
    assert len(examples) == 1 and len(examples[0].input_ids) <= 64


def test_all_rows_too_long_says_what_to_raise(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = TrainingSettings(max_steps=1, max_seq_len=32)
    with pytest.raises(TrainingError, match="max_seq_len"):
        train_lora(tiny_model, records[:2], tmp_path / "a", settings, progress=lambda _: None)


def test_missing_base_model_points_to_build_model(records: list[dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="tuneloop build-model"):
        train_lora(tmp_path / "no-such-model", records, tmp_path / "a", TrainingSettings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no config.json"):
        train_lora(tmp_path / "empty", records, tmp_path / "a", TrainingSettings())


def test_unreachable_hub_id_is_explained(records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainingError, match="HF_HUB_OFFLINE"):
        train_lora("tuneloop-tests/no-such-model", records, tmp_path / "a", TrainingSettings(max_steps=1), progress=lambda _: None)


def test_bad_datasets_fail_fast(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="empty"):
        train_lora(tiny_model, [], tmp_path / "a", TrainingSettings())
    broken = [*records[:2], {"id": "r-x", "prompt": "p"}, {"id": "r-y", "prompt": "", "completion": "{}"}]
    with pytest.raises(TrainingError, match=r"2 of 4 records.*r-x.*completion.*r-y.*prompt"):
        train_lora(tiny_model, broken, tmp_path / "a", TrainingSettings())


def test_invalid_lora_settings_are_refused(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    bad_rank = TrainingSettings.model_construct(**{**TrainingSettings().model_dump(), "lora_rank": 0})
    with pytest.raises(TrainingError, match="lora_rank"):
        train_lora(tiny_model, records, tmp_path / "a", bad_rank)
    unknown = TrainingSettings(max_steps=1, target_modules=["no_such_proj"])
    with pytest.raises(TrainingError, match="no_such_proj"):
        train_lora(tiny_model, records, tmp_path / "a", unknown, progress=lambda _: None)


def test_refuses_to_overwrite_a_non_adapter_directory(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not an adapter directory"):
        train_lora(tiny_model, records[:4], precious, TrainingSettings(max_steps=1, **FAST), progress=lambda _: None)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_warm_start_begins_from_the_given_adapter_and_keeps_its_shape(
    trained: tuple[Path, Any, TrainingSettings], tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    init_dir, _, init_settings = trained
    saved = load_file(str(init_dir / "adapter_model.safetensors"))
    # Settings that differ from the init adapter's (rank 16, all modules): the adapter's own win.
    model, _ = load_lora_model(tiny_model, TrainingSettings(), "cpu", "float32", init_adapter=init_dir)
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert loaded and all(p.requires_grad for p in loaded.values())
    assert {p.shape[0] for name, p in loaded.items() if "lora_A" in name} == {init_settings.lora_rank}
    for name, tensor in saved.items():  # peft saves "...lora_A.weight", loads "...lora_A.default.weight"
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])]
        assert len(match) == 1 and match[0].detach().equal(tensor), name

    result = train_lora(
        tiny_model, records[:8], tmp_path / "v2", TrainingSettings(max_steps=2, **FAST),
        init_adapter=init_dir, progress=lambda _: None,
    )
    assert result.init_from == str(init_dir)
    provenance = json.loads((tmp_path / "v2" / "provenance.json").read_text())
    assert provenance["init_from"] == str(init_dir)
    config = json.loads((tmp_path / "v2" / "adapter_config.json").read_text())
    assert config["r"] == init_settings.lora_rank and config["base_model_name_or_path"] == str(tiny_model)


def test_warm_start_refuses_an_adapter_of_another_base_model(
    trained: tuple[Path, Any, TrainingSettings], records: list[dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    from tuneloop.ml.model import check_init_adapter

    foreign = tmp_path / "foreign"
    shutil.copytree(trained[0], foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TrainingError, match=r"Llama-3\.2-1B.*init_from: none"):
        check_init_adapter(foreign, trained[0].parent / "tiny-model")
    (foreign / "adapter_model.safetensors").unlink()
    with pytest.raises(TrainingError, match="no adapter_model.safetensors"):
        check_init_adapter(foreign, "anything")
    with pytest.raises(TrainingError, match="adapter_config.json"):
        check_init_adapter(tmp_path / "missing", "anything")


def test_missing_optional_packages_are_named_before_loading(records: list[dict[str, Any]], tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(TrainingError, match="pip install liger-kernel"):
            train_lora(tmp_path / "never-loaded", records, tmp_path / "a", TrainingSettings(liger_kernel=True))
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(TrainingError, match="pip install deepspeed"):
            train_lora(tmp_path / "never-loaded", records, tmp_path / "a", TrainingSettings(processes=2, distributed="deepspeed"))


def test_a_diverging_run_stops_and_says_what_to_lower(
    tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))  # the loss diverges
    settings = TrainingSettings(max_steps=6, checkpoint_every=0, dtype="float32", **FAST)
    with pytest.raises(TrainingError, match=r"loss became nan at step 1; lower training.learning_rate \(now 0.005\)"):
        train_lora(tiny_model, records[:8], tmp_path / "a", settings, progress=lambda _: None)
    assert not (tmp_path / "a").exists(), "no adapter is written from a diverged run"
