"""Weight files: safetensors read and written without the safetensors package, and pickled torch
checkpoints loaded as safely as the installed torch allows.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the raw
little-endian tensor bytes; offsets are relative to the end of the header.
"""
from __future__ import annotations

import inspect
import json
import os
import pickle
import struct
import sys
import tempfile
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]

SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors I/O here assumes a little-endian machine")


# ---------------------------------------------------------------------------------------------
# safetensors


def read_safetensors_header(path: PathLike) -> Tuple[Dict[str, dict], Optional[Dict[str, str]], int]:
    """(tensor entries, __metadata__ or None, byte offset where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    return header, metadata, 8 + n


def _check_entries(path: PathLike, entries: Dict[str, dict], data_len: int) -> List[Tuple[int, int, str]]:
    spans = []
    for name, e in entries.items():
        if not isinstance(e, dict) or e.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype') if isinstance(e, dict) else e!r}")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[e["dtype"]]).element_size()
        if not 0 <= begin <= end <= data_len or end - begin != numel * itemsize:
            raise ValueError(f"{path}: tensor {name!r} ({e['dtype']} {shape}) has data_offsets {offsets} "
                             f"that do not fit its size or the {data_len}-byte data section")
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise ValueError(f"{path}: tensors {prev!r} and {name!r} overlap")
    return spans


def load_safetensors(path: PathLike, device: Union[str, torch.device] = "cpu",
                     names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
    """The tensors of a .safetensors file (all, or only `names`), in header order, each in its own
    storage; reading only some of them costs only their memory."""
    _require_little_endian()
    entries, _, start = read_safetensors_header(path)
    _check_entries(path, entries, os.path.getsize(path) - start)
    if names is not None:
        wanted = set(names)
        absent = sorted(wanted - set(entries))
        if absent:
            raise KeyError(f"{path}: no tensor {absent[0]!r}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        entries = {k: v for k, v in entries.items() if k in wanted}
    out: Dict[str, Tensor] = {}
    with open(path, "rb") as f:
        for name, e in entries.items():
            begin, end = e["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if end > begin and f.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"{path}: truncated data for tensor {name!r}")
            tensor = raw.view(SAFETENSORS_DTYPES[e["dtype"]]).reshape(e["shape"])
            out[name] = tensor.to(device) if str(device) != "cpu" else tensor
    return out


def load_safetensors_metadata(path: PathLike) -> Optional[Dict[str, str]]:
    return read_safetensors_header(path)[1]


def save_safetensors(tensors: Mapping[str, Tensor], path: PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes a .safetensors file (atomically: a temporary file renamed into place)."""
    _require_little_endian()
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    prepared = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not torch.is_tensor(t):
            raise TypeError(f"safetensors needs str → Tensor, got {name!r} → {type(t).__name__}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved in safetensors")
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here")
        prepared.append((name, t.detach().to("cpu").contiguous()))
    # Larger elements first keeps every tensor aligned to its element size.
    prepared.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header: Dict[str, object] = {}
    offset = 0
    for name, t in prepared:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for _, t in prepared:
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# pickled torch checkpoints and generic state-dict files


def load_torch_checkpoint(path: PathLike) -> dict:
    """torch.load on CPU, refusing arbitrary pickled objects where this torch can (weights_only)."""
    kwargs = {"map_location": "cpu"}
    if "weights_only" in inspect.signature(torch.load).parameters:
        kwargs["weights_only"] = True
    try:
        return torch.load(path, **kwargs)
    except pickle.UnpicklingError as e:
        if kwargs.get("weights_only"):
            raise ValueError(f"{path}: the checkpoint holds pickled objects other than tensors, which are not "
                             f"loaded for safety; convert it to .safetensors first ({e})") from None
        raise


def load_state_dict_file(path: PathLike) -> Dict[str, Tensor]:
    """Tensors of a .safetensors, .ckpt, .pt, .pth or .bin file (a top-level 'state_dict' is unwrapped)."""
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)
    loaded = load_torch_checkpoint(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
    return {k: v for k, v in loaded.items() if torch.is_tensor(v)}
