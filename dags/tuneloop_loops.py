"""
### Many loops: one set of tuneloop DAGs per loop config in `$TUNELOOP_LOOPS_DIR`

Each `<id>.yaml` in the folder is one loop (one adapter: its task, its store, its served name)
and gets `tuneloop_<id>_drift_monitor`, `tuneloop_<id>_refresh`, `tuneloop_<id>_rollback` and
`tuneloop_<id>_reconcile`, with its own assets (`tuneloop://<id>/drift`...) and vLLM connection
(`tuneloop_vllm_<id>`, when defined). Loops may share a vLLM fleet: each swaps only its own
served name, and the fleet lease serialises their swaps. Without `$TUNELOOP_LOOPS_DIR` this
file defines nothing and the four plain DAG files define the single loop.
"""

from __future__ import annotations

import os

from tuneloop_airflow.dags import BUILDERS
from tuneloop_airflow.loops import LOOPS_DIR_ENV, loops_in

if os.environ.get(LOOPS_DIR_ENV):
    for loop in loops_in(os.environ[LOOPS_DIR_ENV]):
        for build in BUILDERS:
            build(loop)
