"""The model the trainer fits: the base model checked and loaded (a local directory or a hub id in
the local cache), fresh LoRA matrices on ``training.target_modules`` (``all-linear`` spelled out
as the model's own layer names) or a warm start from an adapter, the device and precision
(bf16 autocast on a GPU or a CPU with native bf16), and the attention kernels that keep a GPU busy."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.ml.training_data import (
    TrainingError,
)

if TYPE_CHECKING:

    import os

    from tuneloop.config import TrainingSettings


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_base_model(base_model: str | os.PathLike[str]) -> None:
    """A local base model must be a directory with config.json; say how to get one if not."""
    text = str(base_model)
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrainingError(
                f"base model directory {path} has no config.json: it is not a saved model "
                "(run `tuneloop build-model` to build the demo model there)"
            )
        return
    if path.exists():
        raise TrainingError(f"base model {path} is a file; expected a model directory")
    if _HUB_ID.match(text) and not text.startswith("."):
        return  # a hub id: transformers resolves it (needs network or a warm local cache)
    raise TrainingError(
        f"base model directory {path} does not exist: run `tuneloop build-model` "
        "(or set model.base_model to a local model directory or a hub id)"
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as torch reports it.

    Without them bf16 matrix products are emulated, so ``dtype: auto`` stays at float32 there.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` -> cuda + bfloat16 when a GPU is present, else cpu with bfloat16 autocast
    where the CPU has native bf16 and float32 where it has not."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no CUDA GPU; use device: auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "float32"
    return device, dtype


def check_init_adapter(init_adapter: str | os.PathLike[str], base_model: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter to warm-start from, if it fits ``base_model``.

    Warm-starting continues training from an existing adapter (the one in production) instead
    of fresh LoRA matrices: the candidate keeps what production knows and needs fewer steps to
    learn the new data. The adapter's own rank, alpha and target modules are kept.
    """
    path = Path(init_adapter)
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingError(f"cannot warm-start from {path}: no readable adapter_config.json ({err})") from err
    if not (path / "adapter_model.safetensors").is_file():
        raise TrainingError(f"cannot warm-start from {path}: no adapter_model.safetensors")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise TrainingError(f"cannot warm-start from {path}: peft_type {config.get('peft_type')!r} is not LORA")
    trained_on = str(config.get("base_model_name_or_path") or "")
    if trained_on and Path(trained_on).name != Path(str(base_model)).name:
        raise TrainingError(
            f"cannot warm-start from {path}: it was trained on base model {trained_on!r}, "
            f"not {str(base_model)!r}; set training.init_from: none to train from scratch"
        )
    return config


def load_lora_model(
    base_model: str | os.PathLike[str],
    settings: TrainingSettings,
    device: str,
    dtype: str,
    *,
    init_adapter: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """(peft model with trainable LoRA matrices on ``device``, tokenizer) for ``base_model``.

    The LoRA matrices are fresh, or a copy of ``init_adapter``'s (see ``check_init_adapter``).
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.ml.chat import resolve_target_modules

    # Base weights in the compute dtype on GPU (memory); fp32 on CPU. LoRA weights stay fp32.
    load_dtype = getattr(torch, dtype) if device == "cuda" else torch.float32
    quantized = _quantization(settings, device, load_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=load_dtype, **quantized)
    except OSError as err:
        raise TrainingError(
            f"cannot load base model {base_model!r}: {err}\n"
            "A hub id needs network access or a copy in the local cache (HF_HUB_OFFLINE=1 forbids "
            "downloads); for the demo model run `tuneloop build-model`."
        ) from err
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    if init_adapter is not None:
        check_init_adapter(init_adapter, base_model)
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_model)
        if not quantized:
            peft_model.to(device)
        return peft_model, tokenizer
    alpha = settings.lora_alpha
    lora_config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=resolve_target_modules(model, settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise TrainingError(
            f"target_modules {settings.target_modules} do not fit this model ({err}); "
            f"its modules include {names[:30]}"
        ) from err
    # What vLLM and PeftModel.from_pretrained read to find the base model.
    peft_model.peft_config["default"].base_model_name_or_path = str(base_model)
    if not quantized:
        peft_model.to(device)
    return peft_model, tokenizer


def _quantization(settings: TrainingSettings, device: str, compute_dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments of ``training.quantization``: QLoRA's 4-bit NF4 base model
    (double quantisation, compute in the training dtype) with bitsandbytes, or nothing."""
    if settings.quantization == "none":
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise TrainingError("training.quantization: 4bit needs bitsandbytes in the training environment (pip install 'tuneloop[qlora]' or bitsandbytes)") from err
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
    )
    import os

    place = int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else "cpu"  # bitsandbytes' CPU backend runs the tests
    return {"quantization_config": config, "device_map": {"": place}}


def _fast_kernels(model: Any, device: str, *, mixed: bool) -> contextlib.ExitStack:
    """What a step needs to keep the GPU busy; numerically the same as without.

    - No cuDNN attention: for the varying shapes of packed and length-grouped batches its
      per-call planning cost ~10 ms of CPU per layer on an H100 (torch 2.11), which left the
      GPU idle most of the step; the flash and memory-efficient kernels have no such cost.
    - Under autocast, peft's cast of each LoRA layer's input to the fp32 adapter dtype is
      skipped: autocast casts it straight back to bf16 for the matmul, so the two copies of
      every activation were pure memory traffic.
    """
    stack = contextlib.ExitStack()
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    if mixed:
        try:
            from peft.helpers import disable_input_dtype_casting
        except ImportError:  # older peft: keep its casts
            return stack
        stack.enter_context(disable_input_dtype_casting(model))
    return stack
