"""What a demo build's run folder holds, read back for the stages that need it and for
trainer.demo.routing_signal: world data, the classifier, the tokenizer, the VAE, latents, experts.

Products are loaded on first use and kept until `forget`/`clear`. World data and latents that are
missing (a bundle carries neither) are made again, deterministically, when something asks for them.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from trainer.demo import classifier as clf
from trainer.demo import shapes
from trainer.demo.recipe import FAMILY_IDS
from trainer.io.model_folders import load_unet, load_vae
from trainer.io.png import write_png
from trainer.models.afa import AFAEnsemble
from trainer.models.unet import UNet2DConditionModel
from trainer.models.vae import AutoencoderKL
from trainer.text.bpe import CLIPTokenizer
from trainer.training.data import TensorExamples

WORLD_SETS = ("all",) + FAMILY_IDS + ("pairs",)
CAPTION_SETS = ("all",) + FAMILY_IDS  # the tokenizer's corpus (the pairs set only repeats its words)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 [.., 3, H, W] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


class RunProducts:
    """The products of a run folder under one recipe, on one device."""

    def __init__(self, recipe: Dict[str, Any], run_dir: str, device: torch.device, log: Callable[[str], None]):
        self.r = recipe
        self.run_dir = run_dir
        self.device = device
        self.cuda = device.type == "cuda"
        self.log = log
        self._loaded: Dict[str, Any] = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def forget(self, key: str) -> None:
        """Reads `key` ("classifier", "vae", "world:all", …) from the run folder again when next asked."""
        self._loaded.pop(key, None)

    def clear(self) -> None:
        self._loaded.clear()

    # -----------------------------------------------------------------------------------------
    # world data

    def render_world(self) -> Tuple[Dict[str, int], List[str]]:
        """Renders every world set into world/ (with a preview and the captions file); returns the
        scene count of each set and the tokenizer's captions."""
        w = self.r["world"]
        os.makedirs(self.path("world"), exist_ok=True)
        counts = {}
        captions: List[str] = []
        for i, name in enumerate(WORLD_SETS):
            n = {"all": w["n_all"], "pairs": w["n_pairs"]}.get(name, w["n_family"])
            families = None if name in ("all", "pairs") else [name]
            two_object_prob = 1.0 if name == "pairs" else w["two_object_prob"]
            seed = self.r["seed"] * 1_000_000 + (i + 1) * 10_000
            batch = shapes.build_dataset(self.path("world", f"{name}.pt"), n, seed, families, two_object_prob,
                                         w["omit_prob"], device=self.device if self.cuda else None)
            counts[name] = len(batch)
            if name in CAPTION_SETS:
                captions += batch.captions
            if name == "all":
                preview = batch.images[:32].permute(0, 2, 3, 1).numpy()
                rows = [np.concatenate(list(preview[r * 8:(r + 1) * 8]), axis=1) for r in range(len(preview) // 8)]
                if rows:
                    write_png(self.path("world", "preview.png"), np.concatenate(rows, axis=0))
        with open(self.path("world", "captions.txt"), "w") as f:
            f.write("\n".join(captions) + "\n")
        return counts, captions

    def world(self, name: str) -> shapes.ShapesBatch:
        key = f"world:{name}"
        if key not in self._loaded:
            path = self.path("world", f"{name}.pt")
            if not os.path.exists(path):
                self.log(f"world data {name} is missing: rendering it again")
                self.render_world()
            self._loaded[key] = shapes.load_dataset(path)
        return self._loaded[key]

    # -----------------------------------------------------------------------------------------
    # models

    def classifier(self) -> clf.AttributeClassifier:
        if "classifier" not in self._loaded:
            self._loaded["classifier"] = clf.load_classifier(self.path("classifier", "classifier.pt"), self.device)
        return self._loaded["classifier"]

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_dir(self.path("tokenizer"))

    def vae(self) -> AutoencoderKL:
        if "vae" not in self._loaded:
            self._loaded["vae"] = load_vae(self.path("vae", "final"), self.device)
        return self._loaded["vae"]

    def keep_vae(self, vae: AutoencoderKL) -> None:
        """The VAE later stages get (the one just saved to vae/final), without reading it back."""
        self._loaded["vae"] = vae

    def load_experts(self) -> List[UNet2DConditionModel]:
        return [load_unet(self.path(f"expert-{f}", "final")) for f in FAMILY_IDS]

    def build_ensemble(self, experts: Sequence[UNet2DConditionModel]) -> AFAEnsemble:
        """Fresh (uniform) aggregators over the experts, initialised from the recipe's seed."""
        a = self.r["afa"]
        torch.manual_seed(self.r["seed"])
        return AFAEnsemble(list(experts), hidden=a["hidden"], depth=a["depth"], heads=a["heads"], head_dim=a["head_dim"])

    # -----------------------------------------------------------------------------------------
    # latents

    def latents(self, name: str) -> TensorExamples:
        key = f"latents:{name}"
        if key not in self._loaded:
            path = self.path("latents", f"{name}.pt")
            if not os.path.exists(path):
                self.log(f"latents {name} are missing: encoding the world data again")
                self.encode_latents(self.vae())
            blob = torch.load(path)
            self._loaded[key] = TensorExamples(blob["latents"].to(self.device).float(), blob["captions"])
        return self._loaded[key]

    @torch.no_grad()
    def encode_latents(self, vae: AutoencoderKL) -> None:
        """latents/<set>.pt for every world set (float16), skipping sets this VAE has encoded already."""
        os.makedirs(self.path("latents"), exist_ok=True)
        scale = float(vae.config.scaling_factor)
        for name in WORLD_SETS:
            done = self.path("latents", f"{name}.pt")
            if os.path.exists(done) and os.path.getmtime(done) > os.path.getmtime(self.path("vae", "final")):
                continue  # encoded by this VAE already (e.g. before an interruption)
            world = self.world(name)
            torch.save({"latents": self.encode_images(vae, world.images).half(), "captions": world.captions,
                        "scaling_factor": scale}, self.path("latents", f"{name}.pt"))

    @torch.no_grad()
    def encode_images(self, vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] images → scaled latents (the posterior means, float32 on the CPU), 512 at a time."""
        scale = float(vae.config.scaling_factor)
        return torch.cat([(vae.encode(to_signed(images[i:i + 512]).to(self.device))[0].float() * scale).cpu()
                          for i in range(0, len(images), 512)])

    def afa_examples(self) -> TensorExamples:
        """The aggregators' training scenes: the whole world plus the two-object set, since only scenes
        with objects of two families reward routing by place rather than by prompt."""
        sets = [self.latents("all"), self.latents("pairs")]
        return TensorExamples(torch.cat([s.tensors for s in sets]), [c for s in sets for c in s.captions])
