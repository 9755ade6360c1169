#!/usr/bin/env bash
# Run by `npm test` before any test: checks the system packages the tests need and, as root, installs
# the missing ones with apt-get; otherwise prints the exact install line and exits 1. Then installs
# the Node dependencies when node_modules is missing or older than package-lock.json, so that a fresh
# clone needs nothing but `npm test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python.sh

missing=()
if ! "$PY" -c "import $PY_MODULES" >/dev/null 2>&1; then
  if [ -n "${PYTHON:-}" ]; then
    echo "PYTHON=$PYTHON cannot import $PY_MODULES: unset PYTHON to use Debian's /usr/bin/python3, or install them there" >&2
    exit 1
  fi
  missing+=(python3-torch python3-onnx python3-numpy python3-pytest python3-jsonschema)
fi
command -v "${REDIS_SERVER:-redis-server}" >/dev/null 2>&1 || missing+=(redis-server)
# Debian's torch falls back to the reference BLAS without OpenBLAS: training about 7x slower
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then
  missing+=(libopenblas0-pthread)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "The tests need system packages that are not installed. Install them, then run the tests again:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing the tests' system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  "$PY" -c "import $PY_MODULES" || { echo "$PY still cannot import $PY_MODULES after the install" >&2; exit 1; }
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "installing the Node dependencies (npm ci)" >&2
  # the variable too, not only .npmrc: npm 12 stops passing unknown .npmrc keys to install scripts
  ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund >&2
fi
