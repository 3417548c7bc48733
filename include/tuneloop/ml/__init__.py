"""The ML side, run in the ML environment (torch, transformers, peft, TRL): ``train`` (LoRA on
TRL's SFTTrainer), ``model`` (base model, warm start, QLoRA), ``training_data`` (rows as the
trainer sees them), ``checkpoint`` (resume), ``launch`` (several processes), ``evaluate``
(scoring and the suites' orchestration), ``backends`` (HF generate, the vLLM servers),
``suites`` (injection, consistency, golden, latency), ``chat`` (what a model's chat template
and layers say), and ``runner`` (how the orchestration env starts an ML step)."""

import logging

# bitsandbytes' CPU backend (imported by peft when installed) asks at import time for an optional
# ``kernels`` package that nothing here uses; keep that line out of every training log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
