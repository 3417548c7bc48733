"""Any Hugging Face causal LM with a chat template: Llama-3, Qwen2.5, Mistral, Gemma-2, Phi-3.

Each family is a tiny random model of its real architecture class with its own tokenizer,
special tokens and chat template (``tests/tiny_models.py``). For each: the template renders
system/user/assistant turns the family's way, the end-of-turn token is found from the template,
a few LoRA steps (default ``target_modules: [all-linear]``) train the LoRA matrices and nothing
else, and HF generation runs with the family's stop ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.tiny_models import (  # noqa: E402
    FAMILIES,
    assert_only_lora_changed,
    build_tiny_model,
    capture_trained_model,
    chat_records,
)

from tuneloop.config import EvalSettings, TrainingSettings  # noqa: E402
from tuneloop.ml.backends import HFBackend, _stop_ids  # noqa: E402
from tuneloop.ml.chat import resolve_target_modules, template_stop_tokens  # noqa: E402
from tuneloop.ml.train import train_lora  # noqa: E402
from tuneloop.ml.training_data import tokenize_records  # noqa: E402
from tuneloop.serving.adapters import read_safetensors_header, validate_adapter  # noqa: E402

pytestmark = pytest.mark.ml

FAST = {"max_steps": 3, "batch_size": 4, "max_seq_len": 256, "log_every": 1, "learning_rate": 5e-3, "lora_rank": 8, "lora_alpha": 16}
PROMPTS = ["ticket 123: the customer reports a refund. category?", "my login does not work since 3 may"]
# The linear layers peft's all-linear means, per architecture (Phi-3 fuses q/k/v and gate/up).
LINEAR = {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}
DEFAULT_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def adapter(model_dir: Path, family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained with the project's trainer and the default target modules."""
    out = tmp_path_factory.mktemp(f"adapter-{family}") / "v1"
    train_lora(model_dir, chat_records(12), out, TrainingSettings(**FAST), progress=lambda _: None)
    return out


def test_build_is_deterministic(family: str, model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(family, tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_model_is_the_family_architecture(family: str, model_dir: Path, tokenizer: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    spec = FAMILIES[family]
    assert config["architectures"] == [spec.architecture]
    assert config["vocab_size"] == len(tokenizer)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    stops = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert stops == [tokenizer.convert_tokens_to_ids(token) for token in spec.stop]
    assert tokenizer.eos_token == spec.special["eos"] and tokenizer.bos_token == spec.special["bos"]
    for token in spec.turn_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, f"{token} is not one token"


def test_chat_template_renders_the_turns_the_family_way(family: str, tokenizer: Any) -> None:
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "refund order 1234"}]
    prompt = tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
    assert "be brief" in prompt and "refund order 1234" in prompt
    answered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "refund order 1234"}, {"role": "assistant", "content": "refund"}], tokenize=False
    )
    end = FAMILIES[family].end_of_turn
    assert f"refund{end}" in answered  # the end-of-turn token right after the answer
    expected = {
        "llama": ("<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "qwen2": ("<|im_start|>system\nbe brief<|im_end|>\n", "<|im_start|>assistant\n"),
        "mistral": ("[INST] be brief\n\nrefund order 1234[/INST]", "[/INST]"),
        "gemma": ("<start_of_turn>user\nbe brief\n\nrefund order 1234<end_of_turn>\n", "<start_of_turn>model\n"),
        "phi3": ("<|system|>\nbe brief<|end|>\n<|user|>\n", "<|assistant|>\n"),
    }[family]
    assert expected[0] in prompt
    assert prompt.endswith(expected[1])
    bare = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    if family == "qwen2":  # Qwen adds its default system prompt when none is given
        assert bare.startswith("<|im_start|>system\nYou are Qwen")
    if family == "gemma":  # no system role: folded into the first user turn
        assert "<start_of_turn>system" not in prompt


def test_template_stop_tokens_find_the_end_of_turn_token(family: str, tokenizer: Any) -> None:
    assert template_stop_tokens(tokenizer) == [FAMILIES[family].end_of_turn]


def test_stop_ids_cover_eos_generation_config_and_end_of_turn(family: str, model_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = _stop_ids(tokenizer, model)
    spec = FAMILIES[family]
    wanted = {tokenizer.convert_tokens_to_ids(token) for token in (spec.end_of_turn, spec.special["eos"], *spec.stop)}
    assert wanted <= set(ids), (ids, wanted)


def test_all_linear_resolves_to_the_architecture_projections(family: str, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert set(resolve_target_modules(model, ["all-linear"])) == LINEAR.get(family, DEFAULT_LINEAR)
    assert resolve_target_modules(model, ["q_proj", "all-linear"])[0] == "q_proj"


def test_training_changes_lora_weights_and_no_base_weight(family: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    settings = TrainingSettings(**FAST)
    assert settings.target_modules == ["all-linear"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples, dropped = tokenize_records(tokenizer, chat_records(12), settings.max_seq_len)
    assert examples and not dropped
    end_id = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert all(end_id in [t for t in example.labels if t >= 0] for example in examples), "the end-of-turn token is not learned"
    seen = capture_trained_model(monkeypatch)
    train_lora(model_dir, chat_records(12), tmp_path / "a", settings, progress=lambda _: None)
    assert_only_lora_changed(seen)


def test_adapter_names_the_real_modules_and_passes_validation(family: str, model_dir: Path, adapter: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == LINEAR.get(family, DEFAULT_LINEAR)
    tensors = read_safetensors_header(adapter / "adapter_model.safetensors")
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors}
    assert modules == LINEAR.get(family, DEFAULT_LINEAR)
    info = validate_adapter(adapter, base_model_dir_or_id=model_dir, max_lora_rank=16)
    assert info is not None


def test_hf_generation_returns_strings_for_base_and_adapter(model_dir: Path, adapter: Path) -> None:
    settings = EvalSettings(max_new_tokens=8, batch_size=2)
    for adapter_dir in (None, adapter):
        texts = HFBackend(model_dir, adapter_dir, settings).generate(PROMPTS).texts
        assert len(texts) == len(PROMPTS) and all(isinstance(text, str) for text in texts)
