"""Names and URIs of the Airflow Assets that chain the loop's stages.

Plain strings so this package never imports Airflow; the DAG files turn them into
``airflow.sdk.Asset`` objects. An external system records a drift event by posting to the
Airflow REST API with ``DRIFT_ASSET_URI`` (see docs/airflow.md).
"""

from __future__ import annotations

DRIFT = ("tuneloop_drift", "tuneloop://loop/drift")
SNAPSHOT = ("tuneloop_dataset_snapshot", "tuneloop://loop/dataset-snapshot")
ADAPTER = ("tuneloop_candidate_adapter", "tuneloop://loop/candidate-adapter")
EVAL_REPORT = ("tuneloop_eval_report", "tuneloop://loop/eval-report")
PRODUCTION = ("tuneloop_production_adapter", "tuneloop://loop/production-adapter")

DRIFT_ASSET_URI = DRIFT[1]
