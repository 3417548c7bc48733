"""Convert airflow_settings.yaml (the Astro CLI format) into the stock CLI's import files.

`astro dev start` reads airflow_settings.yaml itself; stock Airflow has no loader, so
`make airflow` writes connections.json / pools.json / variables.json and runs
`airflow connections|pools|variables import` on them.
Usage: python scripts/airflow_settings.py airflow_settings.yaml OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def convert(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    airflow = (settings or {}).get("airflow") or {}
    connections = {}
    for conn in airflow.get("connections") or []:
        entry: dict[str, Any] = {"conn_type": conn["conn_type"]}
        for field in ("host", "login", "password", "schema", "port", "description"):
            value = conn.get(f"conn_{field}")
            if value not in (None, ""):
                entry[field] = value
        if conn.get("conn_extra"):
            entry["extra"] = json.dumps(conn["conn_extra"])
        connections[conn["conn_id"]] = entry
    pools = {
        pool["pool_name"]: {"slots": int(pool["pool_slot"]), "description": pool.get("pool_description", ""), "include_deferred": False}
        for pool in airflow.get("pools") or []
    }
    variables = {var["variable_name"]: var["variable_value"] for var in airflow.get("variables") or []}
    return {"connections": connections, "pools": pools, "variables": variables}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, out_dir = Path(argv[1]), Path(argv[2])
    files = convert(yaml.safe_load(source.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out_dir / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in files.items())} to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
