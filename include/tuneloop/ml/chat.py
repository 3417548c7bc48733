"""What a base model's chat template and layers say, for any Hugging Face causal LM.

* :func:`template_stop_tokens`: the end-of-turn token the chat template writes after an
  assistant message (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``...),
  found by rendering a probe conversation, so generation stops where a turn ends whatever the
  model family;
* :func:`resolve_target_modules`: LoRA ``target_modules`` with peft's ``all-linear`` spelled out
  as the model's own linear layer names (what vLLM's LoRA loader checks against).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

PROBE_ANSWER = "XYZZY"
"""An assistant message no template rewrites; the text after it is what ends a turn."""

ALL_LINEAR = "all-linear"


def _special_tokens(tokenizer: Any) -> set[str]:
    """Every special token and added token the tokenizer knows (strings)."""
    tokens = {str(token) for token in getattr(tokenizer, "all_special_tokens", []) or []}
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        tokens.update(str(token) for token in added())
    return {token for token in tokens if token}


def template_stop_tokens(tokenizer: Any) -> list[str]:
    """The special token(s) the chat template writes right after an assistant message.

    Renders ``user: hi / assistant: XYZZY`` and looks at the text right after ``XYZZY``: when
    it starts with a special (or added) token, that token ends a turn and generation should
    stop there. Returns ``[]`` when there is no template, it cannot render the probe, or plain
    text follows the answer.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may raise anything (raise_exception, jinja errors...)
        return []
    if not isinstance(text, str) or PROBE_ANSWER not in text:
        return []
    after = text[text.rindex(PROBE_ANSWER) + len(PROBE_ANSWER) :]
    # The longest match wins: "<|end|>" must not shadow "<|endoftext|>".
    for token in sorted(_special_tokens(tokenizer), key=len, reverse=True):
        if after.startswith(token):
            return [token]
    return []


def _output_head_names(model: Any) -> set[str]:
    """Qualified names of the output embedding (``lm_head``), which LoRA never targets."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def resolve_target_modules(model: Any, names: Sequence[str]) -> list[str]:
    """``names`` with ``all-linear`` replaced by the leaf names of the model's linear layers.

    peft's ``all-linear`` means every ``nn.Linear`` (and transformers' ``Conv1D``) except the
    output head; spelling it out (``q_proj``, ``qkv_proj``, ``gate_up_proj``, ...) puts the real
    names in ``adapter_config.json`` and gives a clear error where a name fits nothing. Other
    names are kept as given, in order, without duplicates.
    """
    import torch

    resolved: list[str] = []
    for name in names:
        if name != ALL_LINEAR:
            if name not in resolved:
                resolved.append(name)
            continue
        linear: tuple[type, ...] = (torch.nn.Linear,)
        try:
            from transformers.pytorch_utils import Conv1D

            linear = (torch.nn.Linear, Conv1D)
        except ImportError:  # pragma: no cover - transformers always has it today
            pass
        head = _output_head_names(model)
        for qualified, module in model.named_modules():
            if qualified in head or not isinstance(module, linear):
                continue
            leaf = qualified.rsplit(".", 1)[-1]
            if leaf not in resolved and leaf != "lm_head":
                resolved.append(leaf)
    return resolved
