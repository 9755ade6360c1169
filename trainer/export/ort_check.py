"""Runs exported ONNX graphs in onnxruntime-node from Python (there is no onnxruntime for Python here).

`run_onnx(path, feeds)` writes the feeds to a safetensors-layout file, runs
`node scripts/ort-run.mjs` and reads the outputs back as numpy arrays. Tests call
`skip_unless_available()` first; it skips when node or node_modules/onnxruntime-node is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from trainer import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "scripts", "ort-run.mjs")
ORT_PACKAGE = os.path.join(REPO_ROOT, "node_modules", "onnxruntime-node")

# safetensors dtype codes <-> numpy
_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


class OrtRunError(RuntimeError):
    """onnxruntime-node could not load or run a graph; the message carries its error."""


def unavailable_reason() -> Optional[str]:
    """Why graphs cannot be run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not os.path.isdir(ORT_PACKAGE):
        return f"{ORT_PACKAGE} is missing (run npm ci)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def skip_unless_available() -> None:
    """pytest.skip with the reason when onnxruntime-node cannot be used."""
    reason = unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(f"onnxruntime-node unavailable: {reason}")


def write_tensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Little-endian safetensors layout: u64 header length, JSON header, raw data."""
    header = {}
    chunks: List[bytes] = []
    offset = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        code = _CODES.get(array.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r}: unsupported dtype {array.dtype}")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header)
    text += " " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text.encode("utf-8"))))
        f.write(text.encode("utf-8"))
        for chunk in chunks:
            f.write(chunk)


def read_tensors(path: str) -> Dict[str, np.ndarray]:
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length].decode("utf-8"))
    start = 8 + length
    out: Dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]].newbyteorder("<")
        out[name] = np.frombuffer(blob[start + begin:start + end], dtype=dtype).reshape(entry["shape"]).copy()
    return out


def _run(model: str, runs: Sequence[Mapping[str, np.ndarray]], meta: bool, threads: int,
         timeout: float) -> tuple[List[Dict[str, np.ndarray]], Optional[dict]]:
    reason = unavailable_reason()
    if reason is not None:
        raise OrtRunError(f"cannot run {model} in onnxruntime-node: {reason}")
    with tempfile.TemporaryDirectory(prefix="ort-run-") as tmp:
        args = ["node", SCRIPT, os.path.abspath(model), "--threads", str(threads)]
        meta_path = os.path.join(tmp, "meta.json")
        if meta:
            args += ["--meta", meta_path]
        out_paths = []
        for i, feeds in enumerate(runs):
            in_path, out_path = os.path.join(tmp, f"in{i}.safetensors"), os.path.join(tmp, f"out{i}.safetensors")
            write_tensors(in_path, feeds)
            args += [in_path, out_path]
            out_paths.append(out_path)
        proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            detail = [line for line in lines if "[W:onnxruntime" not in line] or lines  # warnings hide the error
            raise OrtRunError(f"onnxruntime-node failed on {model}: " + "\n".join(detail[:20]))
        results = [read_tensors(p) for p in out_paths]
        metadata = None
        if meta:
            with open(meta_path, encoding="utf-8") as f:
                metadata = json.load(f)
        return results, metadata


def run_onnx(path: str, feeds: Mapping[str, np.ndarray], threads: int = 2, timeout: float = 300) -> Dict[str, np.ndarray]:
    """Outputs of one session.run of the graph at `path`, by output name."""
    return _run(path, [feeds], False, threads, timeout)[0][0]


def run_onnx_many(path: str, runs: Sequence[Mapping[str, np.ndarray]], threads: int = 2,
                  timeout: float = 300) -> List[Dict[str, np.ndarray]]:
    """Several session.run calls on one session (one node process)."""
    return _run(path, runs, False, threads, timeout)[0]


def session_metadata(path: str, timeout: float = 120) -> dict:
    """{"inputs": [{"name", "type", "shape"}], "outputs": [...]} as onnxruntime-node reports them."""
    _, meta = _run(path, [], True, 1, timeout)
    assert meta is not None
    return meta
