"""Graphs in one folder that share their weights: one external data file, each tensor stored once.

An AFA graph and a fused graph over the same experts hold the same U-Net weights; with
`share_weights` both graphs keep their structure and read every initializer of at least
`min_bytes` from one `<data_name>` beside them, equal tensors (same type and bytes) stored once.
onnxruntime (1.30) reads external data only from inside the graph's own folder, so the graphs must
sit in one folder (docs/model-package.md).
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Sequence, Tuple

import onnx
from onnx import TensorProto

from trainer.export.errors import ExportError

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
