#!/usr/bin/env bash
# Start, stop or inspect the local vLLM OpenAI server (CPU) that tuneloop hot-swaps adapters into.
#
#   scripts/serve.sh start  [--port P] [--model DIR] [--name NAME[,NAME2...]] [--run-dir DIR] [--timeout S]
#   (several names: one fleet for several loops, the base model listed as NAME-base for each)
#   scripts/serve.sh stop   [--run-dir DIR]
#   scripts/serve.sh status [--run-dir DIR]
#
# Defaults come from the tuneloop settings (embedded defaults < TUNELOOP_CONFIG < TUNELOOP__*
# env vars): the port of vllm.endpoints[0], the demo model dir (model.demo_model_dir, built by
# `tuneloop build-model`) or model.base_model, model.served_model_name, vllm.max_lora_rank.
# The base model is served as NAME-base; clients call NAME, a LoRA adapter that the deploy
# step loads in place. The server binds 127.0.0.1, runs in its own process group (setsid),
# logs to RUN_DIR/vllm.log and keeps its pid in RUN_DIR/vllm.pid (RUN_DIR: .tuneloop).
# `start` and `stop` are idempotent. Prefix caching is off: cached blocks can outlive an
# in-place adapter reload (vllm #42125). The API key (vllm.api_key, i.e.
# TUNELOOP__VLLM__API_KEY) reaches vLLM through its environment, so it never shows in `ps`.
set -euo pipefail
caller_dir="$PWD"
cd "$(dirname "$0")/.."

# Paths given on the command line are relative to where the caller stands, not the repo.
from_caller() { [[ "$1" == /* ]] && echo "$1" || echo "$caller_dir/$1"; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}

action="${1:-}"
[[ -n "$action" ]] || usage
[[ "$action" == "-h" || "$action" == "--help" ]] && usage 0
shift
port=""
host="127.0.0.1"
model=""
name=""
max_lora_rank=""
api_key=""
run_dir=".tuneloop"
timeout_s="${TUNELOOP_SERVE_TIMEOUT:-300}"
python="${TUNELOOP_ML_PYTHON:-.venv-ml/bin/python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --model) model="$(from_caller "$2")"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --run-dir) run_dir="$(from_caller "$2")"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --max-lora-rank) max_lora_rank="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "serve.sh: unknown option $1" >&2; usage ;;
  esac
done
pid_file="$run_dir/vllm.pid"
url_file="$run_dir/vllm.url"
log_file="$run_dir/vllm.log"

say() { echo "[serve] $*" >&2; }

# Fill what no flag set from the tuneloop settings (shell assignments, values quoted).
load_settings() {
  local assignments
  if ! assignments="$("$python" - <<'PY'
import shlex
import sys
from urllib.parse import urlsplit

from tuneloop.config import ConfigError, load_settings

try:
    s = load_settings()
except ConfigError as err:
    sys.exit(f"[serve] {err}")
values = {
    "cfg_port": urlsplit(s.vllm.endpoints[0]).port or 8000,
    "cfg_model": s.model.demo_model_dir if s.model.base_model == "demo" else s.model.base_model,
    "cfg_name": s.model.served_model_name,
    "cfg_rank": s.vllm.max_lora_rank,
    "cfg_key": s.vllm.api_key.get_secret_value() if s.vllm.api_key else "",
}
for key, value in values.items():
    print(f"{key}={shlex.quote(str(value))}")
PY
)"; then
    say "could not read the tuneloop settings (see above)"
    return 2
  fi
  local cfg_port cfg_model cfg_name cfg_rank cfg_key
  eval "$assignments"
  port="${port:-$cfg_port}"
  model="${model:-$cfg_model}"
  name="${name:-$cfg_name}"
  max_lora_rank="${max_lora_rank:-$cfg_rank}"
  api_key="$cfg_key"
}

# The pid in the pid file if that process is alive and is a vLLM server; else nothing.
running_pid() {
  [[ -f "$pid_file" ]] || return 0
  local pid
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "vllm.entrypoints"; then
    echo "$pid"
  fi
}

healthy() { curl -sf -o /dev/null --max-time 5 "$1/health"; }

port_in_use() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

log_tail() {
  say "last 30 lines of $log_file:"
  tail -n 30 "$log_file" >&2 || true
}

start() {
  local url pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    say "vLLM is already running (pid $pid) at $(cat "$url_file" 2>/dev/null || echo '?'); log: $log_file"
    return 0
  fi
  if [[ ! -x "$python" ]]; then
    say "no Python at $python: build the environments with \`make setup\` (or set TUNELOOP_ML_PYTHON)"
    return 2
  fi
  load_settings || return 2
  url="http://$host:$port"
  if [[ ! -f "$model/config.json" ]]; then
    say "no base model at $model: build the demo model with \`tuneloop build-model\` (or pass --model DIR)"
    return 2
  fi
  if port_in_use; then
    say "port $port on $host is already in use by another process: stop it or pick another with --port"
    return 2
  fi
  model="$(cd "$model" && pwd)"
  mkdir -p "$run_dir"
  [[ -f "$log_file" ]] && mv -f "$log_file" "$log_file.prev"
  local -a env_vars=(
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
    HF_HUB_OFFLINE=1
    VLLM_NO_USAGE_STATS=1
    DO_NOT_TRACK=1
    VLLM_ENABLE_V1_MULTIPROCESSING=0
  )
  if [[ -n "$api_key" ]]; then
    env_vars+=(VLLM_API_KEY="$api_key")
  fi
  local -a args=(
    -m vllm.entrypoints.openai.api_server
    --model "$model" --served-model-name ${name//,/-base }-base
    --enable-lora --max-lora-rank "$max_lora_rank" --max-loras 2 --max-cpu-loras 4
    --dtype float32 --max-model-len 512 --no-enable-prefix-caching
    --host "$host" --port "$port"
  )
  say "starting vLLM: $model as $name-base at $url (log: $log_file)"
  # A background job of a non-interactive shell is no group leader, so setsid makes the new
  # session in place (no fork): $! is the server's pid and its process group id.
  env "${env_vars[@]}" setsid "$python" "${args[@]}" >>"$log_file" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"
  echo "$url" >"$url_file"
  local started=$SECONDS next_note=$((SECONDS + 10))
  until healthy "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "vLLM exited during start-up (pid $pid)"
      log_tail
      rm -f "$pid_file" "$url_file"
      return 1
    fi
    if (( SECONDS - started >= timeout_s )); then
      say "vLLM did not become healthy within ${timeout_s} s; stopping it"
      log_tail
      stop >/dev/null 2>&1 || true
      return 1
    fi
    if (( SECONDS >= next_note )); then
      say "waiting for vLLM at $url/health ... $((SECONDS - started)) s (log: $log_file)"
      next_note=$((SECONDS + 10))
    fi
    sleep 1
  done
  say "vLLM ready at $url in $((SECONDS - started)) s (pid $pid); base model: $name-base; stop: scripts/serve.sh stop"
}

stop() {
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    say "vLLM is not running"
    rm -f "$pid_file" "$url_file"
    return 0
  fi
  say "stopping vLLM (pid $pid and its process group)"
  # The API server shuts its engine process down itself; signalling the whole group at once
  # kills the engine under it (EngineDeadError in the log). The group is the fallback.
  kill -TERM "$pid" 2>/dev/null || true
  local waited=0
  while kill -0 -- "-$pid" 2>/dev/null; do
    if (( waited == 20 )); then
      say "still running after 20 s: signalling process group $pid"
      kill -TERM -- "-$pid" 2>/dev/null || true
    elif (( waited >= 30 )); then
      say "still running after 30 s: killing process group $pid"
      kill -KILL -- "-$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 1
    waited=$((waited + 1))
  done
  rm -f "$pid_file" "$url_file"
  say "stopped"
}

status() {
  local pid url
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    say "vLLM is not running (pid file: $pid_file)"
    return 1
  fi
  url="$(cat "$url_file" 2>/dev/null || echo "http://$host:${port:-8000}")"
  if ! healthy "$url"; then
    say "vLLM process $pid is up but $url/health does not answer 200 (starting, or broken: see $log_file)"
    return 3
  fi
  say "vLLM is running (pid $pid) at $url; log: $log_file"
  load_settings 2>/dev/null || true
  # The key goes to curl as a config file on stdin, not as an argument that `ps` shows.
  local models
  if models="$({ [[ -n "$api_key" ]] && printf 'header = "Authorization: Bearer %s"\n' "$api_key"; true; } \
    | curl -sf --max-time 5 -K - "$url/v1/models")"; then
    "$python" -c 'import json, sys
for m in json.load(sys.stdin)["data"]:
    print("  " + m["id"].ljust(24) + " " + str(m.get("root")) + (" (adapter)" if m.get("parent") else " (base)"))' <<<"$models"
  else
    say "could not list the models (does the server want an API key? set TUNELOOP__VLLM__API_KEY)"
  fi
}

case "$action" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
