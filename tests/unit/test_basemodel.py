"""The demo base model: tokenizer, chat template, reload from disk, build cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tuneloop.config import Settings  # noqa: E402
from tuneloop.demo import basemodel  # noqa: E402
from tuneloop.demo.basemodel import (  # noqa: E402
    BuildError,
    build_demo_model,
    read_model_record,
    resolve_base_model,
)

pytestmark = pytest.mark.ml


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same path in every ML test module: the first builds, the others hit the build cache.
    return build_demo_model(tmp_path_factory.getbasetemp() / "tiny-model", preset="tiny", progress=lambda _: None)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_tokenizer_splits_digits_one_by_one(tokenizer: Any) -> None:
    tokens = tokenizer.tokenize("Total due: $1,370.23 on 2025-10-15")
    digit_tokens = [token for token in tokens if any(char.isdigit() for char in token)]
    assert digit_tokens, tokens
    assert all(len(token.lstrip("Ġ")) == 1 for token in digit_tokens), digit_tokens
    assert "".join(digit_tokens).replace("Ġ", "") == "13702320251015"


def test_tokenizer_round_trips_text(tokenizer: Any) -> None:
    text = "Rechnung Nr. RE-2026-7873\nBetrag: 1.234,56 € — Schäfer GmbH"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_the_documented_format(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Extract.\n\nINVOICE 42"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\nExtract.\n\nINVOICE 42<|end|>\n<|assistant|>\n"
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": '{"total":1.00}'}], tokenize=False
    )
    assert full.startswith(prompt)
    assert full[len(prompt) :].startswith('{"total":1.00}<|eos|>')
    for special in ("<|bos|>", "<|user|>", "<|end|>", "<|assistant|>", "<|eos|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1, special


def test_model_dir_reloads_offline_and_generates(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {path.name for path in tiny_model.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    assert model.config.head_dim == 64
    assert model.config.vocab_size == len(tokenizer)
    eos_ids = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|eos|>") in eos_ids
    assert tokenizer.convert_tokens_to_ids("<|end|>") in eos_ids

    text = tokenizer.apply_chat_template([{"role": "user", "content": "INVOICE 7"}], add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > encoded["input_ids"].shape[1]


def test_recipe_record_describes_the_build(tiny_model: Path) -> None:
    record = read_model_record(tiny_model)
    assert record is not None
    assert record["preset"]["name"] == "tiny"
    assert record["seed"] == 0
    assert len(record["corpus_sha256"]) == 64
    assert record["parameters"] > 0
    assert record["final_loss"] < record["loss_history"][0]
    assert record["build_seconds"] > 0
    assert record["provenance"]["packages"]["torch"]


def test_cache_hit_returns_without_rebuilding(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rebuilt although the recipe did not change")

    monkeypatch.setattr(basemodel, "_build_into", no_build)
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(tiny_model, preset="tiny") == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before


def test_changed_recipe_rebuilds(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    class Stop(Exception):
        pass

    def record_build(directory: Path, spec: Any, seed: int, *args: Any) -> None:
        calls.append(seed)
        raise Stop

    monkeypatch.setattr(basemodel, "_build_into", record_build)
    with pytest.raises(Stop):
        build_demo_model(tiny_model, preset="tiny", seed=1)
    assert calls == [1]
    # The failed build left the cached model alone.
    assert read_model_record(tiny_model)["seed"] == 0  # type: ignore[index]


def test_bad_inputs_fail_fast(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown preset"):
        build_demo_model(tmp_path / "m", preset="huge")
    with pytest.raises(BuildError, match="empty"):
        build_demo_model(tmp_path / "m", preset="tiny", corpus=["", "  "])


def test_resolve_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Settings.model_validate({"model": {"base_model": "Qwen/Qwen2.5-0.5B-Instruct"}})
    assert resolve_base_model(hub) == "Qwen/Qwen2.5-0.5B-Instruct"
    local = Settings.model_validate({"model": {"base_model": str(tmp_path)}})
    assert resolve_base_model(local) == str(tmp_path)

    built: list[Path] = []

    def fake_build(out_dir: Path, **kwargs: Any) -> Path:
        built.append(Path(out_dir))
        return Path(out_dir)

    monkeypatch.setattr(basemodel, "build_demo_model", fake_build)
    demo = Settings.model_validate({"model": {"base_model": "demo", "demo_model_dir": str(tmp_path / "demo")}})
    assert resolve_base_model(demo) == str(tmp_path / "demo")
    assert built == [tmp_path / "demo"]



def test_a_shipped_copy_of_the_recipe_is_copied_not_built(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("built although an intact shipped copy of the recipe exists")

    monkeypatch.setattr(basemodel, "_build_into", no_build)
    out = build_demo_model(tmp_path / "out", preset="tiny", shipped=tiny_model)
    assert (out / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert read_model_record(out) == read_model_record(tiny_model)
    assert "What it has seen" in (out / "README.md").read_text()


def test_a_tampered_or_foreign_shipped_copy_is_refused(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    class Built(Exception):
        pass

    def build(*args: Any, **kwargs: Any) -> None:
        raise Built

    monkeypatch.setattr(basemodel, "_build_into", build)
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_model, shipped)
    (shipped / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    with pytest.raises(Built):
        build_demo_model(tmp_path / "out", preset="tiny", shipped=shipped)
    assert "does not match its record" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(Built):  # another seed: another recipe
        build_demo_model(tmp_path / "out", preset="tiny", seed=3, shipped=tiny_model)
    assert "from another recipe" in caplog.text
    assert not (tmp_path / "out").exists()

