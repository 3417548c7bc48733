"""
### tuneloop_refresh: pull, validate, train, gate and hot-swap a fresh LoRA adapter

Runs quarterly (03:00 UTC on the 1st of Jan/Apr/Jul/Oct) **or** whenever the drift asset
`tuneloop://loop/drift` gets an event (from `tuneloop_drift_monitor`, an Alertmanager/Grafana
webhook, or the REST API), **or** by hand with the params below.

`pull` -> `validate` (row checks + Great Expectations; bad rows quarantined with a reason;
the run fails with the counts when the batch fails its thresholds) -> content-addressed
snapshot -> `train` (LoRA in the isolated ML env, pool `gpu`) -> `evaluate` (candidate and
production on the held-out data of every slice) -> `gate` (paired bootstrap: better on the
improve slices, non-inferior elsewhere; report with a plot per slice, its location in the
log) -> `approve` (a human approves or rejects in Required Actions, only when
`gate.require_approval` or the `require_approval` param asks; otherwise it passes at once)
-> `deploy` (validate adapter, stage, verify, swap the stable name in place, roll back on
failure) -> `verify` -> `record` (registry aliases).
`reconcile_before` (setup) and `reconcile_after` (teardown, runs even when a step between
them failed) make every vLLM endpoint serve the registry's production version: after a
failed verify or registry write, the servers serve what the registry says again.
The vLLM endpoints and API key come from the config, or from the `tuneloop_vllm`
connection when it exists (host, or extra `{"endpoints": [...]}`; password = API key).
`train` runs on a worker of the `gpu` pool, and `train` and `evaluate` as one Kubernetes pod
each per run when the Airflow environment sets `TUNELOOP__TRAINING_RUNNER=kubernetes`; `TUNELOOP__ML_QUEUE=<queue>`
sends `train` and `evaluate` to the Celery/edge workers of that queue (the only settings read
while the file is parsed: the DAG's shape never depends on a config file or a Variable).

Logic lives in `include/tuneloop/steps/`; the task bodies in `include/tuneloop_airflow/tasks.py`;
this file is wiring.
"""

from __future__ import annotations

import os

from tuneloop_airflow.dags import refresh_dag

if not os.environ.get("TUNELOOP_LOOPS_DIR"):  # a loops folder replaces the single loop (dags/tuneloop_loops.py)
    refresh_dag(doc=__doc__)
