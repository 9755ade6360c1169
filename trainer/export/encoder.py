"""Adds a VAE encoder graph (image-to-image) to an existing package, leaving its other files as they are:

    python3 -m trainer.export.encoder --vae RUN/vae/final --package models/demo [--fp16] [--check require]

`--vae` is a trained VAE folder (trainer/io/model_folders.py layout). The graph is written to
<package>/vae_encoder/model.onnx exactly as save_package writes it (parity-checked the same way) and
manifest.json gains "vae_encoder" after "vae_decoder". The VAE must be the package's own: its
latent channels, downsampling and scale factor are checked against the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from trainer.export.errors import ExportError, ManifestError
from trainer.export.graphs import GraphReport, export_vae_encoder
from trainer.export.manifest import write_manifest
from trainer.export.fp16_compute import add_fp16_variants
from trainer.export.parity import Check, add_graph_arguments, check_from_arguments
from trainer.io.model_folders import load_vae
from trainer.models.vae import AutoencoderKL

ENCODER_PATH = "vae_encoder/model.onnx"


def add_vae_encoder(package_dir: str, vae: AutoencoderKL, *, fp16: bool = False, check: Check = "auto",
                    compact: bool = False, log=print) -> GraphReport:
    """Exports vae's encoder into the package and names it in manifest.json; returns the graph's report."""
    with open(os.path.join(package_dir, "manifest.json"), encoding="utf-8") as f:
        manifest: Dict[str, Any] = json.load(f)
    latent = manifest["latent"]
    have = {"channels": vae.config.latent_channels, "downsample": vae.config.downsample_factor,
            "scale_factor": float(vae.config.scaling_factor)}
    if any(latent.get(k) != v for k, v in have.items()):
        raise ExportError(f"this VAE ({have}) is not the package's: its manifest says latent {latent}")
    report = export_vae_encoder(vae.eval(), os.path.join(package_dir, ENCODER_PATH), fp16=fp16, check=check,
                                compact=compact)
    if log:
        log(report.summary())
    ordered: Dict[str, Any] = {}
    for key, value in manifest.items():
        if key != "vae_encoder":
            ordered[key] = value
        if key == "vae_decoder":
            ordered["vae_encoder"] = ENCODER_PATH
    ordered.setdefault("vae_encoder", ENCODER_PATH)
    write_manifest(package_dir, ordered)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Add a VAE encoder graph (image-to-image) to a model package.")
    parser.add_argument("--vae", required=True, help="the package's trained VAE folder (e.g. runs/demo/vae/final)")
    parser.add_argument("--package", required=True, help="the package folder (e.g. models/demo)")
    add_graph_arguments(parser, "the graph")
    args = parser.parse_args(argv)
    check = check_from_arguments(args)
    try:
        with torch.no_grad():
            add_vae_encoder(args.package, load_vae(args.vae), fp16=args.fp16, check=check)
        if args.cuda_fp16:
            add_fp16_variants(args.package, ("vae_encoder",), force=True)
    except (ExportError, ManifestError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.join(args.package, ENCODER_PATH)} and {os.path.join(args.package, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
