#!/usr/bin/env bash
# Runs the trainer's pytest suite with Debian's python3 (python3-torch, python3-onnx, python3-pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in /usr/bin/python3 python3; do
    if "$cand" -c "import torch, onnx, pytest" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "trainer tests need python3 with torch, onnx and pytest (Debian: apt-get install python3-torch python3-onnx python3-numpy python3-pytest)" >&2
  exit 1
fi
export OMP_WAIT_POLICY=PASSIVE
exec "$PY" -m pytest -q trainer/tests "$@"
