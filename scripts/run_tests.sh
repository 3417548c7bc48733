#!/usr/bin/env bash
# Run the suite in both environments: .venv (Airflow, storage, data, stats) and .venv-ml
# (torch/peft/vLLM: tests marked `ml`). Each run must collect tests: an empty run is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GX_ANALYTICS_ENABLED=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
status=0
echo "== orchestration env (.venv): unit, dags, integration =="
.venv/bin/python -m pytest -m "not ml" "$@" || status=$?
echo "== training/serving env (.venv-ml): tests marked ml =="
.venv-ml/bin/python -m pytest -m "ml" "$@" || status=$((status ? status : $?))
exit "$status"
