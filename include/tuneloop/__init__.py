"""tuneloop: keep a LoRA-tuned LLM fresh (drift -> data -> train -> gate -> hot-swap)."""

from __future__ import annotations

__version__ = "0.1.0"
