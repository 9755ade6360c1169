"""Whole packages: every graph of a set of trained modules exported into one folder, with the
tokenizer, the scheduler config and a validated manifest."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from torch import nn

from trainer.export.errors import ExportError
from trainer.export.graphs import (GraphReport, export_afa, export_text_encoder, export_unet, export_vae_decoder,
                                   export_vae_encoder, text_dim)
from trainer.export.manifest import FORMAT, FORMAT_VERSION, write_manifest
from trainer.export.parity import Check
from trainer.export.shared_weights import FOLDER as SHARED_FOLDER
from trainer.export.shared_weights import relayout_package
from trainer.models.afa import AFAEnsemble
from trainer.models.fusion import FusionEnsemble
from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.unet import UNet2DConditionModel
from trainer.models.vae import AutoencoderKL


@dataclass
class EnsembleSpec:
    """An ensemble to export, with the ids of its experts in the order of its U-Nets: an AFAEnsemble (method
    "afa") or a training-free FusionEnsemble (method "fuse")."""

    ensemble: AFAEnsemble
    experts: List[str]
    subsets: bool = True
    title: Optional[str] = None
    description: str = ""


@dataclass
class PackageResult:
    manifest: Dict[str, Any]
    reports: List[GraphReport] = field(default_factory=list)


def architecture_tag(unet: UNet2DConditionModel) -> str:
    """A short tag equal for U-Nets of identical config (hence identical graph structure)."""
    text = json.dumps(unet.config.to_dict(), sort_keys=True)
    return "sd-unet-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def ensemble_method(ensemble: AFAEnsemble) -> str:
    """The manifest's `method` of an ensemble module: "fuse" for the training-free fusion, else "afa"."""
    return "fuse" if isinstance(ensemble, FusionEnsemble) else "afa"


def default_title(ens_id: str, method: str) -> str:
    return f"{ens_id.capitalize()} ({'Fuse' if method == 'fuse' else 'AFA'})"


def _ensemble_expert_ids(ens_id: str, ensemble: AFAEnsemble, experts: Mapping[str, nn.Module]) -> List[str]:
    ids = []
    for k, unet in enumerate(ensemble.unets):
        match = [eid for eid, e in experts.items() if e is unet]
        if not match:
            raise ExportError(f"ensemble {ens_id!r}: its U-Net {k} is none of the experts' modules; "
                              f"pass EnsembleSpec(ensemble, experts=[ids]) to name them")
        ids.append(match[0])
    return ids


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_package(out_dir: str, tokenizer_dir: str, text_encoder: CLIPTextEncoder, vae: AutoencoderKL,
                 experts: Mapping[str, UNet2DConditionModel],
                 ensembles: Mapping[str, Union[AFAEnsemble, EnsembleSpec]],
                 scheduler_config: Mapping[str, Any], manifest_fields: Mapping[str, Any], *,
                 fp16: bool = False, timestep_int64: Iterable[str] = (), attention_mask: bool = False,
                 check: Check = "auto", compact: bool = False, vae_encoder: bool = True,
                 share_weights: bool = False, log=print) -> PackageResult:
    """Exports everything into out_dir and writes a validated manifest.json.

    manifest_fields: name (required), version, description, defaults (required), size, limits,
    display; `experts` / `ensembles`: {id: {title, description, architecture / subsets}} overrides.
    timestep_int64: ids of experts (or ensembles) whose graph takes timestep int64 [B].
    compact: short intermediate value names (see compact_names), for small graphs.
    vae_encoder: also export the VAE's encoder (vae_encoder/model.onnx), which image-to-image needs.
    share_weights: every expert U-Net and ensemble graph ends up in `unets/<id>.onnx` (an expert's config as
    `unets/<id>.config.json`), all reading one `unets/weights.onnx_data` holding each weight once
    (trainer.export.shared_weights.relayout_package, which checks each moved graph's outputs are bit-identical
    in onnxruntime under `check`): the experts' and the ensembles' copies of the U-Net weights are stored
    once. Ensemble graphs then also get compact value names (their structure is megabytes with the
    exporter's names).
    """
    int64_ids = set(timestep_int64)
    fields = dict(manifest_fields)
    expert_fields: Mapping[str, Mapping[str, Any]] = fields.pop("experts", {}) or {}
    ensemble_fields: Mapping[str, Mapping[str, Any]] = fields.pop("ensembles", {}) or {}
    for key in ("name", "defaults"):
        if key not in fields:
            raise ExportError(f"manifest_fields needs {key!r}")
    os.makedirs(out_dir, exist_ok=True)
    reports: List[GraphReport] = []

    def record(report: GraphReport) -> None:
        reports.append(report)
        if log:
            log(report.summary())

    tok_out = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_out, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        src = os.path.join(tokenizer_dir, name)
        if not os.path.isfile(src):
            raise ExportError(f"tokenizer folder {tokenizer_dir} lacks {name}")
        shutil.copyfile(src, os.path.join(tok_out, name))

    record(export_text_encoder(text_encoder, os.path.join(out_dir, "text_encoder", "model.onnx"),
                               fp16=fp16, check=check, compact=compact))
    record(export_vae_decoder(vae, os.path.join(out_dir, "vae_decoder", "model.onnx"), fp16=fp16, check=check,
                              compact=compact))
    if vae_encoder:
        record(export_vae_encoder(vae, os.path.join(out_dir, "vae_encoder", "model.onnx"), fp16=fp16, check=check,
                                  compact=compact))
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), dict(scheduler_config))

    text_width = text_encoder.config.hidden_size
    expert_entries = []
    for eid, unet in experts.items():
        if text_dim(unet) != text_width:
            raise ExportError(f"expert {eid!r} attends to text of width {text_dim(unet)}, the package's "
                              f"text encoder gives {text_width}")
        rel = f"experts/{eid}/unet/model.onnx"
        record(export_unet(unet, os.path.join(out_dir, rel), name=f"unet {eid}", fp16=fp16, check=check,
                           timestep_dtype="int64" if eid in int64_ids else "float32",
                           attention_mask=attention_mask, compact=compact))
        _write_json(os.path.join(out_dir, "experts", eid, "unet", "config.json"), unet.config.to_dict())
        extra = dict(expert_fields.get(eid, {}))
        entry = {"id": eid, "title": extra.pop("title", eid.capitalize()),
                 "description": extra.pop("description", ""), "unet": rel,
                 "architecture": extra.pop("architecture", architecture_tag(unet))}
        entry.update(extra)
        expert_entries.append(entry)

    ensemble_entries = []
    for ens_id, value in ensembles.items():
        spec = value if isinstance(value, EnsembleSpec) else EnsembleSpec(
            value, _ensemble_expert_ids(ens_id, value, experts),
            subsets=bool(ensemble_fields.get(ens_id, {}).get("subsets", True)))
        if len(spec.experts) != spec.ensemble.num_experts:
            raise ExportError(f"ensemble {ens_id!r} has {spec.ensemble.num_experts} U-Nets but names "
                              f"{len(spec.experts)} experts")
        rel = f"ensembles/{ens_id}/model.onnx"
        method = ensemble_method(spec.ensemble)
        record(export_afa(spec.ensemble, os.path.join(out_dir, rel), subsets=spec.subsets, name=f"{method} {ens_id}",
                          timestep_dtype="int64" if ens_id in int64_ids else "float32",
                          attention_mask=attention_mask, fp16=fp16, check=check, compact=compact or share_weights))
        extra = dict(ensemble_fields.get(ens_id, {}))
        extra.pop("subsets", None)
        entry = {"id": ens_id, "title": extra.pop("title", spec.title or default_title(ens_id, method)),
                 "description": extra.pop("description", spec.description), "method": method,
                 "experts": list(spec.experts), "graph": rel, "subsets": spec.subsets}
        entry.update(extra)
        ensemble_entries.append(entry)
    manifest: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": fields.pop("name"),
        "version": fields.pop("version", "1.0.0"),
        "description": fields.pop("description", ""),
        "latent": {"channels": vae.config.latent_channels, "downsample": vae.config.downsample_factor,
                   "scale_factor": float(vae.config.scaling_factor)},
        "tokenizer": "tokenizer",
        "text_encoder": "text_encoder/model.onnx",
        "vae_decoder": "vae_decoder/model.onnx",
    }
    if vae_encoder:
        manifest["vae_encoder"] = "vae_encoder/model.onnx"
    manifest["scheduler"] = "scheduler/scheduler_config.json"
    manifest["defaults"] = fields.pop("defaults")
    for key in ("size", "limits", "display"):
        if key in fields:
            manifest[key] = fields.pop(key)
    if fields:
        raise ExportError(f"unknown manifest_fields: {sorted(fields)}")
    manifest["experts"] = expert_entries
    manifest["ensembles"] = ensemble_entries
    write_manifest(out_dir, manifest)
    if share_weights:
        relayout_package(out_dir, SHARED_FOLDER, check=check, log=log)
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    return PackageResult(manifest=manifest, reports=reports)
