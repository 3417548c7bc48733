"""The fault scenarios reuse the vLLM fixtures of tests/integration (tiny model, LoRA adapters,
the forwarding FaultProxy, scripts/serve.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

INTEGRATION = str(Path(__file__).resolve().parents[1] / "integration")
if INTEGRATION not in sys.path:
    sys.path.insert(0, INTEGRATION)
