#!/usr/bin/env bash
# `make airflow`: Airflow 3 standalone (scheduler, dag processor, API server + UI, triggerer)
# on http://localhost:8080 with tuneloop's DAGs, low parallelism, and airflow_settings.yaml
# applied. Login: admin / admin (TUNELOOP_AIRFLOW_PASSWORD to change). Ctrl-C stops it all.
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
echo "[airflow] home $AIRFLOW_HOME; preparing database and settings"
airflow_prepare
echo "[airflow] starting standalone on http://localhost:$AIRFLOW__API__PORT (user ${TUNELOOP_AIRFLOW_USER:-admin})"
exec airflow standalone
