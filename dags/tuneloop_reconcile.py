"""
### tuneloop_reconcile: the vLLM servers serve what the registry says, every 10 minutes

For every endpoint of `vllm.endpoints`: if the stable served name already serves the
registry's production adapter, check that it answers; else (a vLLM restarted and forgot its
runtime adapters, a failed deploy left another adapter) load production in place and check.
A server that is down fails the task with one line naming it; the next run, once the server
answers again, brings production back. While a deploy or rollback holds the fleet it does
nothing (that deploy ends in a reconcile of its own). The same as `tuneloop reconcile --if-idle`.
"""

from __future__ import annotations

import os

from tuneloop_airflow.dags import reconcile_dag

if not os.environ.get("TUNELOOP_LOOPS_DIR"):  # a loops folder replaces the single loop (dags/tuneloop_loops.py)
    reconcile_dag(doc=__doc__)
