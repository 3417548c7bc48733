"""
### tuneloop_rollback: serve an earlier adapter version again

Manual only. Validates the chosen version's adapter, hot-swaps it into every vLLM endpoint
(staged, verified, with automatic restore on failure), checks the stable name answers from
it, and moves the registry aliases (`production` <- the version, `previous` <- what was
production). Param `version`: a version (`v3`) or an alias (`previous`, the default).
If the check or the registry write fails after the swap, every endpoint is reconciled back
to the registry's production version before the task fails.
"""

from __future__ import annotations

import os

from tuneloop_airflow.dags import rollback_dag

if not os.environ.get("TUNELOOP_LOOPS_DIR"):  # a loops folder replaces the single loop (dags/tuneloop_loops.py)
    rollback_dag(doc=__doc__)
