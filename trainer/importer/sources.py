"""Where an imported package's experts came from (`<package>/sources.json`, written by the importer),
and their PyTorch weights loaded again from there, for the commands that build on an imported package
(e.g. `python3 -m trainer.export --add-to PKG …`):

    {"experts": {"<id>": {"path": "<absolute path of the .safetensors/.ckpt file or diffusers folder>",
                          "format": "single-file" | "diffusers",
                          "sha256": "<hex of the file, or of the folder's U-Net weight files>",
                          "pickle": true  (only when imported with --allow-pickle from a pickled file)}},
     "vae": {"path": …, "sha256": …}}

Packages made by the trainer itself (the demo, the tiny fixture) have no sources.json.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from trainer.importer.errors import ImportFailure
from trainer.importer.inputs import Checkpoint, open_input
from trainer.io.sd_text_encoder import text_encoder_from_state_dict
from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.unet import UNet2DConditionModel, UNetConfig

SOURCES_FILE = "sources.json"


def read_sources(package_dir: str) -> Dict[str, Any]:
    path = os.path.join(package_dir, SOURCES_FILE)
    if not os.path.isfile(path):
        raise ImportFailure(f"{package_dir} has no {SOURCES_FILE}: it was not made by `npm run import`, so the "
                            f"experts' original weights are unknown")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def expert_source(package_dir: str, expert_id: str) -> Dict[str, Any]:
    experts = read_sources(package_dir).get("experts", {})
    if expert_id not in experts:
        raise ImportFailure(f"{SOURCES_FILE} of {package_dir} has no expert {expert_id!r} "
                            f"(it lists {', '.join(sorted(experts)) or 'none'})")
    return experts[expert_id]


def _open(package_dir: str, expert_id: str, verify: bool) -> Checkpoint:
    entry = expert_source(package_dir, expert_id)
    if not os.path.exists(entry["path"]):
        raise ImportFailure(f"expert {expert_id!r}: its source {entry['path']} is gone (moved or deleted since "
                            f"the import)")
    source = open_input(entry["path"], allow_pickle=bool(entry.get("pickle")))
    if verify and entry.get("sha256") and source.sha256() != entry["sha256"]:
        raise ImportFailure(f"expert {expert_id!r}: {entry['path']} changed since the import (sha256 differs); "
                            f"import it again")
    return source


def _unet_config(package_dir: str, expert_id: str, source: Checkpoint) -> UNetConfig:
    """The config the importer wrote beside the expert's graph (so the architecture tag matches)."""
    path = os.path.join(package_dir, "experts", expert_id, "unet", "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return UNetConfig.from_dict(json.load(f))
    return source.unet_config(None)


def load_expert_unet(package_dir: str, expert_id: str, verify: bool = True) -> UNet2DConditionModel:
    """The expert's U-Net from its original file: float32, on the CPU, in eval mode.

    verify: check the file's sha256 against the import's first (reads the whole file once)."""
    source = _open(package_dir, expert_id, verify)
    try:
        return source.unet(_unet_config(package_dir, expert_id, source))
    finally:
        source.release()


def load_expert_text_encoder(package_dir: str, expert_id: str, verify: bool = True) -> CLIPTextEncoder:
    """The text encoder stored with the expert (its own CLIP): float32, on the CPU, in eval mode."""
    source = _open(package_dir, expert_id, verify)
    try:
        if not source.has_text_encoder:
            raise ImportFailure(f"expert {expert_id!r}: {source.display} has no text encoder")
        state, config = source.text_encoder_state()
        return text_encoder_from_state_dict(state, config)
    finally:
        source.release()
