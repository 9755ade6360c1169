"""The package's graph kinds exported from PyTorch modules, each checked after writing: text
encoder, VAE decoder, VAE encoder (optional: image-to-image), U-Net (one expert) and the fused AFA
ensemble.

Every graph is exported with the TorchScript exporter at opset 17 (dynamic batch and latent size),
then checked with `onnx.checker` and run in onnxruntime-node (trainer.export.ort_check) on random
inputs of a batch and size other than the traced ones; an output further than the tolerance from
PyTorch raises `ExportDriftError` naming the graph, the output and the error.

`fp16=True` stores weights as float16 and casts them to float32 inside the graph: half the bytes on
disk, float32 arithmetic (so the graph runs on onnxruntime's CPU provider, which lacks float16
kernels for most ops), inputs and outputs float32. onnxruntime folds the casts when it loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import onnx
import torch
from torch import Tensor, nn

from trainer.export.errors import ExportError
from trainer.export.fp16 import compact_names, round_weights_fp16, store_weights_fp16
from trainer.export.onnx_io import (VAE_ENCODER_AXES, VAEEncoderGraph, file_bytes, graph_signature, save_onnx,
                                    torch_export)
from trainer.export.parity import FP32_TOLERANCE, Check, check_parity
from trainer.models.afa import AFAEnsemble, contribution_map
from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.unet import UNet2DConditionModel
from trainer.models.vae import AutoencoderKL, VAEDecoderOnly

TEXT_LENGTH = 77


@dataclass
class GraphReport:
    graph: str                       # e.g. "unet alpha"
    path: str
    inputs: Dict[str, str]           # name -> "float32[batch,4,height,width]"
    outputs: Dict[str, str]
    weights_dtype: str               # "float32" | "float16"
    bytes: int
    max_abs_error: Optional[Dict[str, float]] = None  # None when onnxruntime was not available
    tolerance: float = FP32_TOLERANCE
    skipped_reason: Optional[str] = None

    def summary(self) -> str:
        if self.max_abs_error is None:
            parity = f"parity not checked ({self.skipped_reason})"
        else:
            worst = max(self.max_abs_error.values()) if self.max_abs_error else 0.0
            parity = f"max abs error {worst:.2e} ≤ {self.tolerance:g}"
        return f"{self.graph}: {os.path.relpath(self.path)} ({self.bytes / 1e6:.2f} MB, {self.weights_dtype}), {parity}"


# ---------------------------------------------------------------------------------------------
# Graph modules: the exact signatures of the package's graphs


class UNetGraph(nn.Module):
    """(sample, timestep, encoder_hidden_states[, encoder_attention_mask][, class_labels]) -> out_sample."""

    def __init__(self, unet: UNet2DConditionModel, input_names: Sequence[str]):
        super().__init__()
        self.unet = unet
        self.input_names = list(input_names)

    def forward(self, *inputs: Tensor) -> Tensor:
        named = dict(zip(self.input_names, inputs))
        return self.unet(named["sample"], named["timestep"], named["encoder_hidden_states"],
                         named.get("encoder_attention_mask"), named.get("class_labels"))


class AFAGraph(nn.Module):
    """(sample, timestep, encoder_hidden_states [N,B,77,D][, expert_mask [N]][, encoder_attention_mask]
    [, class_labels [N,B,P]]) -> (out_sample, contributions [B,N,h,w])."""

    def __init__(self, ensemble: AFAEnsemble, input_names: Sequence[str]):
        super().__init__()
        self.ensemble = ensemble
        self.input_names = list(input_names)

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, Tensor]:
        named = dict(zip(self.input_names, inputs))
        sample = named["sample"]
        out, weights = self.ensemble(sample, named["timestep"], named["encoder_hidden_states"],
                                     named.get("expert_mask"),
                                     encoder_attention_mask=named.get("encoder_attention_mask"),
                                     class_labels=named.get("class_labels"))
        return out, contribution_map(weights, sample.shape[-2:])


def _finish(graph: str, path: str, module: nn.Module, feed_sets: Sequence[Mapping[str, Tensor]],
            output_names: Sequence[str], fp16: bool, check: Check, tolerance: float,
            compact: bool) -> GraphReport:
    """Optional renaming and fp16 storage, onnx.checker, ORT parity; the report of one exported graph."""
    if fp16 or compact:
        model = onnx.load(path)
        if compact:
            model = compact_names(model)
        if fp16:
            model = store_weights_fp16(model)
            module = round_weights_fp16(module)
        save_onnx(model, path)
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{graph}: onnx.checker rejects {path}: {e}") from None
    errors, skipped = check_parity(graph, path, module, feed_sets, output_names, tolerance, check)
    inputs, outputs = graph_signature(path)
    return GraphReport(graph=graph, path=path, inputs=inputs, outputs=outputs,
                       weights_dtype="float16" if fp16 else "float32", bytes=file_bytes(path),
                       max_abs_error=errors, tolerance=tolerance, skipped_reason=skipped)


# ---------------------------------------------------------------------------------------------
# The graph kinds


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_ids(config, batch: int, generator: torch.Generator) -> Tensor:
    """CLIP-like rows: random content, then EOS padding from a different length per row."""
    ids = torch.randint(0, config.vocab_size, (batch, TEXT_LENGTH), generator=generator)
    ids[ids == config.eos_token_id] = 0
    for row in range(batch):
        length = 1 + (row * 29 + 7) % (TEXT_LENGTH - 1)
        ids[row, length:] = config.eos_token_id
    return ids


def export_text_encoder(model: CLIPTextEncoder, path: str, *, fp16: bool = False, check: Check = "auto",
                        tolerance: float = FP32_TOLERANCE, seed: int = 0,
                        compact: bool = False) -> GraphReport:
    """input_ids int64 [B,77] -> last_hidden_state [B,77,D], pooler_output [B,D]."""
    model = model.eval()
    example = torch.full((1, TEXT_LENGTH), model.config.eos_token_id, dtype=torch.long)
    output_names = ["last_hidden_state", "pooler_output"]
    torch_export(model, (example,), path, ["input_ids"], output_names,
                  {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}})
    feeds = [{"input_ids": _random_ids(model.config, 3, _generator(seed))}]
    return _finish("text_encoder", path, model, feeds, output_names, fp16, check, tolerance, compact)


def export_vae_decoder(vae: AutoencoderKL, path: str, *, fp16: bool = False, check: Check = "auto",
                       tolerance: float = FP32_TOLERANCE, seed: int = 0, compact: bool = False) -> GraphReport:
    """latent_sample [B,C,h,w] (already divided by the scale factor) -> sample [B,3,H,W]."""
    module = VAEDecoderOnly(vae).eval()
    c = vae.config.latent_channels
    torch_export(module, (torch.zeros(1, c, 8, 8),), path, ["latent_sample"], ["sample"],
                  {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                   "sample": {0: "batch", 2: "pixel_height", 3: "pixel_width"}})
    feeds = [{"latent_sample": torch.randn(2, c, 6, 5, generator=_generator(seed))}]
    return _finish("vae_decoder", path, module, feeds, ["sample"], fp16, check, tolerance, compact)


def export_vae_encoder(vae: AutoencoderKL, path: str, *, fp16: bool = False, check: Check = "auto",
                       tolerance: float = FP32_TOLERANCE, seed: int = 0, compact: bool = False) -> GraphReport:
    """sample [B,3,H,W] in [-1,1] -> latent_parameters [B,2C,h,w]: the posterior's mean, then its logvar
    (clamped to [-30, 20]), unscaled (the engine multiplies the drawn latent by the scale factor)."""
    module = VAEEncoderGraph(vae).eval()
    d = vae.config.downsample_factor
    channels = vae.config.in_channels
    torch_export(module, (torch.zeros(1, channels, 8 * d, 8 * d),), path, ["sample"], ["latent_parameters"],
                 VAE_ENCODER_AXES)
    g = _generator(seed)
    # another batch and other (odd) latent sizes than the traced ones; pictures in [-1, 1]
    feeds = [{"sample": torch.rand(2, channels, 5 * d, 7 * d, generator=g) * 2 - 1},
             {"sample": torch.rand(1, channels, 3 * d, 2 * d, generator=g) * 2 - 1}]
    return _finish("vae_encoder", path, module, feeds, ["latent_parameters"], fp16, check, tolerance, compact)


def _timestep_example(dtype: str, values: Sequence[float]) -> Tensor:
    if dtype == "float32":
        return torch.tensor(values, dtype=torch.float32)
    if dtype == "int64":
        return torch.tensor([int(round(v)) for v in values], dtype=torch.int64)
    raise ValueError(f"timestep dtype must be 'float32' or 'int64', got {dtype!r}")


def _unet_extras(unet: UNet2DConditionModel, attention_mask: bool) -> List[str]:
    extras = ["encoder_attention_mask"] if attention_mask else []
    if unet.config.class_embed_type == "projection":
        extras.append("class_labels")
    return extras


def text_dim(unet: UNet2DConditionModel) -> int:
    dims = set(unet.config.cross_attention_dims())
    if len(dims) != 1:
        raise ExportError(f"U-Net blocks use different cross_attention_dim {sorted(dims)}: the package "
                          f"graph takes one encoder_hidden_states width")
    return dims.pop()


def _extra_feed(name: str, unet: UNet2DConditionModel, batch: int, generator: torch.Generator,
                experts: Optional[int] = None) -> Tensor:
    if name == "encoder_attention_mask":
        mask = torch.ones(batch, TEXT_LENGTH)
        for row in range(batch):
            mask[row, 2 + (row * 11) % (TEXT_LENGTH - 2):] = 0
        return mask
    lead = (experts,) if experts else ()
    return torch.randn(*lead, batch, unet.config.projection_class_embeddings_input_dim, generator=generator)


def export_unet(unet: UNet2DConditionModel, path: str, *, timestep_dtype: str = "float32",
                attention_mask: bool = False, fp16: bool = False, check: Check = "auto",
                tolerance: float = FP32_TOLERANCE, seed: int = 0, name: str = "unet",
                compact: bool = False, writer: Optional[Callable[..., GraphReport]] = None) -> GraphReport:
    """sample [B,C,h,w], timestep float32 [B] (or int64 [B]), encoder_hidden_states [B,77,D] -> out_sample.

    attention_mask adds `encoder_attention_mask` float32 [B,77] (1 = token, 0 = padding); a U-Net
    with a projection class embedding gets `class_labels` float32 [B,P] (the pooled text embedding).
    """
    unet = unet.eval()
    cfg = unet.config
    d = text_dim(unet)
    names = ["sample", "timestep", "encoder_hidden_states"] + _unet_extras(unet, attention_mask)
    module = UNetGraph(unet, names)
    size = cfg.sample_size or 8
    g = _generator(seed)

    def feeds(batch: int, h: int, w: int, timesteps: Sequence[float]) -> Dict[str, Tensor]:
        out = {
            "sample": torch.randn(batch, cfg.in_channels, h, w, generator=g),
            "timestep": _timestep_example(timestep_dtype, timesteps),
            "encoder_hidden_states": torch.randn(batch, TEXT_LENGTH, d, generator=g),
        }
        for extra in names[3:]:
            out[extra] = _extra_feed(extra, unet, batch, g)
        return out

    example = feeds(1, size, size, [999.0])
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"}}
    for extra in names[3:]:
        axes[extra] = {0: "batch"}
    odd = (max(2, size - 2) | 1, max(2, size // 2 + 1))  # other (odd) sizes than the traced one
    checks = [feeds(2, odd[0], odd[1], [981.0, 1.0]), feeds(1, size, size, [500.0])]
    if writer is not None:  # as export_afa's: trainer.export.large_graph
        return writer(name, path, module, tuple(example.values()), names, ["out_sample"], axes, checks)
    torch_export(module, tuple(example.values()), path, names, ["out_sample"], axes)
    return _finish(name, path, module, checks, ["out_sample"], fp16, check, tolerance, compact)


def export_afa(ensemble: AFAEnsemble, path: str, *, subsets: bool = True, timestep_dtype: str = "float32",
               attention_mask: bool = False, fp16: bool = False, check: Check = "auto",
               tolerance: float = FP32_TOLERANCE, seed: int = 0, name: str = "afa",
               compact: bool = False, writer: Optional[Callable[..., GraphReport]] = None) -> GraphReport:
    """One fused graph: sample, timestep [B], encoder_hidden_states [N,B,77,D], expert_mask float32 [N]
    (only when subsets) -> out_sample [B,C,h,w], contributions [B,N,h,w].

    writer(name, path, module, args, input_names, output_names, axes, check_feeds) replaces the
    export and its checks (trainer.export.large_graph: experts too big to export in memory).

    `ensemble` is an AFAEnsemble (trained SABW aggregators) or a trainer.models.fusion.FusionEnsemble (the
    training-free variance rule, method "fuse"): both graphs have the same inputs and outputs."""
    ensemble = ensemble.eval()
    first = ensemble.unets[0]
    cfg = first.config
    n = ensemble.num_experts
    d = text_dim(first)
    names = ["sample", "timestep", "encoder_hidden_states"]
    if subsets:
        names.append("expert_mask")
    names += _unet_extras(first, attention_mask)
    module = AFAGraph(ensemble, names)
    size = cfg.sample_size or 8
    g = _generator(seed)

    def feeds(batch: int, h: int, w: int, timesteps: Sequence[float], mask: Sequence[float]) -> Dict[str, Tensor]:
        out = {
            "sample": torch.randn(batch, cfg.in_channels, h, w, generator=g),
            "timestep": _timestep_example(timestep_dtype, timesteps),
            "encoder_hidden_states": torch.randn(n, batch, TEXT_LENGTH, d, generator=g),
        }
        if subsets:
            out["expert_mask"] = torch.tensor(mask, dtype=torch.float32)
        for extra in names[len(out):]:
            out[extra] = _extra_feed(extra, first, batch, g, experts=n if extra == "class_labels" else None)
        return out

    full = [1.0] * n
    example = feeds(1, size, size, [999.0], full)
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {1: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"},
            "contributions": {0: "batch", 2: "height", 3: "width"}}
    if "encoder_attention_mask" in names:
        axes["encoder_attention_mask"] = {0: "batch"}
    if "class_labels" in names:
        axes["class_labels"] = {1: "batch"}
    output_names = ["out_sample", "contributions"]
    odd = (max(2, size - 2) | 1, max(2, size // 2 + 1))
    checks = [feeds(2, odd[0], odd[1], [981.0, 1.0], full)]
    if subsets:
        partial = [0.0] + [1.0] * (n - 1)
        checks.append(feeds(2, size, size, [500.0, 21.0], partial))
    if writer is not None:
        return writer(name, path, module, tuple(example.values()), names, output_names, axes, checks)
    torch_export(module, tuple(example.values()), path, names, output_names, axes)
    return _finish(name, path, module, checks, output_names, fp16, check, tolerance, compact)
