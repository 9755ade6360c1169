#!/usr/bin/env bash
# Runs the trainer's pytest suite with Debian's python3 (or $PYTHON); scripts/prerequisites.sh installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python.sh
if ! "$PY" -c "import $PY_MODULES" >/dev/null 2>&1; then
  echo "$PY cannot import $PY_MODULES: run 'bash scripts/prerequisites.sh' (or npm test), or set PYTHON" >&2
  exit 1
fi
export OMP_WAIT_POLICY=PASSIVE
exec "$PY" -m pytest "$@"  # pyproject.toml: testpaths trainer/tests, -q
