"""Datasets of (tensor, caption) pairs for training, and a deterministic step → batch order.

A dataset is anything with `len()` and `[i] -> (tensor, caption)`: a plain list works. The tensor is
an image `[3,H,W]` in [-1, 1] or a latent `[C,h,w]` already multiplied by the VAE's scaling factor;
the caption is a string or a list of alternative strings (one is drawn per use).

- `ImageFolder(path)`: `name.png` (or `name.npy` / `name.pt`) + `name.txt` pairs, or captions in
  `captions.json` ({"name.png": "caption" | ["alt 1", "alt 2"]}). PNGs are read with Pillow when it
  is installed, else with trainer.io.png's decoder. `.npy`/`.pt` images are `[3,H,W]` or `[H,W,3]`,
  uint8 (0..255) or float in [-1, 1].
- `LatentFile(path)`: precomputed latents, a .safetensors file with `latents [N,C,h,w]` and the
  captions as JSON in its metadata (written by `encode_latents`).
- `TensorExamples(tensors, captions)`: one stacked tensor in memory, with an optional transform.
- `StepBatches`: which examples make up the batch of step s, a pure function of (seed, s), so a
  resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from trainer.io.png import read_png
from trainer.io.safetensors import load_safetensors, load_torch_checkpoint, read_safetensors_header, save_safetensors

Caption = Union[str, Sequence[str]]
Example = Tuple[Tensor, Caption]
IMAGE_EXTENSIONS = (".png", ".npy", ".pt")

# ---------------------------------------------------------------------------------------------
# images ↔ tensors


def image_to_tensor(pixels: Union[np.ndarray, Tensor]) -> Tensor:
    """uint8 0..255 or float [-1,1], [H,W,3] or [3,H,W] → float32 [3,H,W] in [-1, 1]."""
    t = torch.as_tensor(np.asarray(pixels)) if not torch.is_tensor(pixels) else pixels
    if t.dim() != 3:
        raise ValueError(f"expected an image of rank 3, got shape {list(t.shape)}")
    if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.dtype == torch.uint8:
        t = t.float() / 127.5 - 1.0
    return t.float().contiguous()


def tensor_to_image(t: Tensor) -> np.ndarray:
    """float [3,H,W] in [-1,1] → uint8 [H,W,3]."""
    return ((t.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# datasets


def choose_caption(caption: Caption, generator: Optional[torch.Generator] = None) -> str:
    if isinstance(caption, str):
        return caption
    options = list(caption)
    if not options:
        return ""
    return options[int(torch.randint(len(options), (1,), generator=generator))]


class ImageFolder:
    """Images and captions from a folder (see the module docstring). Images are decoded once and
    kept as uint8 when `cache` is on."""

    def __init__(self, path: str, cache: bool = True):
        self.path = str(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"image folder {self.path} does not exist")
        captions_file = os.path.join(self.path, "captions.json")
        table: Dict[str, Caption] = {}
        if os.path.isfile(captions_file):
            with open(captions_file, encoding="utf-8") as f:
                table = json.load(f)
        self.files: List[str] = []
        self.captions: List[Caption] = []
        missing = []
        for name in sorted(os.listdir(self.path)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            caption: Optional[Caption] = table.get(name, table.get(stem))
            txt = os.path.join(self.path, stem + ".txt")
            if caption is None and os.path.isfile(txt):
                with open(txt, encoding="utf-8") as f:
                    caption = f.read().strip()
            if caption is None:
                missing.append(name)
                continue
            self.files.append(name)
            self.captions.append(caption)
        if missing:
            raise ValueError(f"{self.path}: no caption for {len(missing)} image(s): {', '.join(missing[:5])}"
                             " (add name.txt or an entry in captions.json)")
        if not self.files:
            raise ValueError(f"{self.path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.cache = cache
        self._cached: Dict[int, Tensor] = {}
        self._shape: Optional[Tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Tensor:
        path = os.path.join(self.path, self.files[i])
        ext = os.path.splitext(path)[1].lower()
        if ext == ".png":
            return torch.from_numpy(read_png(path)).permute(2, 0, 1).contiguous()
        raw = np.load(path) if ext == ".npy" else load_torch_checkpoint(path)
        t = torch.as_tensor(raw)
        return t if t.dtype == torch.uint8 else image_to_tensor(t)

    def __getitem__(self, i: int) -> Example:
        if i in self._cached:
            stored = self._cached[i]
        else:
            stored = self._load(i)
            if self.cache:
                self._cached[i] = stored
        image = image_to_tensor(stored)
        if self._shape is None:
            self._shape = tuple(image.shape)
        elif tuple(image.shape) != self._shape:
            raise ValueError(f"{self.files[i]} has shape {list(image.shape)}, earlier images {list(self._shape)}: "
                             "all images of a folder must have the same size")
        return image, self.captions[i]


class LatentFile:
    """Precomputed latents (already scaled) with their captions, from `encode_latents`."""

    def __init__(self, path: str, device: Union[str, torch.device] = "cpu"):
        self.path = str(path)
        entries, metadata, _ = read_safetensors_header(self.path)
        if "latents" not in entries:
            raise ValueError(f"{self.path}: no 'latents' tensor")
        if not metadata or "captions" not in metadata:
            raise ValueError(f"{self.path}: no 'captions' in the metadata")
        self.latents = load_safetensors(self.path)["latents"].to(device)
        self.captions: List[Caption] = json.loads(metadata["captions"])
        self.scaling_factor = float(metadata.get("scaling_factor", "nan"))
        if len(self.captions) != self.latents.shape[0]:
            raise ValueError(f"{self.path}: {self.latents.shape[0]} latents but {len(self.captions)} captions")

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, i: int) -> Example:
        return self.latents[i], self.captions[i]


class TensorExamples:
    """(tensor, caption) pairs over one stacked tensor, with an optional transform applied per example."""

    def __init__(self, tensors: Tensor, captions: Sequence[str], transform: Optional[Callable] = None):
        if len(tensors) != len(captions):
            raise ValueError(f"{len(tensors)} tensors but {len(captions)} captions")
        self.tensors = tensors
        self.captions = list(captions)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        x = self.tensors[i]
        return (self.transform(x) if self.transform else x), self.captions[i]


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, data: Sequence[Example], path: str, batch_size: int = 32,
                   device: Union[str, torch.device] = "cpu", sample: bool = False, seed: int = 0) -> None:
    """Encodes every image of `data` with the VAE (posterior mean, or a sample) × scaling_factor into a
    LatentFile at `path`."""
    vae = vae.to(device).eval()
    scale = float(vae.config.scaling_factor)
    generator = torch.Generator().manual_seed(seed)
    chunks, captions = [], []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        images = torch.stack([img for img, _ in items]).to(device)
        mean, logvar = vae.encode(images)
        z = vae.sample_latent(mean, logvar, generator) if sample else mean
        chunks.append((z * scale).float().cpu())
        captions.extend(c if isinstance(c, str) else list(c) for _, c in items)
    save_safetensors({"latents": torch.cat(chunks)}, path,
                     {"captions": json.dumps(captions), "scaling_factor": repr(scale)})


def open_data_source(spec: Dict[str, Any]) -> Sequence[Example]:
    """A dataset from a config entry: {"type": "folder" | "latents", "path": ..., ...}."""
    kind = spec.get("type")
    if kind == "folder":
        return ImageFolder(spec["path"], cache=bool(spec.get("cache", True)))
    if kind == "latents":
        return LatentFile(spec["path"])
    raise ValueError(f"unknown data type {kind!r} (expected 'folder' or 'latents')")


# ---------------------------------------------------------------------------------------------
# batches


class StepBatches:
    """The batch of step s: positions s·B … s·B+B−1 of an endless stream of per-epoch permutations,
    each permutation drawn from its own generator seeded with (seed, epoch)."""

    def __init__(self, data: Sequence[Example], batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(data) == 0:
            raise ValueError("the dataset is empty")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._perms: Dict[int, List[int]] = {}

    def _permutation(self, epoch: int) -> List[int]:
        if epoch not in self._perms:
            n = len(self.data)
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
                perm = torch.randperm(n, generator=g).tolist()
            else:
                perm = list(range(n))
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, step: int) -> List[int]:
        n = len(self.data)
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, n)
            out.append(self._permutation(epoch)[offset])
        return out

    def __call__(self, step: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, List[str]]:
        """(stacked tensors, captions) of step s; caption alternatives are drawn with `generator`."""
        items = [self.data[i] for i in self.indices(step)]
        tensors = [t if torch.is_tensor(t) else torch.as_tensor(t) for t, _ in items]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"examples of one batch differ in shape: {sorted(shapes)}")
        return torch.stack(tensors), [choose_caption(c, generator) for _, c in items]
