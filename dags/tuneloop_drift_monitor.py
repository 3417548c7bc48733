"""
### tuneloop_drift_monitor: is production traffic still what the adapter was trained on?

Daily. Compares the last `drift.current_days` of production traffic with the training data
of the adapter in production, using a calibrated two-sample test (`include/tuneloop/drift.py`),
and, when labelled rows newer than production's data exist, production's score on them against
its score at promotion (performance drift). Every check is stored in the store under
`drift/checks/` with a history plot (`drift/history.png`). When drift persists over
`drift.consecutive_checks` checks, or the score fell beyond `drift.performance_margin`, and the
last refresh's data is older than `drift.cooldown_days`, it records an event on the asset
`tuneloop://loop/drift`, which triggers `tuneloop_refresh`; the event carries the report.
"""

from __future__ import annotations

import os

from tuneloop_airflow.dags import drift_monitor_dag

if not os.environ.get("TUNELOOP_LOOPS_DIR"):  # a loops folder replaces the single loop (dags/tuneloop_loops.py)
    drift_monitor_dag(doc=__doc__)
