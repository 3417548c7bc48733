#!/usr/bin/env bash
# Build the benchmark environment .venv-bench from requirements/bench.lock, with uv:
# Evidently (the reference drift library bench/drift_speed.py compares against) plus what
# tuneloop.drift needs, and tuneloop itself (editable, no deps). Kept apart from .venv:
# Evidently 0.7.23 needs pandas < 3 (the Airflow lock has 3.x) and ~40 packages the
# orchestration env does without. Not part of `make setup`.
# Idempotent: left alone while bench.lock and pyproject.toml are unchanged (same stamp as
# scripts/setup.sh uses for the other environments).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
UV_VERSION=0.13.9  # keep in step with scripts/setup.sh
TOOLS=.tools
DIR=.venv-bench
LOCK=requirements/bench.lock

log() { printf '[setup-bench] %s\n' "$*"; }

if [[ ! -x "$TOOLS/bin/uv" ]] || [[ "$("$TOOLS/bin/uv" --version | awk '{print $2}')" != "$UV_VERSION" ]]; then
  log "installing uv $UV_VERSION into $TOOLS/"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi
UV="$TOOLS/bin/uv"

want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16)
if [[ -f "$DIR/.tuneloop-stamp" && "$(cat "$DIR/.tuneloop-stamp")" == "$want" ]]; then
  log "$DIR is up to date ($LOCK)"; exit 0
fi
log "building $DIR from $LOCK"
[[ -x "$DIR/bin/python" ]] || "$UV" venv --quiet --python "$PYTHON" "$DIR"
VIRTUAL_ENV="$PWD/$DIR" "$UV" pip sync --quiet --compile-bytecode "$LOCK"
VIRTUAL_ENV="$PWD/$DIR" "$UV" pip install --quiet --compile-bytecode --no-deps -e .
echo "$want" > "$DIR/.tuneloop-stamp"
log "$DIR ready: $DIR/bin/python bench/drift_speed.py --help"
