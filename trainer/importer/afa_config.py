"""From an imported package to an AFA training run: the experts' text encoders and the VAE written
as model folders (trainer/io/model_folders.py layout, which `python3 -m trainer.train` reads), and a
training config naming them and the experts' original checkpoints (from sources.json).

    python3 -m trainer.importer.afa_config --package models/mine --data DIR --out runs/mine-afa
                                           [--experts a,b,c] [--hidden 128] [--depth 2]

writes runs/mine-afa/parts/ (text_encoder/, text_encoder-<id>/ for an expert with its own CLIP, vae/)
and runs/mine-afa/afa.json; then

    python3 -m trainer.train afa --config runs/mine-afa/afa.json [--device cuda]
    python3 -m trainer.export --add-to models/mine --method afa --aggregator runs/mine-afa/run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from trainer.importer.errors import ImportFailure
from trainer.importer.inputs import open_vae
from trainer.importer.sources import expert_source, load_expert_text_encoder, read_sources
from trainer.io.model_folders import save_text_encoder, save_vae
from trainer.io.sd_vae import vae_from_state_dict


def _manifest(package_dir: str) -> Dict[str, Any]:
    path = os.path.join(package_dir, "manifest.json")
    if not os.path.isfile(path):
        raise ImportFailure(f"{package_dir}: no manifest.json (not a model package)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_afa_config(package_dir: str, out_dir: str, data: str, experts: Optional[Sequence[str]] = None,
                     hidden: int = 128, depth: int = 2, log=print) -> str:
    """Writes out_dir/parts/ and out_dir/afa.json; returns the config's path."""
    package_dir = os.path.abspath(package_dir)
    out_dir = os.path.abspath(out_dir)
    manifest = _manifest(package_dir)
    sources = read_sources(package_dir)
    entries = {e["id"]: e for e in manifest["experts"]}
    ids = list(experts) if experts else list(entries)
    unknown = [i for i in ids if i not in entries or i not in sources.get("experts", {})]
    if unknown:
        raise ImportFailure(f"{package_dir} has no imported expert {', '.join(map(repr, unknown))} "
                            f"(it has {', '.join(sorted(sources.get('experts', {})))})")
    if len(ids) < 2:
        raise ImportFailure("an ensemble needs at least 2 experts")
    parts = os.path.join(out_dir, "parts")
    text_encoders: List[Dict[str, str]] = []
    written: Dict[str, str] = {}
    for i in ids:
        own = entries[i].get("text_encoder")
        key = own or "package"
        if key not in written:
            folder = os.path.join(parts, f"text_encoder-{i}" if own else "text_encoder")
            donor = i if own else next(e["id"] for e in manifest["experts"]
                                       if not e.get("text_encoder") and e["id"] in sources["experts"])
            save_text_encoder(load_expert_text_encoder(package_dir, donor), folder)
            log(f"text encoder of {donor} -> {os.path.relpath(folder)}")
            written[key] = folder
        text_encoders.append({"pretrained": written[key]})
    vae_entry = sources.get("vae") or {}
    if not vae_entry.get("path"):
        raise ImportFailure(f"{package_dir}/sources.json does not say where the VAE came from")
    _, state, config = open_vae(vae_entry["path"], allow_pickle=bool(vae_entry.get("pickle")))
    save_vae(vae_from_state_dict(state, config), os.path.join(parts, "vae"))
    log(f"VAE of {os.path.basename(vae_entry['path'])} -> {os.path.relpath(os.path.join(parts, 'vae'))}")
    unet_specs = []
    for i in ids:
        spec: Dict[str, Any] = {"pretrained": expert_source(package_dir, i)["path"]}
        config_path = os.path.join(package_dir, "experts", i, "unet", "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                spec["config"] = json.load(f)
        unet_specs.append(spec)
    config = {
        "out_dir": os.path.join(out_dir, "run"),
        "data": {"type": "folder", "path": os.path.abspath(data)},
        "tokenizer": os.path.join(package_dir, manifest.get("tokenizer", "tokenizer")),
        "scheduler": os.path.join(package_dir, manifest.get("scheduler", "scheduler/scheduler_config.json")),
        "vae": {"pretrained": os.path.join(parts, "vae")},
        "experts": unet_specs,
        "expert_ids": ids,
        "text_encoders": text_encoders,
        "afa": {"hidden": hidden, "depth": depth},
        "train": {"expert_dropout": 0.3},
    }
    path = os.path.join(out_dir, "afa.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    log(f"wrote {os.path.relpath(path)}: python3 -m trainer.train afa --config {os.path.relpath(path)}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m trainer.importer.afa_config",
                                description="An AFA training config for an imported package (docs/import.md).")
    p.add_argument("--package", required=True, help="a package written by npm run import")
    p.add_argument("--data", required=True, help="training images with captions (trainer/training/data.py)")
    p.add_argument("--out", required=True, help="folder for parts/ and afa.json")
    p.add_argument("--experts", help="comma-separated expert ids (default: all, in the manifest's order)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    args = p.parse_args(argv)
    try:
        write_afa_config(args.package, args.out, args.data, args.experts.split(",") if args.experts else None,
                         args.hidden, args.depth)
    except ImportFailure as e:
        print(f"afa_config failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
