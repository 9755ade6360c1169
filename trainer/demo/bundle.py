"""Bundles: a tar of a demo build's finished products (weights in float16, tokenizer, logs, state),
without data, optimizer states or checkpoints. What a GPU host sends back, or what is committed so
that a new machine can go on (`python3 -m trainer.build_demo --unbundle FILE --stage export`).

Also the package's training-free ensemble (`fuse_spec`): the fuse graph needs no trained product, only
the experts, so the export stage adds it beside the trio; save_package(share_weights=True) puts the experts'
U-Nets and both ensembles into the package's unets/, reading one weights file."""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from typing import List, Optional, Sequence

import torch

from trainer.demo.recipe import FAMILY_IDS
from trainer.export.package import EnsembleSpec
from trainer.models.fusion import FusionEnsemble
from trainer.io.safetensors import load_safetensors, load_safetensors_metadata, save_safetensors

EXPERT_STAGES = tuple(f"expert-{f}" for f in FAMILY_IDS)
BUNDLE_PATHS = ("state.json", "build_log.md", "build.log", "logs", "tokenizer", "classifier/classifier.pt",
                "world/preview.png", "vae/final", "base/final", "afa/final", "base/samples.png", "afa/samples.png") \
    + tuple(f"{s}/final" for s in EXPERT_STAGES) + tuple(f"{s}/samples.png" for s in EXPERT_STAGES)


def write_bundle(run_dir: str, path: str) -> List[str]:
    """Writes the finished products (BUNDLE_PATHS that exist) to a tar, weights in float16; returns their names."""
    added: List[str] = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path, "w") as tar:
        for rel in BUNDLE_PATHS:
            full = os.path.join(run_dir, rel)
            files = [full] if os.path.isfile(full) else [
                os.path.join(root, f) for root, _, names in os.walk(full) for f in sorted(names)]
            for file in files:
                arcname = os.path.relpath(file, run_dir)
                converted = _convert_weights(file, os.path.join(tmp, "w"), torch.float16)
                tar.add(converted or file, arcname=arcname)
                added.append(arcname)
    return added


def read_bundle(run_dir: str, path: str) -> List[str]:
    """Unpacks a bundle into the run folder (weights back to float32); returns the names of its files."""
    names: List[str] = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
        for member in tar.getmembers():
            if not member.isfile() or member.name.startswith("/") or ".." in member.name.split("/"):
                continue
            tar.extract(member, tmp)
            source = os.path.join(tmp, member.name)
            target = os.path.join(run_dir, member.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            converted = _convert_weights(source, os.path.join(tmp, "w"), torch.float32)
            shutil.copyfile(converted or source, target)
            names.append(member.name)
    return names


def _convert_weights(path: str, tmp: str, dtype: torch.dtype) -> Optional[str]:
    """A copy of a weight file (.safetensors, or the classifier's .pt) with floating tensors in
    `dtype`, written to `tmp`; None for other files."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if path.endswith(".safetensors"):
        tensors = {k: cast(v) for k, v in load_safetensors(path).items()}
        save_safetensors(tensors, tmp, load_safetensors_metadata(path))
        return tmp
    if os.path.basename(path) == "classifier.pt":
        blob = torch.load(path)
        blob["state_dict"] = {k: cast(v) for k, v in blob["state_dict"].items()}
        torch.save(blob, tmp)
        return tmp
    return None


# The demo's fuse ensemble (docs/fuse.md): temperature 1 (weights proportional to the experts' relative
# feature variance) did as well as or better than 0.2, 0.5 and 2 on the demo's prompts.
FUSE_ID = "fuse"
FUSE_TEMPERATURE = 1.0


def fuse_spec(experts: Sequence[torch.nn.Module], ids: Sequence[str] = FAMILY_IDS) -> EnsembleSpec:
    """The training-free fused ensemble over the demo's experts (all of them, any subset at run time)."""
    fused = FusionEnsemble(list(experts), temperature=FUSE_TEMPERATURE).eval()
    return EnsembleSpec(fused, list(ids), subsets=True, title="Fuse (training-free)",
                        description=f"{', '.join(ids)} fused per pixel by their feature variance, without training "
                                    f"(temperature {FUSE_TEMPERATURE:g})")
