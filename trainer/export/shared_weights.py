"""Graphs in one folder that share their weights: one external data file, each tensor stored once.

An AFA graph and a fused graph over the same experts hold the same U-Net weights; with
`share_weights` both graphs keep their structure and read every initializer of at least
`min_bytes` from one `<data_name>` beside them, equal tensors (same type and bytes) stored once.
onnxruntime (1.30) reads external data only from inside the graph's own folder, so the graphs must
sit in one folder (docs/model-package.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto

from trainer.export.errors import ExportError, ManifestError
from trainer.export.manifest import validate_manifest
from trainer.export.onnx_io import graph_io
from trainer.export.parity import Check

DATA_NAME = "weights.onnx_data"
MIN_BYTES = 1024   # smaller tensors stay inside their graph
ALIGN = 4096       # offsets of tensors of at least PAGE_ALIGN_BYTES are page-aligned (mmap)
PAGE_ALIGN_BYTES = 1 << 20


def _raw(tensor: TensorProto) -> bytes:
    """The tensor's little-endian bytes, also for tensors stored in typed fields (float_data, …)."""
    return tensor.raw_data or onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)).raw_data


def share_weights(sources: Sequence[str], targets: Sequence[str], data_name: str = DATA_NAME,
                  min_bytes: int = MIN_BYTES) -> Dict[str, int]:
    """Loads each graph of `sources` (with its external data) and writes it to the matching path of
    `targets` (all in one folder) with its initializers of at least min_bytes in `<folder>/<data_name>`,
    each distinct tensor once. Returns {"tensors", "unique", "bytes"} (bytes: size of the data file)."""
    if len(sources) != len(targets) or not targets:
        raise ValueError("share_weights needs one target path per source graph")
    folder = os.path.dirname(os.path.abspath(targets[0]))
    if any(os.path.dirname(os.path.abspath(t)) != folder for t in targets):
        raise ExportError("graphs that share an external data file must sit in one folder "
                          f"(onnxruntime reads external data only beside the graph): {list(targets)}")
    models = [onnx.load(s) for s in sources]
    data_path = os.path.join(folder, data_name)
    offsets: Dict[Tuple[int, str], Tuple[int, int]] = {}
    count = 0
    with open(data_path, "wb") as data:
        for model in models:
            for tensor in model.graph.initializer:
                raw = _raw(tensor)
                if len(raw) < min_bytes:
                    continue
                count += 1
                key = (tensor.data_type, hashlib.sha256(raw).hexdigest())
                if key not in offsets:
                    align = ALIGN if len(raw) >= PAGE_ALIGN_BYTES else 64
                    position = data.tell()
                    if position % align:
                        data.write(b"\0" * (align - position % align))
                        position = data.tell()
                    data.write(raw)
                    offsets[key] = (position, len(raw))
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    tensor.ClearField(field)
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
        size = data.tell()
    for model, target in zip(models, targets):
        with open(target, "wb") as f:
            f.write(model.SerializeToString())
    return {"tensors": count, "unique": len(offsets), "bytes": size}


def external_files(path: str) -> List[str]:
    """The external data files a graph reads (relative to its folder)."""
    model = onnx.load(path, load_external_data=False)
    found = []
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in found:
                found.append(location)
    return found


# ---------------------------------------------------------------------------------------------
# checking that rewritten graphs compute what the originals did


_SIZES = {"height": 8, "width": 8}  # named dimensions of the U-Net-like graphs' inputs; others: 2


def random_feeds(path: str, seed: int = 3) -> Dict[str, np.ndarray]:
    """Inputs for a U-Net-like graph (an expert's U-Net or an ensemble graph) read from its declared inputs:
    random normal values, timesteps 901 and 17, masks of ones; named dimensions batch 2, latents 8×8."""
    inputs, _ = graph_io(path)
    rng = np.random.default_rng(seed)
    feeds: Dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        kind = value.type.tensor_type
        dtype = onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[kind.elem_type]
        shape = [d.dim_value if d.dim_value > 0 else _SIZES.get(d.dim_param, 2) for d in kind.shape.dim]
        if name == "timestep":
            feeds[name] = np.resize(np.array([901, 17]), shape).astype(dtype)
        elif name in ("expert_mask", "encoder_attention_mask"):
            feeds[name] = np.ones(shape, dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def check_unchanged(pairs: Sequence[Tuple[str, str]], check: Check = "auto", log=None) -> int:
    """Each (before, after) pair of graphs gives bit-identical outputs in onnxruntime-node on random_feeds;
    raises ExportError naming the first that does not. check False: nothing is run; "auto": nothing where
    onnxruntime-node is missing; True: that is an error. Returns the number of graphs compared."""
    from trainer.export import ort_check

    if not check:
        return 0
    reason = ort_check.unavailable_reason()
    if reason is not None:
        if check is True:
            raise ExportError(f"cannot check the rewritten graphs: {reason}")
        if log:
            log(f"rewritten graphs not compared in onnxruntime: {reason}")
        return 0
    for before, after in pairs:
        feeds = random_feeds(before)
        want, got = ort_check.run_onnx_many(before, [feeds])[0], ort_check.run_onnx_many(after, [feeds])[0]
        for name, value in want.items():
            if name not in got or not np.array_equal(value, got[name]):
                diff = float(np.max(np.abs(value - got[name]))) if name in got else float("nan")
                raise ExportError(f"{before}: its rewritten copy changes output {name!r} "
                                  f"(max abs difference {diff:.3g})")
        if log:
            log(f"{os.path.basename(after)}: outputs bit-identical to {before}")
    return len(pairs)


# ---------------------------------------------------------------------------------------------
# a package's U-Net-bearing graphs in one folder

FOLDER = "unets"
CONFIG_SUFFIX = ".config.json"  # an expert's U-Net config beside its graph: <folder>/<id>.config.json


def _graph_moves(manifest: Mapping[str, Any]) -> List[Tuple[str, str, str, str]]:
    """(section, id, key, old path), moved to <folder>/<id>.onnx: for every graph referenced by a plain path:
    the experts' `unet` and the ensembles' `graph` (fp32/fp16 variant objects stay where they are). Ids are
    unique across experts and ensembles (the manifest's rule), so the new names are too."""
    moves = []
    for section, key in (("experts", "unet"), ("ensembles", "graph")):
        for entry in manifest.get(section, []) or []:
            ref = entry.get(key)
            if isinstance(ref, str):
                moves.append((section, entry["id"], key, ref))
    return moves


def read_manifest(package_dir: str) -> Dict[str, Any]:
    """A package's manifest.json, validated by the one schema (and its files checked)."""
    path = os.path.join(package_dir, "manifest.json")
    if not os.path.isfile(path):
        raise ExportError(f"{package_dir} is no model package: it has no manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    validate_manifest(manifest, package_dir)
    return manifest


def write_manifest_atomically(package_dir: str, manifest: Mapping[str, Any]) -> None:
    """Validates, then replaces manifest.json in one rename."""
    validate_manifest(manifest, package_dir)
    path = os.path.join(package_dir, "manifest.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def replace_folder(package_dir: str, stage: str, target: str, work: str, manifest: Mapping[str, Any]) -> None:
    """Moves the staged folder into place (the old one aside into `work`), then writes the manifest;
    if the manifest cannot be written, the old folder comes back. The caller removes `work`."""
    moved_old: Optional[str] = None
    if os.path.isdir(target):
        moved_old = os.path.join(work, "old")
        os.rename(target, moved_old)
    parent = os.path.dirname(os.path.abspath(target))
    made_parent = not os.path.isdir(parent)  # e.g. the first ensemble of an imported package: no ensembles/ yet
    os.makedirs(parent, exist_ok=True)
    os.rename(stage, target)
    try:
        write_manifest_atomically(package_dir, manifest)
    except Exception:
        shutil.rmtree(target)
        if moved_old is not None:
            os.rename(moved_old, target)
        elif made_parent:
            os.rmdir(parent)
        raise


def _graph_files(package_dir: str, rel: str) -> List[str]:
    """A graph and the external data files it reads, relative to the package."""
    folder = os.path.dirname(rel)
    return [rel] + [os.path.normpath(os.path.join(folder, f)) for f in external_files(os.path.join(package_dir, rel))]


def relayout_package(package_dir: str, folder: str = FOLDER, check: Check = "auto", log=print) -> Dict[str, Any]:
    """Moves every expert U-Net graph and ensemble graph of the package into `<package>/<folder>/` as `<id>.onnx`,
    all reading one `<folder>/weights.onnx_data` holding each tensor once; an expert's `config.json` beside its
    graph becomes `<folder>/<id>.config.json`. Each rewritten graph must give bit-identical outputs to its
    original in onnxruntime (check_unchanged) before anything is replaced; the manifest is replaced last, then
    the old files are deleted (and folders left empty). Running it again on its own result changes nothing
    but the data file's order. Returns {"graphs", "tensors", "unique", "bytes"}."""
    if os.path.isabs(folder) or ".." in folder.split("/") or not folder.strip("/"):
        raise ExportError(f"--folder must be a folder name inside the package, got {folder!r}")
    folder = folder.strip("/")
    manifest = read_manifest(package_dir)
    moves = _graph_moves(manifest)
    if not moves:
        raise ExportError(f"{package_dir} has no expert or ensemble graph to move")
    target = os.path.join(package_dir, folder)
    work = tempfile.mkdtemp(prefix=".relayout-", dir=package_dir)
    try:
        stage = os.path.join(work, "stage")
        os.makedirs(stage)
        sources = [os.path.join(package_dir, m[3]) for m in moves]
        names = [f"{m[1]}.onnx" for m in moves]
        stats = share_weights(sources, [os.path.join(stage, n) for n in names])
        if log:
            log(f"{folder}/: {len(names)} graphs share {DATA_NAME} ({stats['unique']} distinct of "
                f"{stats['tensors']} tensors, {stats['bytes'] / 1e6:.2f} MB)")
        check_unchanged(list(zip(sources, [os.path.join(stage, n) for n in names])), check, log)
        configs: Dict[str, str] = {}  # old config.json path → new name
        for section, ident, _, old in moves:
            if section != "experts":
                continue
            for candidate in (os.path.splitext(old)[0] + CONFIG_SUFFIX, os.path.join(os.path.dirname(old), "config.json")):
                if os.path.isfile(os.path.join(package_dir, candidate)):
                    shutil.copyfile(os.path.join(package_dir, candidate), os.path.join(stage, ident + CONFIG_SUFFIX))
                    configs[candidate] = ident + CONFIG_SUFFIX
                    break
        old_files = set()
        for _, _, _, old in moves:
            old_files.update(_graph_files(package_dir, old))
        old_files.update(configs)
        if os.path.isdir(target):  # files of the folder that are not being replaced (not ours) stay
            for name in os.listdir(target):
                rel = f"{folder}/{name}"
                if rel not in old_files and not os.path.exists(os.path.join(stage, name)):
                    shutil.copy2(os.path.join(target, name), os.path.join(stage, name))

        new_manifest = json.loads(json.dumps(manifest))
        for section, ident, key, _ in moves:
            entry = next(e for e in new_manifest[section] if e["id"] == ident)
            entry[key] = f"{folder}/{ident}.onnx"
        validate_manifest(new_manifest)  # the schema's rules, before anything moves

        replace_folder(package_dir, stage, target, work, new_manifest)
        still_read = set()  # files that graphs outside the folder still read
        for section, key in (("experts", "unet"), ("ensembles", "graph"), ("experts", "text_encoder")):
            for entry in new_manifest.get(section, []) or []:
                ref = entry.get(key)
                for rel in ([ref] if isinstance(ref, str) else list(ref.values()) if isinstance(ref, dict) else []):
                    if not rel.startswith(folder + "/") and os.path.isfile(os.path.join(package_dir, rel)):
                        still_read.update(_graph_files(package_dir, rel))
        for rel in sorted(old_files - still_read):
            if not rel.startswith(folder + "/"):
                path = os.path.join(package_dir, rel)
                if os.path.isfile(path):
                    os.remove(path)
                parent = os.path.dirname(rel)
                while parent and parent != folder and os.path.isdir(os.path.join(package_dir, parent)) \
                        and not os.listdir(os.path.join(package_dir, parent)):
                    os.rmdir(os.path.join(package_dir, parent))
                    parent = os.path.dirname(parent)
        if log:
            log(f"moved {len(moves)} graphs into {folder}/ ({', '.join(names)})")
        return {"graphs": len(moves), **stats}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m trainer.export --relayout",
                                description="Re-lay a model package: every expert U-Net and ensemble graph into one "
                                            "folder, reading one external data file that holds each weight once.")
    p.add_argument("--relayout", required=True, metavar="PKG", help="the package folder (manifest.json)")
    p.add_argument("--folder", default=FOLDER, help=f"the shared folder inside the package (default {FOLDER})")
    p.add_argument("--check", choices=("auto", "require", "off"), default="auto",
                   help="compare every rewritten graph's outputs with the original's in onnxruntime-node "
                        "(auto: when node_modules/onnxruntime-node is there)")
    args = p.parse_args(argv)
    check: Check = {"auto": "auto", "require": True, "off": False}[args.check]
    try:
        relayout_package(args.relayout, args.folder, check=check)
    except (ExportError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
