"""Float16-compute variants of a package's graphs, for CUDA (contract C1):

    python3 -m trainer.export.fp16_compute --package PKG [--graphs all|unets,ensembles,text_encoder,vae_decoder,vae_encoder] [--force]

writes `model.fp16.onnx` beside each chosen graph (trainer.export.fp16_graph.to_fp16_compute; its
weights in `model.fp16.onnx_data` beside it past protobuf's 2 GiB) and turns the graph's manifest
reference into `{"fp32": "<the graph>", "fp16": "<its variant>"}`. The engine picks "fp16" under
EXECUTION_PROVIDER=cuda and "fp32" on the CPU. A reference that has an fp16 variant already is left
alone unless --force. `python3 -m trainer.export … --cuda-fp16` does the same right after an export.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence, Set, Tuple

import onnx

from trainer.export.errors import ExportError, ManifestError
from trainer.export.fp16_emulate import emulate_fp16
from trainer.export.fp16_graph import Fp16Report, to_fp16_compute
from trainer.export.manifest import write_manifest
from trainer.export.onnx_io import save_onnx

GRAPH_KINDS = ("unets", "ensembles", "text_encoder", "vae_decoder", "vae_encoder")
TOP_DEFAULTS = {"text_encoder": "text_encoder/model.onnx", "vae_decoder": "vae_decoder/model.onnx"}

__all__ = ["GRAPH_KINDS", "Fp16Report", "add_fp16_variants", "emulate_fp16", "fp16_path", "main", "parse_graph_kinds",
           "to_fp16_compute", "write_fp16_variant"]


def fp16_path(fp32_path: str) -> str:
    """`…/model.onnx` → `…/model.fp16.onnx` (any `x.onnx` → `x.fp16.onnx`), in the same folder."""
    stem, ext = os.path.splitext(fp32_path)
    return f"{stem}.fp16{ext or '.onnx'}"


def parse_graph_kinds(text: str) -> Tuple[str, ...]:
    """"all" or a comma list of GRAPH_KINDS (also "unet", "ensemble", "vae" = both VAE graphs)."""
    aliases = {"unet": "unets", "ensemble": "ensembles", "vae": "vae_decoder,vae_encoder",
               "text_encoders": "text_encoder", "denoisers": "unets,ensembles"}
    kinds: List[str] = []
    for word in ",".join(aliases.get(w.strip(), w.strip()) for w in text.split(",") if w.strip()).split(","):
        if word == "all":
            kinds.extend(GRAPH_KINDS)
        elif word in GRAPH_KINDS:
            kinds.append(word)
        else:
            raise ValueError(f"--graphs: unknown graph kind {word!r} (use all or some of {', '.join(GRAPH_KINDS)})")
    if not kinds:
        raise ValueError("--graphs names no graph kind")
    return tuple(dict.fromkeys(kinds))


def write_fp16_variant(src: str, dst: str, attention_softmax: str = "fp32") -> Fp16Report:
    """Reads the float32-compute graph `src` (with its external data) and writes its float16-compute
    version to `dst`, checked by onnx.checker."""
    model = onnx.load(src)
    model16, report = to_fp16_compute(model, attention_softmax=attention_softmax)
    del model
    stale = dst + "_data"
    if os.path.exists(stale):
        os.remove(stale)  # onnx appends to an existing external data file
    save_onnx(model16, dst)
    try:
        onnx.checker.check_model(dst)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{dst}: the float16 graph fails onnx.checker: {e}") from None
    return report


def _refs(manifest: MutableMapping[str, Any], kinds: Sequence[str]) -> Iterator[Tuple[str, MutableMapping[str, Any], str, Any]]:
    """(what, container, key, reference) for every graph reference of the chosen kinds; a missing
    top-level reference is its default path, an expert's `path` its Optimum layout's files."""
    for key in ("text_encoder", "vae_decoder", "vae_encoder"):
        if key in kinds and (key in manifest or key in TOP_DEFAULTS):
            yield key, manifest, key, manifest.get(key, TOP_DEFAULTS.get(key))
    for e in manifest.get("experts", []):
        base = e.get("path")
        if "unets" in kinds and (e.get("unet") or base):
            yield f"expert {e['id']!r} unet", e, "unet", e.get("unet") or os.path.join(base, "unet", "model.onnx")
        if "text_encoder" in kinds and (e.get("text_encoder") or base):
            yield (f"expert {e['id']!r} text_encoder", e, "text_encoder",
                   e.get("text_encoder") or os.path.join(base, "text_encoder", "model.onnx"))
    for ens in manifest.get("ensembles", []):
        if "ensembles" in kinds:
            yield f"ensemble {ens['id']!r}", ens, "graph", ens["graph"]


def add_fp16_variants(package_dir: str, kinds: Sequence[str] = GRAPH_KINDS, *, force: bool = False,
                      paths: Optional[Set[str]] = None, attention_softmax: str = "fp32",
                      log=print) -> Dict[str, Fp16Report]:
    """Writes the float16-compute variant of each chosen graph and rewrites manifest.json; returns
    {float32 graph path: report} for the graphs converted. A graph named twice is converted once.
    paths: only the references to these float32 graphs (as the manifest spells them)."""
    manifest_path = os.path.join(package_dir, "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest: Dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{package_dir} has no manifest.json (is it a model package?)") from None
    done: Dict[str, Tuple[str, Fp16Report]] = {}
    changed = False
    for what, container, key, ref in _refs(manifest, kinds):
        if paths is not None and (ref if isinstance(ref, str) else ref.get("fp32")) not in paths:
            continue
        if isinstance(ref, str):
            src = ref
        elif isinstance(ref, Mapping) and "fp32" in ref and ("fp16" not in ref or force):
            src = ref["fp32"]
        else:
            if log:
                log(f"{what}: has no float32 graph to convert or has an fp16 variant already (--force redoes it)")
            continue
        if src not in done:
            full = os.path.join(package_dir, src)
            if not os.path.isfile(full):
                raise ExportError(f"{what}: {full} is missing")
            dst = fp16_path(src)
            started = time.perf_counter()
            report = write_fp16_variant(full, os.path.join(package_dir, dst), attention_softmax)
            done[src] = (dst, report)
            if log:
                log(f"{what}: {dst} ({time.perf_counter() - started:.1f} s): {report.summary()}")
        container[key] = {"fp32": src, "fp16": done[src][0]}
        changed = True
    if changed:
        write_manifest(package_dir, manifest)
    return {src: report for src, (_, report) in done.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write float16-compute variants (model.fp16.onnx, for CUDA) of a package's graphs and name "
                    "them in its manifest.")
    parser.add_argument("--package", required=True, help="the package folder (e.g. models/demo)")
    parser.add_argument("--graphs", default="all", help=f"all, or a comma list of: {', '.join(GRAPH_KINDS)}")
    parser.add_argument("--force", action="store_true", help="rewrite fp16 variants that exist already")
    parser.add_argument("--attention-softmax", choices=("fp32", "fp16"), default="fp32",
                        help="precision of the attention softmax (default fp32; the SABW softmax stays fp32)")
    args = parser.parse_args(argv)
    try:
        kinds = parse_graph_kinds(args.graphs)
    except ValueError as e:
        parser.error(str(e))
    try:
        reports = add_fp16_variants(args.package, kinds, force=args.force, attention_softmax=args.attention_softmax)
    except (ExportError, ManifestError) as e:
        print(f"fp16 variants failed: {e}", file=sys.stderr)
        return 1
    print(f"{len(reports)} float16 graph(s) written; {os.path.join(args.package, 'manifest.json')} names them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
