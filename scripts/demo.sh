#!/usr/bin/env bash
# `make demo`: the whole loop on the invoice example (examples/invoices/tuneloop.yaml: the embedded
# defaults plus the example's task; tiny local model, local store, SQLite, CPU),
# with real parts: the vLLM OpenAI server (CPU build), Airflow 3 running the DAGs, Great
# Expectations. Starts from a fresh demo world each time (the built model is cached).
#   KEEP_RUNNING=1 make demo   leaves vLLM up afterwards (stop: scripts/serve.sh stop)
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
cd "$ROOT"
export TUNELOOP_CONFIG="${TUNELOOP_CONFIG:-$ROOT/examples/invoices/tuneloop.yaml}"
TL="$ROOT/.venv/bin/tuneloop"
# 150 steps per adapter keep the demo under 20 minutes on 2 cores: enough for v1 to learn the
# answer's schema and the per-domain constants (currency, VAT id presence), and for v2, which
# warm-starts from v1, to learn the drifted domain's without forgetting the original's. The
# default (8 epochs, ~600 steps here) is what this small CPU model needs to start copying values.
export TUNELOOP__TRAINING__MAX_STEPS="${TUNELOOP__TRAINING__MAX_STEPS:-150}"
# smaller consistency and latency suites than the defaults (20 prompts x 5 samples, 20
# requests): on 2 CPU cores each evaluation would otherwise take minutes longer
export TUNELOOP__EVAL__CONSISTENCY_PROMPTS="${TUNELOOP__EVAL__CONSISTENCY_PROMPTS:-8}"
export TUNELOOP__EVAL__CONSISTENCY_SAMPLES="${TUNELOOP__EVAL__CONSISTENCY_SAMPLES:-3}"
export TUNELOOP__EVAL__LATENCY_REQUESTS="${TUNELOOP__EVAL__LATENCY_REQUESTS:-10}"
# each refresh is also an MLflow run in .tuneloop/mlflow.db (`make mlflow` opens it)
export TUNELOOP__TRACKING__MLFLOW="${TUNELOOP__TRACKING__MLFLOW:-true}"
START=$(date +%s)
step() { printf '\n\033[1m== [%3ss] %s\033[0m\n' "$(( $(date +%s) - START ))" "$*"; }

started_vllm=0
cleanup() {
  if [[ $started_vllm == 1 && "${KEEP_RUNNING:-0}" != 1 ]]; then
    bash scripts/serve.sh stop || true
  fi
}
trap cleanup EXIT

step "fresh demo world: 42 days of original-domain traffic and labels (2026-01-01 .. 2026-02-11)"
rm -rf .tuneloop/store .tuneloop/served-adapters .tuneloop/adapters .tuneloop/evals "$AIRFLOW_HOME"
"$TL" demo-world --example invoices --start 2026-01-01 --days 42 --labelled-per-day 36 --heldout-per-slice 150 --bad-row-rate 0.02

step "demo base model (built once, then cached) while Airflow prepares its database"
airflow_prepare > .tuneloop/demo-airflow-prepare.log 2>&1 &
prepare_pid=$!
"$TL" build-model
wait "$prepare_pid" || { tail -40 .tuneloop/demo-airflow-prepare.log; echo "Airflow preparation failed; log: .tuneloop/demo-airflow-prepare.log"; exit 1; }
echo "Airflow database, connections, pools and variables ready (.tuneloop/demo-airflow-prepare.log)"

step "vLLM OpenAI server (CPU build) with runtime LoRA updating"
if bash scripts/serve.sh status >/dev/null 2>&1; then
  echo "vLLM already running; using it"
else
  bash scripts/serve.sh start
  started_vllm=1
fi

step "bootstrap v1: tuneloop_refresh on the original domain (airflow dags test)"
airflow dags test tuneloop_refresh 2026-02-12 -c '{"force": true}' > .tuneloop/demo-refresh-v1.log 2>&1 \
  || { tail -60 .tuneloop/demo-refresh-v1.log; echo "bootstrap refresh failed; full log: .tuneloop/demo-refresh-v1.log"; exit 1; }
grep -E "gate: |registry: |verified: " .tuneloop/demo-refresh-v1.log | sed 's/^.*\(gate: \|registry: \|verified: \)/  \1/' || true

step "the world drifts: 21 more days, drifted-domain documents ramp up from 2026-02-12"
"$TL" demo-world --example invoices --start 2026-02-12 --days 21 --labelled-per-day 36 --heldout-per-slice 150 --drift-start 2026-02-12 --bad-row-rate 0.03

step "tuneloop_drift_monitor (airflow dags test)"
airflow dags test tuneloop_drift_monitor 2026-03-05 > .tuneloop/demo-drift.log 2>&1 \
  || { tail -60 .tuneloop/demo-drift.log; echo "drift monitor failed; full log: .tuneloop/demo-drift.log"; exit 1; }
grep -E "drift decision:" .tuneloop/demo-drift.log | sed 's/^.*drift decision:/  drift decision:/' || true

step "tuneloop_refresh on the drifted data (as the drift asset event would trigger it)"
airflow dags test tuneloop_refresh 2026-03-05 > .tuneloop/demo-refresh-v2.log 2>&1 \
  || { tail -60 .tuneloop/demo-refresh-v2.log; echo "refresh failed; full log: .tuneloop/demo-refresh-v2.log"; exit 1; }

step "summary (logs in .tuneloop/demo-*.log)"
"$TL" status
if [[ -x /usr/bin/chromium && "${DEMO_SCREENSHOT:-1}" == 1 ]]; then
  step "the tuneloop view in the Airflow UI, screenshot in headless Chromium"
  "$ROOT/.venv/bin/python" scripts/screenshot_ui.py --store .tuneloop/store --out .tuneloop/screenshots > .tuneloop/demo-screenshot.log 2>&1 \
    && echo "  .tuneloop/screenshots/tuneloop-view.png (the page) and airflow-ui-tuneloop-nav.png (inside the Airflow UI)" \
    || echo "  screenshot failed (the demo itself succeeded); log: .tuneloop/demo-screenshot.log"
fi
echo
echo "demo finished in $(( $(date +%s) - START ))s; store: .tuneloop/store; Airflow UI with the tuneloop view: make airflow;"
echo "each refresh as an MLflow run (dataset, loss curves, gate statistics, report, aliases): make mlflow"
