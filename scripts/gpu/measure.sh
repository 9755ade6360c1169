#!/usr/bin/env bash
# The prepared GPU measurement (docs/gpu.md), run THERE after scripts/gpu/stage.sh has unpacked every
# piece, in ONE device call that carries out/gpu-carry/bundle:
#
#   bash scripts/gpu/measure.sh                    CUDA, SD1.5 architecture, 512², 25 steps, CFG 7.5
#   bash scripts/gpu/measure.sh --cpu --tiny       the same script end to end on a CPU with tiny models
#                                                  (the dry run, here; stage the pieces locally first)
#   … --phases build,engine,torch,train            a subset (build is reused while /tmp survives)
#   … --background                                 the build alone, detached (scripts/gpu/stage.sh starts
#                                                  it with setsid during the staging calls); a later
#                                                  measure.sh waits for it and reuses what it built
#
# Phases: env (versions, GPU, what the CUDA provider links and whether it is found), build (random
# SD1.5-architecture models exported by trainer.export, fp16-compute variants by
# trainer.export.fp16_compute), engine (the engine on CUDA: single expert and 3-expert AFA),
# torch (the trainer's PyTorch fp16 reference on the same weights), train (SABW training at batch 8,
# 512²: steps/s and memory). Each phase runs only if the time budget ($MEASURE_BUDGET_S, default
# 540 s) leaves it room; results go to $OUT (the device's output folder; out/gpu-measure here):
# measure.log, env.txt, build.json, engine.json, torch.json, train.json, gpu-measure.json, gpu-measure.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu-measure}
STAGE=${GPU_STAGE:-/tmp/gpu-stage}
WORK=${GPU_WORK:-/tmp/gpu-measure}
BUNDLE=${GPU_CARRY_DIR:-$ROOT/out/gpu-carry}/bundle
BUDGET_S=${MEASURE_BUDGET_S:-540}
PROVIDER=cuda
PRESET=sd15
PHASES=env,build,engine,torch,train
BACKGROUND=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) PROVIDER=cpu; shift ;;
    --tiny) PRESET=tiny; shift ;;
    --phases) PHASES=$2; shift 2 ;;
    --background) BACKGROUND=1; PHASES=build; shift ;;
    *) echo "measure.sh: unknown argument $1 (--cpu, --tiny, --phases a,b, --background)" >&2; exit 2 ;;
  esac
done
[ "$BACKGROUND" = 1 ] && OUT=$WORK/background-out
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/measure.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { printf '[%4ss] measure: %s\n' "$(elapsed)" "$*"; }
wants() { [[ ",$PHASES," == *",$1,"* ]]; }
SKIPPED=()
# runs phase $1 (command after it) if at least $2 seconds of the budget are left; limited to what is left
phase() {
  local name=$1 need=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) ))
  if ! wants "$name"; then return 0; fi
  if [ "$left" -lt "$need" ]; then
    say "SKIP $name: $left s of the budget left, it needs about $need s"
    SKIPPED+=("$name")
    return 0
  fi
  say "phase $name (at most $left s)"
  # a phase is a function of this script or a command; `bash -c` lets timeout run either
  timeout --signal=TERM --kill-after=10 "$left" bash -c "$(printf '%q ' "$@")"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    say "phase $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ': out of time'))"
    SKIPPED+=("$name(failed)")
  fi
}

PY=/usr/bin/python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
NODE=$STAGE/root/node
ORT_DIR=$STAGE/root/node_modules/onnxruntime-node
export PYTHONPATH=$ROOT
$PY -c 'import jsonschema' 2>/dev/null || export PYTHONPATH=$ROOT:$BUNDLE/pylib
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
# CUDA 13 and cuDNN 9 from the Python environment's nvidia-* packages
NV_LIBS=$($PY - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    print(":".join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")))))
except ImportError:
    pass
EOF
)
[ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH=$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

if [ "$BACKGROUND" = 1 ]; then
  :  # the build needs neither node nor the bundle's engine
elif [ ! -x "$NODE" ] || [ ! -d "$ORT_DIR" ]; then
  say "ERROR: $STAGE/root has no node and onnxruntime-node: run scripts/gpu/stage.sh 1 … N first (docs/gpu.md)"
  exit 2
fi
if [ "$BACKGROUND" = 0 ] && [ ! -f "$BUNDLE/engine-bench.mjs" ]; then
  say "ERROR: $BUNDLE/engine-bench.mjs is missing: run scripts/gpu/pack.sh here and carry $BUNDLE"
  exit 2
fi
# resolves onnxruntime-node from $STAGE/root/node_modules
[ "$BACKGROUND" = 0 ] && cp "$BUNDLE/engine-bench.mjs" "$STAGE/root/engine-bench.mjs"

env_report() {
  {
    echo "date: $(date -u +%FT%TZ)  provider: $PROVIDER  preset: $PRESET"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "node: $("$NODE" --version)  python: $PY"
    $PY -c 'import torch, onnx, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, "onnx", onnx.__version__, "numpy", numpy.__version__)'
    echo "onnxruntime-node: $(grep '"version"' "$ORT_DIR/package.json")"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    local provider_so=$ORT_DIR/bin/napi-v6/linux/x64/libonnxruntime_providers_cuda.so
    if [ -f "$provider_so" ]; then
      echo "--- ldd libonnxruntime_providers_cuda.so (not found = missing CUDA library)"
      ldd "$provider_so" | grep -E 'cuda|cublas|curand|cufft|cudnn|not found' || true
      for lib in libcudnn.so.9; do
        found=$(for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/$lib 2>/dev/null; done | head -1)
        echo "$lib (opened at run time): ${found:-NOT FOUND}"
      done
    else
      echo "no CUDA provider library in $ORT_DIR (CPU-only stage)"
    fi
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

PKG=$WORK/pkg-$PRESET
build() {
  local pid
  pid=$(cat "$WORK/build-$PRESET.pid" 2>/dev/null)
  if [ "$BACKGROUND" = 0 ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "waiting for the background build (pid $pid, started by stage.sh; log in $WORK/background-out/measure.log)"
    while kill -0 "$pid" 2>/dev/null; do sleep 2; done
    tail -n 20 "$WORK/background-out/measure.log"
  fi
  if [ -f "$PKG/manifest.json" ] && [ -f "$WORK/build-$PRESET.json" ]; then
    say "reusing $PKG (built earlier on this machine)"
    cp "$WORK/build-$PRESET.json" "$OUT/build.json"
    return 0
  fi
  rm -rf "$PKG"
  $PY scripts/gpu/measure.py build --preset "$PRESET" --out "$PKG" --json "$WORK/build-$PRESET.json" &&
    cp "$WORK/build-$PRESET.json" "$OUT/build.json"
}

engine() {
  local mem_pid=""
  if [ "$PROVIDER" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$WORK/gpu-mem.log" &
    mem_pid=$!
  fi
  EXECUTION_PROVIDER=$PROVIDER ENGINE_CACHE_DIR=$WORK/engine-cache \
    "$NODE" "$STAGE/root/engine-bench.mjs" --model-dir "$PKG" --provider "$PROVIDER" --json "$OUT/engine.json"
  local rc=$?
  if [ -n "$mem_pid" ]; then
    kill "$mem_pid" 2>/dev/null
    sort -n "$WORK/gpu-mem.log" | tail -1 | awk '{print "{\"engine_gpu_peak_mib\": " $1 "}"}' >"$WORK/engine-gpu.json"
  fi
  return $rc
}

[ "$PROVIDER" = cpu ] && export CUDA_VISIBLE_DEVICES=""  # the dry run: torch on the CPU too
export ROOT OUT STAGE WORK BUNDLE PROVIDER PRESET PY NODE ORT_DIR PKG START BACKGROUND
export -f say elapsed env_report build engine
ROUNDS=3
[ "$PRESET" = tiny ] && ROUNDS=2
if [ "$BACKGROUND" = 1 ]; then
  echo $$ >"$WORK/build-$PRESET.pid"
  phase build 60 build
  rm -f "$WORK/build-$PRESET.pid"
  exit 0
fi
phase env 5 env_report
phase build 240 build
phase engine 90 engine
phase torch 60 $PY scripts/gpu/measure.py torch --preset "$PRESET" --rounds $ROUNDS --json "$OUT/torch.json"
phase train 45 $PY scripts/gpu/measure.py train --preset "$PRESET" --steps 10 --json "$OUT/train.json"
$PY scripts/gpu/measure.py report --out "$OUT" --extra "$WORK/engine-gpu.json" --skipped "${SKIPPED[*]:-}" \
  --preset "$PRESET" --provider "$PROVIDER"
say "done in $(elapsed) s; results in $OUT"
