#!/usr/bin/env bash
# `make docs`: build the documentation site (MkDocs Material, strict: any warning fails) into site/.
# The toolchain lives in its own environment, .venv-docs, built from requirements/docs.lock with
# uv, the way scripts/setup.sh builds the others (and rebuilt only when the lock file changes).
#   scripts/docs.sh          build the site into site/
#   scripts/docs.sh serve    live preview on http://127.0.0.1:8001
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
UV_VERSION=0.13.9
TOOLS=.tools
DIR=.venv-docs
LOCK=requirements/docs.lock

log() { printf '[docs] %s\n' "$*"; }

if [[ ! -x "$TOOLS/bin/uv" ]] || [[ "$("$TOOLS/bin/uv" --version | awk '{print $2}')" != "$UV_VERSION" ]]; then
  log "installing uv $UV_VERSION into $TOOLS/"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet "uv==$UV_VERSION"
fi
UV="$TOOLS/bin/uv"

want=$(sha256sum "$LOCK" | cut -c1-16)
if [[ ! -f "$DIR/.tuneloop-stamp" || "$(cat "$DIR/.tuneloop-stamp")" != "$want" ]]; then
  log "building $DIR from $LOCK"
  [[ -x "$DIR/bin/python" ]] || "$UV" venv --quiet --python "$PYTHON" "$DIR"
  VIRTUAL_ENV="$PWD/$DIR" "$UV" pip sync --quiet "$LOCK"
  echo "$want" > "$DIR/.tuneloop-stamp"
fi

if [[ "${1:-}" == "serve" ]]; then
  NO_MKDOCS_2_WARNING=1 exec "$DIR/bin/mkdocs" serve --strict --dev-addr 127.0.0.1:8001
fi
NO_MKDOCS_2_WARNING=1 "$DIR/bin/mkdocs" build --strict --clean --site-dir site
log "site built: site/index.html"
