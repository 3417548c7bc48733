"""Serving on vLLM: ``vllm_client`` (the OpenAI server and its runtime LoRA API), ``adapters``
(is this adapter servable on this base model?), ``deploy`` (the hot-swap, verification,
restore and reconcile), ``fleet_lock`` (one deploy at a time per fleet)."""
