"""The importer's weight files: tensor names and shapes from a header alone (safetensors) or from one
read (pickles, only with allow_pickle), tensors on request, and content hashes."""
from __future__ import annotations

import hashlib
import inspect
import os
import pickle
from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor

from trainer.importer.errors import ImportFailure
from trainer.io.safetensors import (SAFETENSORS_DTYPES, _check_entries, load_safetensors, load_torch_checkpoint,
                                    read_safetensors_header)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_CHUNK = 16 << 20


class _Shape:
    """A header entry's shape, enough for the config readers (they only look at `.shape`)."""

    __slots__ = ("shape",)

    def __init__(self, shape: Iterable[int]):
        self.shape = tuple(int(d) for d in shape)


def sha256_of(paths: Iterable[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_hash(state: Mapping[str, Tensor], dtype: torch.dtype) -> str:
    """A content hash of named weights as they would be stored in `dtype` (names sorted)."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if value.is_floating_point():
            value = value.to(dtype)
        h.update(name.encode("utf-8") + b"\0" + str(tuple(value.shape)).encode("ascii"))
        h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Weight files


class WeightFile:
    """Tensor names and shapes of one file, and its tensors on request."""

    def __init__(self, path: str, allow_pickle: bool):
        self.path = path
        self.display = os.path.basename(path)
        self.pickled = path.lower().endswith(PICKLE_SUFFIXES)
        self._tensors: Optional[Dict[str, Tensor]] = None
        if self.pickled:
            if not allow_pickle:
                raise ImportFailure(
                    f"{self.display} is a pickled checkpoint ({os.path.splitext(path)[1]}), which can run arbitrary "
                    f"code when loaded; convert it to .safetensors, or pass --allow-pickle if you trust where it "
                    f"came from")
            self.shapes = {k: _Shape(v.shape) for k, v in self._load_pickle().items()}
            self.release()  # opening N inputs must not hold N checkpoints: parts are read again when used
        elif path.lower().endswith(".safetensors"):
            try:
                entries, _, start = read_safetensors_header(path)
                data_len = os.path.getsize(path) - start
                promised = max((e["data_offsets"][1] for e in entries.values() if isinstance(e, dict)
                                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                                and isinstance(e["data_offsets"][1], int)), default=0)
                if promised > data_len:
                    raise ImportFailure(f"{self.display} is truncated: its header describes {promised} bytes of "
                                        f"tensors, the file holds {data_len} (an interrupted download?)")
                _check_entries(path, entries, data_len)
            except ValueError as e:
                detail = str(e).replace(f"{path}: ", "")
                if "unsupported dtype" in detail:
                    raise ImportFailure(f"{self.display}: {detail}; this importer reads "
                                        f"{', '.join(SAFETENSORS_DTYPES)} tensors") from None
                raise ImportFailure(f"{self.display} is corrupt or not a .safetensors file ({detail})") from None
            self.shapes = {k: _Shape(v["shape"]) for k, v in entries.items()}
            self.dtypes = {k: SAFETENSORS_DTYPES[v["dtype"]] for k, v in entries.items()}
        else:
            raise ImportFailure(f"{self.display}: not a checkpoint this importer reads (.safetensors; or "
                                f"{', '.join(PICKLE_SUFFIXES)} with --allow-pickle; or a diffusers folder)")

    def _load_pickle(self) -> Dict[str, Tensor]:
        if self._tensors is None:
            try:
                loaded = _torch_load(self.path)
            except ImportFailure:
                raise
            except Exception as e:  # zip/pickle errors of a damaged file
                raise ImportFailure(f"{self.display} is truncated or corrupt ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
            self._tensors = loaded
        return self._tensors

    def load(self, names: Iterable[str]) -> Dict[str, Tensor]:
        names = list(names)
        if self.pickled:
            tensors = self._load_pickle()
            return {n: tensors[n] for n in names}
        try:
            return load_safetensors(self.path, names=names)
        except ValueError as e:
            raise ImportFailure(f"{self.display} is truncated or corrupt ({str(e).replace(self.path + ': ', '')})") \
                from None

    def release(self) -> None:
        self._tensors = None


def _torch_load(path: str) -> Dict[str, Tensor]:
    """Tensors of a pickled checkpoint: weights-only unpickling first, the full pickle only if that
    refuses (the caller has allowed pickles); a top-level 'state_dict' is unwrapped."""
    try:
        loaded = load_torch_checkpoint(path)
    except ValueError:
        kwargs = {"weights_only": False} if "weights_only" in inspect.signature(torch.load).parameters else {}
        loaded = torch.load(path, map_location="cpu", **kwargs)
    except pickle.UnpicklingError as e:
        raise ImportFailure(f"{os.path.basename(path)} is truncated or corrupt ({e})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ImportFailure(f"{os.path.basename(path)}: expected a dict of tensors, found {type(loaded).__name__}")
    return {k: v for k, v in loaded.items() if torch.is_tensor(v)}
