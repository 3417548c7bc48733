#!/usr/bin/env bash
# Run the suite in both environments: .venv (Airflow, storage, data, stats) and .venv-ml
# (torch/peft/vLLM: tests marked `ml`), after ruff and mypy. Each run must collect tests: an empty run is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GX_ANALYTICS_ENABLED=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
status=0
if [ "$#" -eq 0 ]; then  # the whole suite (make test, CI) starts with the linters: seconds, and they catch what tests miss
    echo "== lint: ruff + mypy (make lint) =="
    .venv/bin/ruff check include dags plugins tests bench || status=$?
    .venv/bin/mypy || status=$((status ? status : $?))
fi
echo "== orchestration env (.venv): unit, dags, integration =="
.venv/bin/python -m pytest -m "not ml" "$@" || status=$?
echo "== training/serving env (.venv-ml): tests marked ml =="
.venv-ml/bin/python -m pytest -m "ml" "$@" || status=$((status ? status : $?))
exit "$status"
