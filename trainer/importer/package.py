"""SD1.x checkpoints → a model package (docs/model-package.md, docs/import.md).

Everything is checked before any graph is exported (each input's kind, its U-Net against its shapes,
ids, text widths, where the VAE comes from), then written into a temporary folder beside `out` and
renamed into place at the end: a failure leaves nothing behind. One expert's weights are in memory
at a time (read, exported, released).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from trainer.diffusion.schedules import SD1_SCHEDULE
from trainer.export.errors import ExportError, ManifestError
from trainer.export.fp16_compute import add_fp16_variants
from trainer.export.graphs import export_text_encoder, export_unet, export_vae_decoder, export_vae_encoder
from trainer.export.large_graph import STREAM_ABOVE, export_unet_streamed, fp32_bytes
from trainer.export.manifest import FORMAT, FORMAT_VERSION, write_manifest
from trainer.export.package import architecture_tag
from trainer.export.parity import Check
from trainer.importer.errors import ImportFailure
from trainer.importer.inputs import Checkpoint, open_input, open_vae
from trainer.importer.weight_files import PICKLE_SUFFIXES, sha256_of, weights_hash
from trainer.importer.naming import expert_ids, title
from trainer.importer.sources import SOURCES_FILE
from trainer.io.sd_text_encoder import text_encoder_from_state_dict
from trainer.io.sd_vae import vae_from_state_dict
from trainer.models.unet import UNet2DConditionModel, UNetConfig

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_tokenizer")

# diffusers' SD1.5 scheduler config (runwayml/stable-diffusion-v1-5 scheduler/), made explicit.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    **SD1_SCHEDULE,
    "skip_prk_steps": True,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
SD_DEFAULTS = {"steps": 25, "guidance": 7.5, "scheduler": "dpmpp_2m"}
SD15_CHANNELS = (320, 640, 1280, 1280)


@dataclass
class ImportOptions:
    out: str
    inputs: Sequence[str]
    name: Optional[str] = None
    vae: Optional[str] = None
    fp16: bool = True                  # weights stored float16 (compute float32); False: float32
    force: bool = False
    allow_pickle: bool = False
    size: Optional[int] = None         # default picture side; derived from the U-Net when None
    steps: Optional[int] = None
    check: Check = "auto"
    cuda_fp16: bool = False            # also float16-compute variants (model.fp16.onnx) for CUDA (contract C1)
    stream_above: int = STREAM_ABOVE   # U-Nets with more float32 bytes are exported tensor by tensor


@dataclass
class _Expert:
    id: str
    source: Checkpoint
    text_hash: str = ""
    text_encoder: Optional[str] = None  # its own graph, when its CLIP differs from the package's


@dataclass
class ImportResult:
    out: str
    manifest: Dict[str, Any]
    notes: List[str] = field(default_factory=list)


def natural_size(config: UNetConfig, downsample: int) -> int:
    """The picture side the U-Net was made for: SD1.x's 512, else latents whose lowest level is 8×8."""
    return 8 * downsample * 2 ** (len(config.block_out_channels) - 1)


def size_fields(side: int, multiple: int) -> Dict[str, int]:
    """{min, max}: half and 1.5× the default side (SD1.x: 256–768), multiples of the latent step."""
    low = max(multiple, (side // 2) // multiple * multiple)
    high = max(side, (side * 3 // 2) // multiple * multiple)
    return {"min": low, "max": high}


def _open_all(paths: Sequence[str], allow_pickle: bool) -> List[Checkpoint]:
    if not paths:
        raise ImportFailure("no checkpoints given")
    seen: Dict[str, str] = {}
    sources = []
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ImportFailure(f"{p} is given twice (also as {seen[real]})")
        seen[real] = p
        sources.append(open_input(p, allow_pickle))
    return sources


def _storage_dtype(fp16: bool) -> torch.dtype:
    return torch.float16 if fp16 else torch.float32


def _plan_text_encoders(experts: List[_Expert], fp16: bool, log) -> str:
    """Hashes every expert's CLIP (one at a time; its width must be its U-Net's); the most common one
    becomes the package's (ties: the first listed). Returns its hash."""
    for e in experts:
        if not e.source.has_text_encoder:
            raise ImportFailure(f"{e.source.display}: it has no text encoder (cond_stage_model.*); only full SD1.x "
                                f"checkpoints are supported")
        state, config = e.source.text_encoder_state()
        width = config.hidden_size if config else state["text_model.embeddings.token_embedding.weight"].shape[1]
        unet_width = e.source.unet_config(None).cross_attention_dims()[0]
        if width != unet_width:
            raise ImportFailure(f"{e.source.display}: its U-Net attends to text of width {unet_width}, its text "
                                f"encoder gives {width}")
        e.text_hash = weights_hash(state, _storage_dtype(fp16))
        del state
        e.source.release()
    counts = Counter(e.text_hash for e in experts)
    shared = max(counts, key=lambda h: (counts[h], -[e.text_hash for e in experts].index(h)))
    own = [e for e in experts if e.text_hash != shared]
    owners: Dict[str, str] = {}
    for e in own:
        owners.setdefault(e.text_hash, e.id)
        e.text_encoder = f"experts/{owners[e.text_hash]}/text_encoder/model.onnx"
    log(f"text encoders: {len(counts)} distinct; the package's is shared by "
        f"{', '.join(e.id for e in experts if e.text_hash == shared)}"
        + "".join(f"; {e.id} has its own" if owners[e.text_hash] == e.id else
                  f"; {e.id} shares {owners[e.text_hash]}'s" for e in own))
    return shared


def _export_text_encoder(e: _Expert, path: str, opts: ImportOptions, record) -> None:
    state, config = e.source.text_encoder_state()
    model = text_encoder_from_state_dict(state, config)
    del state
    e.source.release()
    record(export_text_encoder(model, path, fp16=opts.fp16, check=opts.check))


def _export_expert_unet(e: _Expert, config: UNetConfig, path: str, opts: ImportOptions, record, log):
    """Writes expert e's U-Net graph; returns the U-Net (on the meta device when it was streamed).

    A U-Net above opts.stream_above bytes of float32 (SD1.5's: 3.4 GB) is written tensor by tensor from
    the checkpoint onto a graph traced with placeholder weights (trainer.export.large_graph): held in
    memory as PyTorch's float32 copy plus the exporter's protobuf, one SD1.5 U-Net needs over 12 GB.
    Its parity against PyTorch is then not run here (the tests prove the streamed export on small models)."""
    skeleton = UNet2DConditionModel(config, device="meta")
    size = fp32_bytes(skeleton)
    if size > opts.stream_above:
        log(f"unet {e.id}: {size / 1e9:.1f} GB of float32 weights: written tensor by tensor "
            f"from the checkpoint")
        try:
            record(export_unet_streamed(skeleton, path, lambda: e.source.unet_state(config), name=f"unet {e.id}",
                                        fp16=opts.fp16, check=opts.check))
        finally:
            e.source.release()
        return skeleton
    unet = e.source.unet(config)
    e.source.release()
    record(export_unet(unet, path, name=f"unet {e.id}", fp16=opts.fp16, check=opts.check))
    return unet


def _vae(opts: ImportOptions, experts: List[_Expert], log):
    if opts.vae:
        where, state, config = open_vae(opts.vae, opts.allow_pickle)
        log(f"VAE: from --vae {os.path.basename(where)}")
        return where, vae_from_state_dict(state, config)
    for e in experts:
        if e.source.has_vae:
            state, config = e.source.vae_state()
            e.source.release()
            log(f"VAE: from {e.source.display} (the first input that has one; --vae FILE picks another)")
            try:
                return e.source.path, vae_from_state_dict(state, config)
            except ValueError as err:
                raise ImportFailure(f"{e.source.display}: {err}") from None
    raise ImportFailure("none of the inputs has a VAE (first_stage_model.* or vae/); pass one with --vae FILE")


def _temp_dir_beside(out: str) -> str:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.import-", dir=parent)


def import_checkpoints(opts: ImportOptions, log: Callable[[str], None] = print) -> ImportResult:
    """Writes the package `opts.out` from the checkpoints `opts.inputs`; ImportFailure on bad input."""
    out = os.path.abspath(opts.out)
    if os.path.exists(out) and not opts.force:
        raise ImportFailure(f"{opts.out} already exists; pass --force to replace it")
    if (opts.size is not None and opts.size <= 0) or (opts.steps is not None and not 1 <= opts.steps <= 1000):
        raise ImportFailure("--size must be a positive number of pixels and --steps 1–1000")
    sources = _open_all(opts.inputs, opts.allow_pickle)
    ids, notes = expert_ids([(s.stem, given) for s, given in zip(sources, opts.inputs)], opts.force)
    for note in notes:
        log(note)
    experts = [_Expert(i, s) for i, s in zip(ids, sources)]
    configs = [s.unet_config(None) for s in sources]
    shared_hash = _plan_text_encoders(experts, opts.fp16, log)
    vae_path, vae = _vae(opts, experts, log)
    downsample = vae.config.downsample_factor
    is_sd15 = all(c.block_out_channels == SD15_CHANNELS for c in configs)
    side = opts.size or natural_size(configs[0], downsample)
    if side % downsample:
        raise ImportFailure(f"--size {side} is not a multiple of the VAE's downsampling {downsample}")
    sample_size = side // downsample
    parts = {"vae": vae}
    del vae  # _write drops it once exported: one U-Net at a time is what stays in memory
    staging = _temp_dir_beside(out)
    try:
        manifest = _write(staging, opts, experts, parts, vae_path, shared_hash, sample_size, downsample, log)
        if os.path.exists(out):
            old = _temp_dir_beside(out)
            os.rmdir(old)
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kind = "SD1.5-architecture" if is_sd15 else "SD1.x-layout (not SD1.5's size)"
    log(f"wrote {opts.out}: {len(experts)} {kind} experts ({', '.join(ids)}), {side}×{side} by default")
    return ImportResult(out=out, manifest=manifest, notes=notes)


def _write(staging: str, opts: ImportOptions, experts: List[_Expert], parts: Dict[str, Any], vae_path: str,
           shared_hash: str, sample_size: int, downsample: int, log) -> Dict[str, Any]:
    side = sample_size * downsample
    vae = parts.pop("vae")
    def record(report) -> None:
        log(report.summary().replace(os.path.relpath(report.path), os.path.relpath(report.path, staging)))

    try:
        os.makedirs(os.path.join(staging, "tokenizer"))
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(staging, "tokenizer", name))
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), SD15_SCHEDULER)
        record(export_vae_decoder(vae, os.path.join(staging, "vae_decoder", "model.onnx"), fp16=opts.fp16,
                                  check=opts.check))
        record(export_vae_encoder(vae, os.path.join(staging, "vae_encoder", "model.onnx"), fp16=opts.fp16,
                                  check=opts.check))
        latent = {"channels": vae.config.latent_channels, "downsample": downsample,
                  "scale_factor": float(vae.config.scaling_factor)}
        del vae
        shared = next(e for e in experts if e.text_hash == shared_hash)
        _export_text_encoder(shared, os.path.join(staging, "text_encoder", "model.onnx"), opts, record)
        for e in experts:
            if e.text_encoder == f"experts/{e.id}/text_encoder/model.onnx":
                _export_text_encoder(e, os.path.join(staging, e.text_encoder), opts, record)
        entries = []
        sources: Dict[str, Any] = {}
        for e in experts:
            config = e.source.unet_config(sample_size)
            rel = f"experts/{e.id}/unet/model.onnx"
            unet = _export_expert_unet(e, config, os.path.join(staging, rel), opts, record, log)
            _write_json(os.path.join(staging, "experts", e.id, "unet", "config.json"), config.to_dict())
            entry = {"id": e.id, "title": title(e.source.stem),
                     "description": f"imported from {e.source.display}" + (" (EMA weights)" if getattr(
                         e.source, "ema", False) else ""),
                     "unet": rel, "architecture": architecture_tag(unet)}
            if e.text_encoder:
                entry["text_encoder"] = e.text_encoder
            entries.append(entry)
            del unet
            gc.collect()
            sources[e.id] = {"path": e.source.path, "format": e.source.format, "sha256": e.source.sha256()}
            if getattr(getattr(e.source, "file", None), "pickled", False):
                sources[e.id]["pickle"] = True
        manifest: Dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": opts.name or os.path.basename(os.path.abspath(opts.out)),
            "version": "1.0.0",
            "description": f"{len(experts)} SD1.x checkpoints imported by npm run import",
            "latent": latent, "tokenizer": "tokenizer", "text_encoder": "text_encoder/model.onnx",
            "vae_decoder": "vae_decoder/model.onnx", "vae_encoder": "vae_encoder/model.onnx",
            "scheduler": "scheduler/scheduler_config.json",
            "defaults": {**SD_DEFAULTS, "steps": opts.steps or SD_DEFAULTS["steps"], "width": side, "height": side},
            "size": size_fields(side, downsample),
            "experts": entries, "ensembles": [],
        }
        write_manifest(staging, manifest)
        if opts.cuda_fp16:
            add_fp16_variants(staging, log=lambda line: log(line.replace(staging + os.sep, "")))
            with open(os.path.join(staging, "manifest.json"), encoding="utf-8") as f:
                manifest = json.load(f)
        vae_source: Dict[str, Any] = {"path": vae_path, "sha256": _file_sha(vae_path)}
        if vae_path.lower().endswith(PICKLE_SUFFIXES):
            vae_source["pickle"] = True
        _write_json(os.path.join(staging, SOURCES_FILE), {"experts": sources, "vae": vae_source})
        return manifest
    except (ExportError, ManifestError) as e:
        raise ImportFailure(f"export failed: {' '.join(str(e).split())}") from None


def _file_sha(path: str) -> Optional[str]:
    return sha256_of([path]) if os.path.isfile(path) else None


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
