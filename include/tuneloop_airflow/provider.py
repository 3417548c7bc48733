"""tuneloop as an Airflow provider, as Airflow's providers manager discovers one: the
``apache_airflow_provider`` entry point of the ``tuneloop`` distribution returns
:func:`get_provider_info`.

It registers the ``tuneloop://`` asset scheme with an OpenLineage converter, so that the
OpenLineage provider turns the loop's assets into OpenLineage datasets (namespace
``tuneloop://<loop>``, name the stage: ``traffic``, ``labelled``, ``dataset-snapshot``,
``candidate-adapter``, ``eval-report``, ``production-adapter``, ``drift``) and a lineage tool
(Marquez, DataHub...) draws traffic -> snapshot -> adapter -> eval report -> production from
the tasks' inlets and outlets. Without the OpenLineage provider nothing here runs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

SCHEME = "tuneloop"


def get_provider_info() -> dict[str, Any]:
    uris = [{"schemes": [SCHEME], "handler": None, "to_openlineage_converter": f"{__name__}.convert_asset_to_openlineage"}]
    return {
        "package-name": "tuneloop",
        "name": "tuneloop",
        "description": "Keeps a LoRA-tuned LLM fresh: the tuneloop:// assets of its DAGs, for OpenLineage.",
        "asset-uris": uris,
        "dataset-uris": uris,  # the key Airflow 2 providers managers read
    }


def convert_asset_to_openlineage(asset: Any, lineage_context: Any) -> Any:
    """``tuneloop://<loop>/<stage>`` -> an OpenLineage dataset (namespace ``tuneloop://<loop>``)."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    parts = urlsplit(asset.uri)
    return Dataset(namespace=f"{SCHEME}://{parts.netloc}", name=parts.path.strip("/") or "/")
