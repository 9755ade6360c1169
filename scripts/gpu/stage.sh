#!/usr/bin/env bash
# Run THERE (the GPU machine), once per piece made by scripts/gpu/pack.sh, in consecutive device calls:
#
#   bash scripts/gpu/stage.sh N      (the call carries out/gpu-carry/piece-NN)
#
# Appends piece N to $GPU_STAGE (default /tmp/gpu-stage; kept while the machine stays warm) and, once
# every piece is there and its checksum matches, unpacks node, onnxruntime-node 1.29.0 and the CUDA
# provider libraries into $GPU_STAGE/root (root/node, root/node_modules/onnxruntime-node/…). Repeating
# a piece is harmless; a missing or damaged one is named. The first call also starts the model build
# (scripts/gpu/measure.sh --background, detached with setsid: the machine keeps it running between
# calls), so that it runs while the pieces arrive; GPU_BUILD=0 does not start it, GPU_PRESET=tiny
# builds the tiny models (the dry run).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${GPU_CARRY_DIR:-out/gpu-carry}
STAGE=${GPU_STAGE:-/tmp/gpu-stage}
[ $# -eq 1 ] || { echo "usage: stage.sh N   (N = the piece number, 1 … the COUNT that pack.sh printed)" >&2; exit 2; }
n=$(printf '%02d' "$((10#$1))")
piece=$CARRY/piece-$n
[ -d "$piece" ] || { echo "stage.sh: $piece is not here: carry it in this call (carry=[\"$piece\"])" >&2; exit 2; }
mkdir -p "$STAGE/parts"
cp "$piece"/stage.tar.xz.part-* "$piece/SHA256SUMS" "$piece/COUNT" "$STAGE/parts/"
work=${GPU_WORK:-/tmp/gpu-measure}
preset=${GPU_PRESET:-sd15}
if [ "${GPU_BUILD:-1}" != 0 ] && [ ! -f "$work/pkg-$preset/manifest.json" ] &&
   ! { [ -f "$work/build-$preset.pid" ] && kill -0 "$(cat "$work/build-$preset.pid")" 2>/dev/null; }; then
  mkdir -p "$work"
  flags=()
  [ "$preset" = tiny ] && flags=(--cpu --tiny)
  setsid nohup bash scripts/gpu/measure.sh --background "${flags[@]}" >"$work/background.log" 2>&1 </dev/null &
  echo $! >"$work/build-$preset.pid"  # setsid execs (no fork) here: this is the build's pid
  echo "stage.sh: started the model build in the background (log: $work/background-out/measure.log)"
fi
count=$(cat "$STAGE/parts/COUNT")
cd "$STAGE/parts"
grep "stage.tar.xz.part-$n\$" SHA256SUMS | sha256sum -c --quiet - || { echo "stage.sh: piece $n is damaged" >&2; rm -f "stage.tar.xz.part-$n"; exit 1; }
missing=()
for k in $(seq -f %02g 1 "$count"); do [ -f "stage.tar.xz.part-$k" ] || missing+=("$k"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "stage.sh: piece $n of $count staged in $STAGE; still missing: ${missing[*]}"
  exit 0
fi
if [ -x "$STAGE/root/node" ] && [ -f "$STAGE/root/STAGED" ]; then
  echo "stage.sh: all $count pieces staged; $STAGE/root is unpacked already"
  exit 0
fi
cat $(seq -f 'stage.tar.xz.part-%02g' 1 "$count") >stage.tar.xz
grep " stage.tar.xz\$" SHA256SUMS | sha256sum -c --quiet - || { echo "stage.sh: the joined archive is damaged" >&2; exit 1; }
rm -rf "$STAGE/root.tmp" && mkdir -p "$STAGE/root.tmp"
xz -dc -T0 stage.tar.xz | tar -xf - -C "$STAGE/root.tmp"
rm -f stage.tar.xz
rm -rf "$STAGE/root" && mv "$STAGE/root.tmp" "$STAGE/root"
echo "stage.sh: unpacked into $STAGE/root: $("$STAGE/root/node" --version), $(head -3 "$STAGE/root/STAGED" | tail -2 | paste -sd ';')"
ls -la "$STAGE/root/node_modules/onnxruntime-node/bin/napi-v6/linux/x64"
