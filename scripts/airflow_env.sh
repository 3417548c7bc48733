# Sourced by the Airflow scripts: a self-contained local Airflow home under .tuneloop/airflow.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TUNELOOP_HOME="$ROOT"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.tuneloop/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="${AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG:-4}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=True
export AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${TUNELOOP_AIRFLOW_USER:-admin}:admin"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$AIRFLOW_HOME/simple_auth_manager_passwords.json"
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}"
export AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK=True
export AIRFLOW__API__PORT="${TUNELOOP_AIRFLOW_PORT:-8080}"
export GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PATH="$ROOT/.venv/bin:$PATH"

# Apply airflow_settings.yaml (Astro format) with the stock CLI imports.
airflow_apply_settings() {
  local out="$AIRFLOW_HOME/imports"
  mkdir -p "$out"
  "$ROOT/.venv/bin/python" "$ROOT/scripts/airflow_settings.py" "$ROOT/airflow_settings.yaml" "$out"
  airflow connections import --overwrite "$out/connections.json" >/dev/null
  airflow pools import "$out/pools.json" >/dev/null
  airflow variables import --action-on-existing-key overwrite "$out/variables.json" >/dev/null
}

airflow_prepare() {
  mkdir -p "$AIRFLOW_HOME"
  local password="${TUNELOOP_AIRFLOW_PASSWORD:-admin}"
  printf '{"%s": "%s"}\n' "${TUNELOOP_AIRFLOW_USER:-admin}" "$password" > "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
  airflow db migrate >/dev/null
  airflow_apply_settings
}
