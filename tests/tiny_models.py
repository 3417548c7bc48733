"""Tiny random causal LMs of real architectures, each with its own family's tokenizer and chat template.

``build_tiny_model(family, out_dir)`` saves, in a second or two on a CPU and with no hub access:

* a byte-level BPE tokenizer trained on :data:`CORPUS` (a few hundred short support-ticket
  sentences), wrapped in ``PreTrainedTokenizerFast`` with the family's special tokens
  (bos/eos/pad/unk as the family sets them, and its turn tokens) and a hand-written Jinja copy
  of the family's documented chat template;
* a random-weight model of the family's real architecture class (2 layers, 4 heads of 64, 2 KV
  heads, hidden 256, intermediate 512, ``max_position_embeddings`` 512, vocab = tokenizer
  size; heads narrower than 64 are refused by vLLM's CPU attention), with
  ``generation_config.eos_token_id`` set as the family's instruct models set it.

Families: ``llama`` (Llama-3), ``qwen2`` (Qwen2.5), ``mistral`` (Mistral-Instruct v0.3),
``gemma`` (Gemma-2 architecture, Gemma-3 style template), ``phi3`` (Phi-3-mini).
:data:`FAMILIES` maps each to a :class:`Family`, whose ``end_of_turn`` is the token the template
writes after an assistant message (what generation must stop at).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- chat templates (written from each family's documented format) ----------------------------

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\n" + QWEN2_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Mistral-7B-Instruct-v0.3: the system message goes in front of the LAST user message.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Gemma has no system role: like Gemma 3's template, a system message is folded into the first
# user turn; the assistant's role is called "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One model family: its architecture, special tokens and chat template."""

    name: str
    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    config_class: str
    template: str
    special: dict[str, str | None]  # bos/eos/pad/unk (None: the family has none)
    turn_tokens: list[str]
    end_of_turn: str  # what the template writes after an assistant message
    stop: list[str]  # generation_config.eos_token_id, as tokens
    add_bos: bool = False  # whether the real tokenizer prepends bos when encoding text
    system_in_prompt: bool = True  # whether a system message shows up in the rendered prompt
    config: dict[str, Any] = field(default_factory=dict)  # architecture-specific config fields


FAMILIES: dict[str, Family] = {
    "llama": Family(
        name="llama",
        architecture="LlamaForCausalLM",
        config_class="LlamaConfig",
        template=LLAMA3_TEMPLATE,
        special={"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None, "unk": None},
        turn_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"],
        end_of_turn="<|eot_id|>",
        stop=["<|end_of_text|>", "<|eot_id|>"],
        add_bos=True,
        config={"rope_theta": 500000.0, "tie_word_embeddings": False},
    ),
    "qwen2": Family(
        name="qwen2",
        architecture="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        template=QWEN2_TEMPLATE,
        special={"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None},
        turn_tokens=["<|im_start|>"],
        end_of_turn="<|im_end|>",
        stop=["<|im_end|>", "<|endoftext|>"],
        config={"rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False},
    ),
    "mistral": Family(
        name="mistral",
        architecture="MistralForCausalLM",
        config_class="MistralConfig",
        template=MISTRAL_TEMPLATE,
        special={"bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>"},
        turn_tokens=["[INST]", "[/INST]"],
        end_of_turn="</s>",
        stop=["</s>"],
        add_bos=True,
        config={"rope_theta": 1000000.0, "tie_word_embeddings": False, "sliding_window": None},
    ),
    "gemma": Family(
        name="gemma",
        architecture="Gemma2ForCausalLM",
        config_class="Gemma2Config",
        template=GEMMA_TEMPLATE,
        special={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
        turn_tokens=["<start_of_turn>", "<end_of_turn>"],
        end_of_turn="<end_of_turn>",
        stop=["<eos>", "<end_of_turn>"],
        add_bos=True,
        config={
            "tie_word_embeddings": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 64,
            "sliding_window": 256,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "phi3": Family(
        name="phi3",
        architecture="Phi3ForCausalLM",
        config_class="Phi3Config",
        template=PHI3_TEMPLATE,
        special={"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"},
        turn_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        end_of_turn="<|end|>",
        stop=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        config={"tie_word_embeddings": False, "original_max_position_embeddings": 512, "rope_scaling": None},
    ),
}

# --- corpus and training records -------------------------------------------------------------

TOPICS = ["billing bug", "refund", "login", "password reset", "shipping delay", "invoice", "account"]
WORDS = "billing bug refund login password shipping invoice order account payment card email address".split()


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` short support-ticket sentences with digits (deterministic for ``seed``)."""
    rng = random.Random(seed)
    shapes = [
        "ticket {n}: the customer reports a {t} on order {m}",
        "please refund order {m} because of the {t}",
        "the login fails after the password reset for account {n}",
        "shipping for order {m} is late by {d} days",
        "a billing bug charged card {n} twice for {d} euros",
        "category: {t}. priority: {d}. answer in one word.",
        "what is the category of ticket {n}? {t}",
        "my {w} does not work since {d} may, order {m}",
        "thanks, the {w} issue {n} is fixed now",
        "you are a helpful assistant for {w} questions",
    ]
    return [
        rng.choice(shapes).format(
            n=rng.randint(100, 99999), m=rng.randint(1000, 9999), d=rng.randint(1, 31), t=rng.choice(TOPICS), w=rng.choice(WORDS)
        )
        for _ in range(n)
    ]


def chat_records(n: int = 12, seed: int = 0) -> list[dict[str, str]]:
    """``{id, prompt, completion}`` records: classify a ticket, answer with one short word."""
    rng = random.Random(seed)
    labels = {"billing bug": "billing", "refund": "refund", "login": "login", "password reset": "login", "shipping delay": "shipping"}
    rows = []
    for index in range(n):
        topic = rng.choice(sorted(labels))
        prompt = f"ticket {rng.randint(100, 9999)}: the customer reports a {topic}. category?"
        rows.append({"id": f"r{index}", "prompt": prompt, "completion": labels[topic]})
    return rows


# --- builders --------------------------------------------------------------------------------


def build_tokenizer(family: str, *, seed: int = 0) -> Any:
    """The family's tokenizer: byte-level BPE on :func:`corpus`, its special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    named = [token for token in spec.special.values() if token]
    specials = list(dict.fromkeys([*named, *spec.turn_tokens]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed=seed), trainer=trainer)
    bos = spec.special["bos"]
    if spec.add_bos and bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec.special["bos"],
        eos_token=spec.special["eos"],
        pad_token=spec.special["pad"],
        unk_token=spec.special["unk"],
        additional_special_tokens=[token for token in spec.turn_tokens if token not in named],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = spec.template
    return fast


# vLLM's CPU attention kernels refuse small head sizes ("Unsupported CPU attention configuration:
# head_dim=16"), so heads are 64 wide; Phi-3 derives head_dim from hidden_size / heads.
HEAD_DIM, HEADS = 64, 4
HIDDEN = HEAD_DIM * HEADS


def _model_config(spec: Family, vocab_size: int, ids: dict[str, int | None]) -> Any:
    import transformers

    config_class = getattr(transformers, spec.config_class)
    return config_class(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        **spec.config,
    )


def build_tiny_model(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Save a random tiny ``family`` model with its tokenizer and chat template to ``out_dir``."""
    import torch
    import transformers
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    tokenizer = build_tokenizer(family, seed=seed)
    vocab = tokenizer.get_vocab()
    ids = {key: (vocab[token] if token else None) for key, token in spec.special.items()}
    stop = [vocab[token] for token in spec.stop]
    config = _model_config(spec, len(tokenizer), ids)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.architecture)(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=ids["pad"],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def capture_trained_model(monkeypatch: Any) -> dict[str, Any]:
    """Keep the model ``train_lora`` trains (``model``) and a copy of its weights before
    training (``before``), to check what the trainer changed: only the LoRA matrices."""
    from tuneloop.ml import train as train_module

    seen: dict[str, Any] = {}
    real = train_module.load_lora_model

    def loading(*args: Any, **kwargs: Any) -> Any:
        model, tokenizer = real(*args, **kwargs)
        seen["before"] = {name: param.detach().clone() for name, param in model.named_parameters()}
        seen["model"] = model
        return model, tokenizer

    monkeypatch.setattr(train_module, "load_lora_model", loading)
    return seen


def assert_only_lora_changed(seen: dict[str, Any]) -> None:
    """Every LoRA B matrix moved off its zero init; no base weight moved."""
    import torch

    model, before = seen["model"], seen["before"]
    assert all(param.requires_grad == ("lora_" in name) for name, param in model.named_parameters())
    lora_b = [name for name in before if "lora_B" in name]
    assert lora_b, "no LoRA B matrices found"
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(before[name]) == 0  # peft initialises B to zero...
            assert not torch.equal(param.detach(), before[name]), f"{name} did not train"  # ...so this is real
        elif "lora_" not in name:
            assert torch.equal(param.detach(), before[name]), f"base weight {name} changed"
