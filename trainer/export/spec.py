"""Packages from trained model folders named in a JSON spec: `python3 -m trainer.export --spec
package-spec.json --out models/<name> [--fp16] [--check auto|require|off]` (see package_from_spec).
`python3 -m trainer.export --add-to PKG --method fuse|afa …` adds an ensemble (trainer.export.add_to);
`python3 -m trainer.export --relayout PKG` moves its U-Net-bearing graphs into one folder sharing one
weights file (trainer.export.shared_weights)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from trainer.export import add_to, shared_weights
from trainer.export.errors import ExportError, ManifestError
from trainer.export.fp16_compute import add_fp16_variants
from trainer.export.package import EnsembleSpec, PackageResult, save_package
from trainer.export.parity import Check, add_graph_arguments, check_from_arguments
from trainer.io.model_folders import (afa_hyperparameters, load_aggregators, load_text_encoder, load_unet, load_vae,
                                      read_afa_config)
from trainer.models.afa import AFAEnsemble
from trainer.models.unet import UNet2DConditionModel


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def package_from_spec(spec_path: str, out_dir: str, *, fp16: bool = False, check: Check = "auto",
                      log=print) -> PackageResult:
    """Builds a package from a JSON spec naming the trained model folders (paths relative to the spec):

        {"name": "demo", "version": "1.0.0", "description": "…",
         "tokenizer": "runs/tokenizer", "text_encoder": "runs/base/final", "vae": "runs/vae/final",
         "scheduler": "runs/base/final/scheduler_config.json"  (or the config object itself),
         "experts": [{"id": "curves", "title": "Curves", "description": "…", "unet": "runs/curves/final",
                      "timestep": "int64"?}],
         "ensembles": [{"id": "trio", "title": "…", "experts": ["curves", …], "afa": "runs/trio/final",
                        "subsets": true}],
         "defaults": {…}, "size": {…}, "limits": {…}?, "display": {…}?, "attention_mask": false,
         "vae_encoder": true  (false: no vae_encoder graph, so no image-to-image)}
    """
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    base = os.path.dirname(os.path.abspath(spec_path))
    text_encoder = load_text_encoder(_resolve(base, spec["text_encoder"]))
    vae = load_vae(_resolve(base, spec["vae"]))
    scheduler = spec["scheduler"]
    if isinstance(scheduler, str):
        with open(_resolve(base, scheduler), encoding="utf-8") as f:
            scheduler = json.load(f)
    experts: Dict[str, UNet2DConditionModel] = {}
    expert_fields: Dict[str, Dict[str, Any]] = {}
    int64_ids = []
    for e in spec["experts"]:
        experts[e["id"]] = load_unet(_resolve(base, e["unet"])).eval()
        expert_fields[e["id"]] = {k: e[k] for k in ("title", "description", "architecture") if k in e}
        if e.get("timestep") == "int64":
            int64_ids.append(e["id"])
    ensembles: Dict[str, EnsembleSpec] = {}
    for ens in spec.get("ensembles", []):
        folder = _resolve(base, ens["afa"])
        hyper = read_afa_config(folder)
        ensemble = AFAEnsemble([experts[x] for x in ens["experts"]],
                               **{k: hyper[k] for k in ("hidden", "depth", "heads", "head_dim") if k in hyper})
        load_aggregators(ensemble, folder)
        assert afa_hyperparameters(ensemble)["num_experts"] == len(ens["experts"])
        ensembles[ens["id"]] = EnsembleSpec(ensemble, list(ens["experts"]), subsets=bool(ens.get("subsets", False)),
                                            title=ens.get("title"), description=ens.get("description", ""))
    fields = {k: spec[k] for k in ("name", "version", "description", "defaults", "size", "limits", "display")
              if k in spec}
    fields["experts"] = expert_fields
    return save_package(out_dir, _resolve(base, spec["tokenizer"]), text_encoder, vae, experts, ensembles,
                        scheduler, fields, fp16=fp16, timestep_int64=int64_ids,
                        attention_mask=bool(spec.get("attention_mask", False)), check=check,
                        vae_encoder=bool(spec.get("vae_encoder", True)), log=log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--add-to" or a.startswith("--add-to=") for a in argv):
        return add_to.main(argv)  # adding an ensemble to an existing package (trainer.export.add_to)
    if any(a == "--relayout" or a.startswith("--relayout=") for a in argv):
        return shared_weights.main(argv)  # every U-Net-bearing graph into one folder, one weights file
    parser = argparse.ArgumentParser(description="Export trained models into an ensemble-diffusion model package.")
    parser.add_argument("--spec", required=True, help="JSON spec naming the model folders (see package_from_spec)")
    parser.add_argument("--out", required=True, help="package folder to write (e.g. models/demo)")
    add_graph_arguments(parser, "every graph")
    args = parser.parse_args(argv)
    check = check_from_arguments(args)
    try:
        with torch.no_grad():
            result = package_from_spec(args.spec, args.out, fp16=args.fp16, check=check)
        if args.cuda_fp16:
            add_fp16_variants(args.out)
    except (ExportError, ManifestError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.join(args.out, 'manifest.json')} ({len(result.reports)} graphs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
