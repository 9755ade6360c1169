"""The package manifest (docs/model-package.md): validation with every problem named, and writing it.

The manifest's own rules are docs/manifest.schema.json's (trainer.export.manifest_schema); what needs
the package folder (files inside it, the inputs and outputs of its graphs) is checked here.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, List, Mapping, Optional

from trainer.export.errors import ManifestError
from trainer.export.manifest_schema import graph_variants, manifest_problems
from trainer.export.onnx_io import graph_io

FORMAT = "ensemble-diffusion-package"
FORMAT_VERSION = 1


def validate_manifest(manifest: Mapping[str, Any], package_dir: Optional[str] = None) -> None:
    """Raises ManifestError listing every way `manifest` breaks docs/manifest.schema.json and the rules
    across its fields (trainer.export.manifest_schema, the same rules as the engine's reader).

    With package_dir, also checks that every named file exists inside the package and that the
    graphs have the inputs and outputs their role needs.
    """
    problems = manifest_problems(manifest)
    if package_dir is not None and not problems:
        problems += _check_package_files(manifest, package_dir)
    if problems:
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(problems))


def _check_package_files(m: Mapping[str, Any], package_dir: str) -> List[str]:
    problems: List[str] = []
    root = os.path.realpath(package_dir)

    def resolve(rel: str, what: str, is_dir: bool = False) -> Optional[str]:
        if os.path.isabs(rel):
            problems.append(f"{what}: {rel!r} must be relative to the package folder")
            return None
        full = os.path.realpath(os.path.join(root, rel))
        if not (full == root or full.startswith(root + os.sep)):
            problems.append(f"{what}: {rel!r} leaves the package folder")
            return None
        if not (os.path.isdir(full) if is_dir else os.path.isfile(full)):
            problems.append(f"{what}: {rel} is missing")
            return None
        return full

    def resolve_graphs(ref: Any, what: str) -> List[str]:
        """Every variant of a graph reference (a path, or {"fp32": path, "fp16": path}) that exists."""
        variants = graph_variants(ref)
        named = len(variants) > 1 or "fp32" not in variants
        found = [resolve(rel, f"{what} ({p})" if named else what) for p, rel in variants.items()]
        return [f for f in found if f is not None]

    tokenizer = resolve(m.get("tokenizer", "tokenizer"), "tokenizer", is_dir=True)
    if tokenizer:
        for f in ("vocab.json", "merges.txt"):
            resolve(os.path.join(m.get("tokenizer", "tokenizer"), f), "tokenizer")
    text_encoders = resolve_graphs(m.get("text_encoder", "text_encoder/model.onnx"), "text_encoder")
    vaes = resolve_graphs(m.get("vae_decoder", "vae_decoder/model.onnx"), "vae_decoder")
    encoders = resolve_graphs(m["vae_encoder"], "vae_encoder") if "vae_encoder" in m else []
    resolve(m.get("scheduler", "scheduler/scheduler_config.json"), "scheduler")

    def needs(path: Optional[str], what: str, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        if path is None:
            return
        have_in, have_out = graph_io(path)
        lacking = [f"input {n!r}" for n in inputs if n not in have_in] + \
                  [f"output {n!r}" for n in outputs if n not in have_out]
        if lacking:
            problems.append(f"{what} graph lacks {', '.join(lacking)} (has inputs {sorted(have_in)}, "
                            f"outputs {sorted(have_out)})")

    for path in text_encoders:
        needs(path, "text_encoder", ["input_ids"], ["last_hidden_state"])
    for path in vaes:
        needs(path, "vae_decoder", ["latent_sample"], ["sample"])
    for encoder in encoders:
        needs(encoder, "vae_encoder", ["sample"], [])
        _, encoder_out = graph_io(encoder)
        if not {"latent_parameters", "latent_sample"} & set(encoder_out):
            problems.append(f"vae_encoder graph lacks output 'latent_parameters' (mean and logvar) or 'latent_sample' "
                            f"(has outputs {sorted(encoder_out)})")
    unet_inputs = ["sample", "timestep", "encoder_hidden_states"]
    for e in m["experts"]:
        base = e.get("path")
        what = f"expert {e['id']!r} unet"
        for path in resolve_graphs(e.get("unet") or os.path.join(base, "unet", "model.onnx"), what):
            needs(path, what, unet_inputs, [])
        if e.get("text_encoder") or base:
            resolve_graphs(e.get("text_encoder") or os.path.join(base, "text_encoder", "model.onnx"),
                           f"expert {e['id']!r} text_encoder")
        if e.get("tokenizer") or base:
            resolve(e.get("tokenizer") or os.path.join(base, "tokenizer"), f"expert {e['id']!r} tokenizer", True)
    for ens in m.get("ensembles", []):
        what = f"ensemble {ens['id']!r}"
        inputs = unet_inputs + (["expert_mask"] if ens.get("subsets") else [])
        for path in resolve_graphs(ens["graph"], what):
            needs(path, what, inputs, ["contributions"])
            have_in, _ = graph_io(path)
            dims = have_in["encoder_hidden_states"].type.tensor_type.shape.dim if "encoder_hidden_states" in have_in else []
            if len(dims) == 4 and dims[0].dim_value and dims[0].dim_value != len(ens["experts"]):
                problems.append(f"{what}: its graph stacks {dims[0].dim_value} experts, the manifest lists "
                                f"{len(ens['experts'])}")
    return problems


def write_manifest(package_dir: str, manifest: Mapping[str, Any]) -> str:
    """Validates `manifest` against the package folder and writes package_dir/manifest.json."""
    validate_manifest(manifest, package_dir)
    path = os.path.join(package_dir, "manifest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path
