#!/usr/bin/env bash
# Prepares, HERE (a machine with the npm registry), what the GPU machine needs to run the engine on
# CUDA and cannot fetch itself (docs/gpu.md):
#
#   out/gpu-carry/piece-NN/   one piece per device call (scripts/gpu/stage.sh NN appends it there):
#                             xz-compressed tar of node (this machine's /usr/bin/node), onnxruntime-node
#                             1.29.0 + onnxruntime-common 1.29.0 (linux/x64 only) and the CUDA provider of
#                             ORT 1.29.0 (libonnxruntime_providers_{cuda,shared}.so from the npm package
#                             com.github.asus4.onnxruntime.linux-x64-gpu@0.4.9, MIT, Microsoft's binaries)
#                             beside onnxruntime_binding.node, where onnxruntime-node's installer puts them
#   out/gpu-carry/bundle/     carried by the measuring call: the engine bench bundled into one .mjs
#                             (scripts/gpu/engine-bench.ts; onnxruntime-node stays external) and the pure-
#                             Python jsonschema + pyrsistent the trainer's manifest check needs (the GPU
#                             machine's Python has no jsonschema)
#
# Usage: bash scripts/gpu/pack.sh [--piece-mib N] [--xz-level L] [--bundle-only]
#   --piece-mib N   piece size (default: what fits beside the working tree in the 64 MiB a call carries)
#   --xz-level L    xz preset (default 6: ≈ 170 MB in all, minutes on 2 cores; 0: ≈ 20 % larger, 10× faster)
#   --bundle-only   rebuild out/gpu-carry/bundle only (after a code change; the pieces stay)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CARRY=${GPU_CARRY_DIR:-out/gpu-carry}
ORT_VERSION=1.29.0
PROVIDER_PACKAGE=com.github.asus4.onnxruntime.linux-x64-gpu@0.4.9
CALL_LIMIT_MIB=64
PIECE_MIB=""
XZ_LEVEL=6
BUNDLE_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --piece-mib) PIECE_MIB=$2; shift 2 ;;
    --xz-level) XZ_LEVEL=$2; shift 2 ;;
    --bundle-only) BUNDLE_ONLY=1; shift ;;
    *) echo "pack.sh: unknown argument $1 (use --piece-mib N, --xz-level L, --bundle-only)" >&2; exit 2 ;;
  esac
done
say() { printf 'pack: %s\n' "$*" >&2; }

# What a device call sends besides the carried paths: tracked files plus untracked files git does not ignore.
tree_bytes() {
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null |
    awk '{s += $1} END {print s + 0}'
}

build_bundle() {
  local bundle=$CARRY/bundle
  rm -rf "$bundle" && mkdir -p "$bundle/pylib"
  node_modules/.bin/esbuild scripts/gpu/engine-bench.ts --bundle --platform=node --format=esm --target=node20 \
    --external:onnxruntime-node --alias:sharp=./scripts/gpu/no-sharp.ts \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" \
    --outfile="$bundle/engine-bench.mjs" --log-level=warning
  local site=/usr/lib/python3/dist-packages
  if [ -d "$site/jsonschema" ] && [ -d "$site/pyrsistent" ]; then
    for item in jsonschema pyrsistent _pyrsistent_version.py; do
      cp -r "$site/$item" "$bundle/pylib/"
    done
    cp -r "$site"/jsonschema-*.dist-info "$bundle/pylib/" 2>/dev/null || true
    find "$bundle/pylib" -name __pycache__ -prune -exec rm -rf {} +
  else
    say "no Debian python3-jsonschema here: the GPU run's manifest check will need jsonschema some other way"
  fi
  say "bundle: $(du -sh "$bundle" | cut -f1) in $bundle"
}

mkdir -p "$CARRY"
build_bundle
[ "$BUNDLE_ONLY" = 1 ] && exit 0

WORK=$(mktemp -d /tmp/gpu-pack.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/stage
mkdir -p "$STAGE/node_modules"

say "npm pack onnxruntime-node@$ORT_VERSION onnxruntime-common@$ORT_VERSION $PROVIDER_PACKAGE (≈ 280 MB download)"
(cd "$WORK" && npm pack --silent "onnxruntime-node@$ORT_VERSION" "onnxruntime-common@$ORT_VERSION" "$PROVIDER_PACKAGE" >/dev/null)

mkdir -p "$STAGE/node_modules/onnxruntime-node" "$STAGE/node_modules/onnxruntime-common"
tar -xzf "$WORK/onnxruntime-node-$ORT_VERSION.tgz" -C "$STAGE/node_modules/onnxruntime-node" --strip-components=1 \
  package/package.json package/dist package/bin/napi-v6/linux/x64 package/README.md
tar -xzf "$WORK/onnxruntime-common-$ORT_VERSION.tgz" -C "$STAGE/node_modules/onnxruntime-common" --strip-components=1
BIN=$STAGE/node_modules/onnxruntime-node/bin/napi-v6/linux/x64
tar -xzf "$WORK"/com.github.asus4.onnxruntime.linux-x64-gpu-*.tgz -C "$WORK" \
  package/Plugins/Linux/x64/libonnxruntime_providers_cuda.so package/Plugins/Linux/x64/libonnxruntime_providers_shared.so
mv "$WORK"/package/Plugins/Linux/x64/libonnxruntime_providers_*.so "$BIN/"
# the provider must be the core library's version: the core library names its version in its symbols
strings "$BIN/libonnxruntime.so.1" | grep -Fx "$ORT_VERSION" >/dev/null || say "warning: libonnxruntime.so.1 does not mention $ORT_VERSION"
cp /usr/bin/node "$STAGE/node"
{
  echo "node $("$STAGE/node" --version)"
  echo "onnxruntime-node $ORT_VERSION (linux/x64)"
  echo "provider from $PROVIDER_PACKAGE"
  (cd "$STAGE" && find . -type f -printf '%s %p\n' | sort -k2)
} >"$STAGE/STAGED"
ls -la "$BIN" >&2

tree=$(tree_bytes)
tree_mib=$(( (tree + 1048575) / 1048576 ))
bundle_mib=$(( ($(du -sb "$CARRY/bundle" | cut -f1) + 1048575) / 1048576 ))
if [ -z "$PIECE_MIB" ]; then
  PIECE_MIB=$(( CALL_LIMIT_MIB - tree_mib - bundle_mib - 2 ))  # each staging call also carries the bundle
  [ "$PIECE_MIB" -gt 58 ] && PIECE_MIB=58
fi
say "working tree that travels with every call: $tree_mib MiB; a call carries at most $CALL_LIMIT_MIB MiB"
if [ "$PIECE_MIB" -lt 8 ]; then
  say "ERROR: the working tree leaves no room for the pieces (piece size would be $PIECE_MIB MiB)."
  say "       Shrink what travels (tracked + untracked-not-ignored files), then run pack.sh again."
  say "       Packing anyway with 58 MiB pieces, for a checkout that is small enough."
  PIECE_MIB=58
fi

rm -rf "$CARRY"/piece-*
say "tar | xz -$XZ_LEVEL (2 threads) into $PIECE_MIB MiB pieces"
tar -C "$STAGE" -cf - . | xz "-$XZ_LEVEL" -T2 -c >"$WORK/stage.tar.xz"
(cd "$WORK" && split -b "${PIECE_MIB}M" -d -a 2 --numeric-suffixes=1 stage.tar.xz stage.tar.xz.part-)
count=$(ls "$WORK"/stage.tar.xz.part-* | wc -l)
(cd "$WORK" && sha256sum stage.tar.xz.part-* stage.tar.xz >SHA256SUMS)
for part in "$WORK"/stage.tar.xz.part-*; do
  n=${part##*-}
  mkdir -p "$CARRY/piece-$n"
  mv "$part" "$CARRY/piece-$n/"
  cp "$WORK/SHA256SUMS" "$CARRY/piece-$n/"
  echo "$count" >"$CARRY/piece-$n/COUNT"
done
cp "$STAGE/STAGED" "$CARRY/STAGED"
total_mib=$(( ($(stat -c %s "$WORK/stage.tar.xz") + 1048575) / 1048576 ))
say "$count pieces ($total_mib MiB compressed) in $CARRY; bundle $bundle_mib MiB"
if [ $(( tree_mib + PIECE_MIB + bundle_mib )) -gt "$CALL_LIMIT_MIB" ]; then
  say "WARNING: working tree ($tree_mib MiB) + a piece ($PIECE_MIB MiB) + the bundle ($bundle_mib MiB) is over $CALL_LIMIT_MIB MiB: the device will refuse the call"
fi
echo
echo "Device calls, in this order, each within ~30 s of the previous one (the machine keeps /tmp only while warm);"
echo "the first also starts the model build in the background (setsid), which the last call waits for:"
for n in $(seq -f %02g 1 "$count"); do
  echo "  run(carry=[\"$CARRY/piece-$n\", \"$CARRY/bundle\"], timeout_s=120, command=\"bash scripts/gpu/stage.sh $n\")"
done
echo "  run(carry=[\"$CARRY/bundle\"], timeout_s=600, command=\"MEASURE_BUDGET_S=<device time left - 60> bash scripts/gpu/measure.sh\")"
echo "(if the build is not done by then, the engine phases are skipped: call measure.sh once more while warm)"
