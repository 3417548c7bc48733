"""The ML side, run in the ML environment (torch, transformers, peft): ``train`` (the LoRA
trainer), ``evaluate`` (scoring and the suites' orchestration), ``backends`` (HF generate, the
vLLM servers), ``suites`` (injection, consistency, golden, latency), ``chat`` (what a model's
chat template and layers say), and ``runner`` (how the orchestration env starts an ML step)."""
