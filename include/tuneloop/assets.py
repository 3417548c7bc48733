"""Names and URIs of the Airflow Assets that chain the loop's stages.

Plain strings so this package never imports Airflow; the DAG files turn them into
``airflow.sdk.Asset`` objects, as the tasks' inlets and outlets, which the OpenLineage provider
turns into datasets (``tuneloop_airflow/provider.py``). An external system records a drift event by posting to the
Airflow REST API with ``DRIFT_ASSET_URI`` (see docs/airflow.md).
"""

from __future__ import annotations

TRAFFIC = ("tuneloop_traffic", "tuneloop://loop/traffic")  # inlet only: production traffic (drift monitor)
LABELLED = ("tuneloop_labelled", "tuneloop://loop/labelled")  # inlet only: labelled partitions (intake)
DRIFT = ("tuneloop_drift", "tuneloop://loop/drift")
SNAPSHOT = ("tuneloop_dataset_snapshot", "tuneloop://loop/dataset-snapshot")
ADAPTER = ("tuneloop_candidate_adapter", "tuneloop://loop/candidate-adapter")
EVAL_REPORT = ("tuneloop_eval_report", "tuneloop://loop/eval-report")
PRODUCTION = ("tuneloop_production_adapter", "tuneloop://loop/production-adapter")

DRIFT_ASSET_URI = DRIFT[1]


def for_loop(loop_id: str | None) -> dict[str, tuple[str, str]]:
    """The assets of one loop: the constants above for the single loop (``None``), and
    ``tuneloop_<id>_drift`` / ``tuneloop://<id>/drift``... for a loop of a loops folder.
    TRAFFIC and LABELLED are only ever inlets (for lineage: nothing schedules on them)."""
    stages = {
        "TRAFFIC": TRAFFIC, "LABELLED": LABELLED, "DRIFT": DRIFT, "SNAPSHOT": SNAPSHOT, "ADAPTER": ADAPTER,
        "EVAL_REPORT": EVAL_REPORT, "PRODUCTION": PRODUCTION,
    }
    if loop_id is None:
        return stages
    return {
        key: (name.replace("tuneloop_", f"tuneloop_{loop_id}_", 1), uri.replace("tuneloop://loop/", f"tuneloop://{loop_id}/", 1))
        for key, (name, uri) in stages.items()
    }
