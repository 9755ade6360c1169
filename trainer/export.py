"""ONNX export of trained modules into a model package (docs/model-package.md) and its manifest.

Every graph is exported with the TorchScript exporter at opset 17 (dynamic batch and latent size),
then checked with `onnx.checker` and run in onnxruntime-node (trainer/ort_check.py) on random
inputs of a batch and size other than the traced ones; an output further than the tolerance from
PyTorch raises `ExportDriftError` naming the graph, the output and the error.

`--fp16` stores weights as float16 and casts them to float32 inside the graph: half the bytes on
disk, float32 arithmetic (so the graph runs on onnxruntime's CPU provider, which lacks float16
kernels for most ops), inputs and outputs float32. onnxruntime folds the casts when it loads.

CLI: `python3 -m trainer.export --spec package-spec.json --out models/<name>` (see `main`).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from trainer import ort_check
from trainer.afa import AFAEnsemble, contribution_map
from trainer.text_encoder import CLIPTextEncoder, onnx_export_kwargs
from trainer.unet import UNet2DConditionModel
from trainer.vae import AutoencoderKL, VAEDecoderOnly

FORMAT = "ensemble-diffusion-package"
FORMAT_VERSION = 1
OPSET = 17
TEXT_LENGTH = 77
FP32_TOLERANCE = 1e-4
SCHEDULER_NAMES = ("ddim", "euler", "euler_a", "dpmpp_2m")
# Initializers smaller than this stay float32 in fp16 exports (eps-like constants, scales).
FP16_MIN_ELEMENTS = 16
FP16_MAX = 65504.0
# Above this a graph's weights go to an external `model.onnx_data` file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$", re.IGNORECASE)

Check = Union[bool, str]  # True: must run in onnxruntime; "auto": when available; False: checker only


class ExportError(RuntimeError):
    """An export could not be written or checked."""


class ExportDriftError(ExportError):
    """An exported graph's outputs differ from PyTorch's by more than the tolerance."""


class ManifestError(ValueError):
    """A manifest does not follow docs/model-package.md; the message lists every problem."""


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


# ---------------------------------------------------------------------------------------------
# Writing and post-processing graphs


def _torch_export(module: nn.Module, args: Tuple[Tensor, ...], path: str, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # shape-dependent Python branches (odd sizes, resizes) are intended; the ORT check covers them
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        warnings.filterwarnings("ignore", message="The shape inference of prim::Constant type is missing")
        torch.onnx.export(module, args, path, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, opset_version=OPSET,
                          do_constant_folding=True, **onnx_export_kwargs())


def save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Writes a graph; weights go to `<name>_data` next to it when the protobuf would pass 2 GiB."""
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


def _rename_inputs(nodes: Iterable[onnx.NodeProto], mapping: Mapping[str, str]) -> None:
    """Applies mapping to node inputs, including outer-scope references inside If/Loop subgraphs."""
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename_inputs(sub.node, mapping)
                for output in sub.output:
                    if output.name in mapping:
                        output.name = mapping[output.name]


def store_weights_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 initializers (≥ FP16_MIN_ELEMENTS values, within float16 range) become float16 tensors
    of the same name, each followed by a Cast to float32 that the graph's nodes read instead."""
    graph = model.graph
    casts = []
    renamed: Dict[str, str] = {}
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        if values.size < FP16_MIN_ELEMENTS or not np.all(np.abs(values) <= FP16_MAX):
            continue
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), init.name))
        cast_name = init.name + "__float32"
        renamed[init.name] = cast_name
        casts.append(helper.make_node("Cast", [init.name], [cast_name], to=TensorProto.FLOAT,
                                      name=init.name + "__cast"))
    _rename_inputs(graph.node, renamed)
    for output in graph.output:
        if output.name in renamed:
            raise ExportError(f"graph output {output.name!r} is an initializer; cannot store it as float16")
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    # inputs listed for old IR versions would keep the float32 type
    initializer_names = {init.name for init in graph.initializer}
    kept = [i for i in graph.input if i.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(kept)
    return model


_ELEM_TYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
                    TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.UINT8: "uint8",
                    TensorProto.INT8: "int8", TensorProto.BOOL: "bool"}


def compact_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Renames intermediate values to v0, v1, … and nodes to n0, n1, … (the exporter's names spell
    out module paths and make small graphs several times their weights). Graph inputs, outputs and
    initializers keep their names; renaming follows node order, so equal graphs get equal names."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    mapping: Dict[str, str] = {}
    for k, node in enumerate(graph.node):
        node.name = f"n{k}"
        for i, name in enumerate(node.output):
            if name and name not in keep:
                mapping[name] = node.output[i] = f"v{len(mapping)}"
    _rename_inputs(graph.node, mapping)
    for value in graph.value_info:
        if value.name in mapping:
            value.name = mapping[value.name]
    return model


def _value_info_text(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dtype = _ELEM_TYPE_NAMES.get(tensor.elem_type, str(tensor.elem_type))
    dims = [d.dim_param if d.dim_param else str(d.dim_value) for d in tensor.shape.dim]
    return f"{dtype}[{','.join(dims)}]"


def graph_signature(path: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Inputs and outputs of a graph file as {name: "dtype[dims]"}."""
    model = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = {v.name: _value_info_text(v) for v in model.graph.input if v.name not in initializers}
    outputs = {v.name: _value_info_text(v) for v in model.graph.output}
    return inputs, outputs


def _file_bytes(path: str) -> int:
    total = os.path.getsize(path)
    data = path + "_data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)


def _round_weights_fp16(module: nn.Module) -> nn.Module:
    """A copy whose float weights carry float16 precision (what an fp16-stored graph computes with)."""
    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in list(rounded.parameters()) + list(rounded.buffers()):
            if tensor.is_floating_point() and tensor.numel() >= FP16_MIN_ELEMENTS and \
                    bool((tensor.abs() <= FP16_MAX).all()):
                tensor.copy_(tensor.half().float())
    return rounded


def check_parity(graph: str, path: str, module: nn.Module, feed_sets: Sequence[Mapping[str, Tensor]],
                 output_names: Sequence[str], tolerance: float = FP32_TOLERANCE,
                 check: Check = "auto") -> Tuple[Optional[Dict[str, float]], Optional[str]]:
    """Runs the graph in onnxruntime-node and `module` in PyTorch on each feed set.

    Returns ({output: max abs error}, None), or (None, reason) when onnxruntime is unavailable and
    check is "auto". Raises ExportDriftError past the tolerance, ExportError when ORT fails.
    """
    if not check:
        return None, "disabled"
    reason = ort_check.unavailable_reason()
    if reason is not None:
        if check == "auto":
            return None, reason
        raise ExportError(f"{graph}: cannot check {path} against PyTorch: {reason}")
    numpy_feeds = [{k: v.detach().cpu().numpy() for k, v in feeds.items()} for feeds in feed_sets]
    try:
        results = ort_check.run_onnx_many(path, numpy_feeds)
    except ort_check.OrtRunError as e:
        raise ExportError(f"{graph}: onnxruntime cannot run {path}: {e}") from None
    errors: Dict[str, float] = {}
    module = module.eval()
    for k, (feeds, got) in enumerate(zip(feed_sets, results)):
        with torch.no_grad():
            expected = module(*feeds.values())
        if isinstance(expected, Tensor):
            expected = (expected,)
        for name, want in zip(output_names, expected):
            if name not in got:
                raise ExportError(f"{graph}: {path} has no output {name!r} (it has {sorted(got)})")
            want = want.detach().float().cpu().numpy()
            have = got[name].astype(np.float32)
            if have.shape != want.shape:
                raise ExportDriftError(f"{graph}: output {name!r} of {path} has shape {list(have.shape)}, "
                                       f"PyTorch gives {list(want.shape)} (feed set {k})")
            if not np.all(np.isfinite(have)):
                raise ExportDriftError(f"{graph}: output {name!r} of {path} has non-finite values (feed set {k})")
            err = float(np.max(np.abs(have - want))) if want.size else 0.0
            errors[name] = max(errors.get(name, 0.0), err)
            if not err <= tolerance:
                raise ExportDriftError(
                    f"{graph}: onnxruntime output {name!r} of {path} differs from PyTorch by max abs error "
                    f"{err:.3g} > tolerance {tolerance:g} (feed set {k}, inputs "
                    + ", ".join(f"{n} {list(v.shape)}" for n, v in feeds.items()) + ")")
    return errors, None


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
            module = _round_weights_fp16(module)
        save_onnx(model, path)
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{graph}: onnx.checker rejects {path}: {e}") from None
    errors, skipped = check_parity(graph, path, module, feed_sets, output_names, tolerance, check)
    inputs, outputs = graph_signature(path)
    return GraphReport(graph=graph, path=path, inputs=inputs, outputs=outputs,
                       weights_dtype="float16" if fp16 else "float32", bytes=_file_bytes(path),
                       max_abs_error=errors, tolerance=tolerance, skipped_reason=skipped)


# ---------------------------------------------------------------------------------------------
# The four graph kinds


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
    _torch_export(model, (example,), path, ["input_ids"], output_names,
                  {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}})
    feeds = [{"input_ids": _random_ids(model.config, 3, _generator(seed))}]
    return _finish("text_encoder", path, model, feeds, output_names, fp16, check, tolerance, compact)


def export_vae_decoder(vae: AutoencoderKL, path: str, *, fp16: bool = False, check: Check = "auto",
                       tolerance: float = FP32_TOLERANCE, seed: int = 0, compact: bool = False) -> GraphReport:
    """latent_sample [B,C,h,w] (already divided by the scale factor) -> sample [B,3,H,W]."""
    module = VAEDecoderOnly(vae).eval()
    c = vae.config.latent_channels
    _torch_export(module, (torch.zeros(1, c, 8, 8),), path, ["latent_sample"], ["sample"],
                  {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                   "sample": {0: "batch", 2: "pixel_height", 3: "pixel_width"}})
    feeds = [{"latent_sample": torch.randn(2, c, 6, 5, generator=_generator(seed))}]
    return _finish("vae_decoder", path, module, feeds, ["sample"], fp16, check, tolerance, compact)


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


def _text_dim(unet: UNet2DConditionModel) -> int:
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
                compact: bool = False) -> GraphReport:
    """sample [B,C,h,w], timestep float32 [B] (or int64 [B]), encoder_hidden_states [B,77,D] -> out_sample.

    attention_mask adds `encoder_attention_mask` float32 [B,77] (1 = token, 0 = padding); a U-Net
    with a projection class embedding gets `class_labels` float32 [B,P] (the pooled text embedding).
    """
    unet = unet.eval()
    cfg = unet.config
    d = _text_dim(unet)
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
    _torch_export(module, tuple(example.values()), path, names, ["out_sample"], axes)
    odd = (max(2, size - 2) | 1, max(2, size // 2 + 1))  # other (odd) sizes than the traced one
    checks = [feeds(2, odd[0], odd[1], [981.0, 1.0]), feeds(1, size, size, [500.0])]
    return _finish(name, path, module, checks, ["out_sample"], fp16, check, tolerance, compact)


def export_afa(ensemble: AFAEnsemble, path: str, *, subsets: bool = True, timestep_dtype: str = "float32",
               attention_mask: bool = False, fp16: bool = False, check: Check = "auto",
               tolerance: float = FP32_TOLERANCE, seed: int = 0, name: str = "afa",
               compact: bool = False) -> GraphReport:
    """One fused graph: sample, timestep [B], encoder_hidden_states [N,B,77,D], expert_mask float32 [N]
    (only when subsets) -> out_sample [B,C,h,w], contributions [B,N,h,w]."""
    ensemble = ensemble.eval()
    first = ensemble.unets[0]
    cfg = first.config
    n = ensemble.num_experts
    d = _text_dim(first)
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
    _torch_export(module, tuple(example.values()), path, names, output_names, axes)
    odd = (max(2, size - 2) | 1, max(2, size // 2 + 1))
    checks = [feeds(2, odd[0], odd[1], [981.0, 1.0], full)]
    if subsets:
        partial = [0.0] + [1.0] * (n - 1)
        checks.append(feeds(2, size, size, [500.0, 21.0], partial))
    return _finish(name, path, module, checks, output_names, fp16, check, tolerance, compact)


# ---------------------------------------------------------------------------------------------
# The manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TOP_KEYS = {"format", "format_version", "name", "version", "description", "latent", "tokenizer", "text_encoder",
             "vae_decoder", "scheduler", "defaults", "size", "limits", "display", "experts", "ensembles"}
_EXPERT_KEYS = {"id", "title", "description", "unet", "path", "text_encoder", "tokenizer", "architecture"}
_ENSEMBLE_KEYS = {"id", "title", "description", "method", "experts", "graph", "subsets"}


def _graph_io(path: str) -> Tuple[Dict[str, onnx.ValueInfoProto], Dict[str, onnx.ValueInfoProto]]:
    model = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return ({v.name: v for v in model.graph.input if v.name not in initializers},
            {v.name: v for v in model.graph.output})


def validate_manifest(manifest: Mapping[str, Any], package_dir: Optional[str] = None) -> None:
    """Raises ManifestError listing every way `manifest` breaks docs/model-package.md.

    With package_dir, also checks that every named file exists inside the package and that the
    graphs have the inputs and outputs their role needs.
    """
    problems: List[str] = []
    add = problems.append
    m = manifest
    if not isinstance(m, Mapping):
        raise ManifestError("the manifest must be a JSON object")
    for key in sorted(set(m) - _TOP_KEYS):
        add(f"unknown key {key!r}")
    if m.get("format") != FORMAT:
        add(f"format must be {FORMAT!r}, got {m.get('format')!r}")
    if m.get("format_version") != FORMAT_VERSION or not _is_int(m.get("format_version")):
        add(f"format_version must be {FORMAT_VERSION}, got {m.get('format_version')!r}")
    if not isinstance(m.get("name"), str) or not m.get("name"):
        add("name must be a non-empty string")
    for key in ("version", "description"):
        if key in m and not isinstance(m[key], str):
            add(f"{key} must be a string")

    latent = m.get("latent")
    downsample = None
    if not isinstance(latent, Mapping):
        add("latent must be an object {channels, downsample, scale_factor}")
    else:
        for key in ("channels", "downsample"):
            if not (_is_int(latent.get(key)) and latent[key] > 0):
                add(f"latent.{key} must be a positive integer")
        if not (_is_number(latent.get("scale_factor")) and latent["scale_factor"] > 0):
            add("latent.scale_factor must be a positive number")
        for key in sorted(set(latent) - {"channels", "downsample", "scale_factor"}):
            add(f"unknown key latent.{key}")
        if _is_int(latent.get("downsample")) and latent["downsample"] > 0:
            downsample = latent["downsample"]

    for key in ("tokenizer", "text_encoder", "vae_decoder", "scheduler"):
        if key in m and (not isinstance(m[key], str) or not m[key]):
            add(f"{key} must be a path (string)")

    size = m.get("size")
    if size is not None:
        if not isinstance(size, Mapping) or not all(_is_int(size.get(k)) and size[k] > 0 for k in ("min", "max")):
            add("size must be {min, max} with positive integers")
            size = None
        else:
            if size["min"] > size["max"]:
                add(f"size.min {size['min']} > size.max {size['max']}")
            if downsample:
                for k in ("min", "max"):
                    if size[k] % downsample:
                        add(f"size.{k} {size[k]} is not a multiple of latent.downsample {downsample}")

    defaults = m.get("defaults")
    if not isinstance(defaults, Mapping):
        add("defaults must be an object {steps, guidance, scheduler, width, height}")
    else:
        if not (_is_int(defaults.get("steps")) and 1 <= defaults["steps"] <= 1000):
            add("defaults.steps must be an integer in 1..1000")
        if not (_is_number(defaults.get("guidance")) and 0 <= defaults["guidance"] <= 50):
            add("defaults.guidance must be a number in 0..50")
        if defaults.get("scheduler") not in SCHEDULER_NAMES:
            add(f"defaults.scheduler must be one of {list(SCHEDULER_NAMES)}, got {defaults.get('scheduler')!r}")
        for k in ("width", "height"):
            v = defaults.get(k)
            if not (_is_int(v) and v > 0):
                add(f"defaults.{k} must be a positive integer")
                continue
            if downsample and v % downsample:
                add(f"defaults.{k} {v} is not a multiple of latent.downsample {downsample}")
            if size is not None and not size["min"] <= v <= size["max"]:
                add(f"defaults.{k} {v} is outside size [{size['min']}, {size['max']}]")
        for key in sorted(set(defaults) - {"steps", "guidance", "scheduler", "width", "height"}):
            add(f"unknown key defaults.{key}")

    limits = m.get("limits")
    if limits is not None:
        if not isinstance(limits, Mapping) or set(limits) - {"max_steps", "max_count"} or \
                not all(_is_int(v) and v > 0 for v in limits.values()):
            add("limits must be {max_steps?, max_count?} with positive integers")
    display = m.get("display")
    if display is not None:
        if not isinstance(display, Mapping) or set(display) != {"width", "height"} or \
                not all(_is_int(v) and v > 0 for v in display.values()):
            add("display must be {width, height} with positive integers")

    experts = m.get("experts")
    expert_ids: List[str] = []
    if not isinstance(experts, list) or not experts:
        add("experts must be a non-empty list")
        experts = []
    for k, e in enumerate(experts):
        where = f"experts[{k}]"
        if not isinstance(e, Mapping):
            add(f"{where} must be an object")
            continue
        if not isinstance(e.get("id"), str) or not ID_PATTERN.match(e["id"]):
            add(f"{where}.id must match {ID_PATTERN.pattern}, got {e.get('id')!r}")
        else:
            expert_ids.append(e["id"])
            where = f"expert {e['id']!r}"
        if "unet" not in e and "path" not in e:
            add(f"{where} needs \"unet\" (a graph) or \"path\" (an Optimum SD folder)")
        for key in ("title", "description", "unet", "path", "text_encoder", "tokenizer", "architecture"):
            if key in e and not isinstance(e[key], str):
                add(f"{where}.{key} must be a string")
        for key in sorted(set(e) - _EXPERT_KEYS):
            add(f"unknown key {where}.{key}")

    ensembles = m.get("ensembles", [])
    ensemble_ids: List[str] = []
    if not isinstance(ensembles, list):
        add("ensembles must be a list")
        ensembles = []
    for k, ens in enumerate(ensembles):
        where = f"ensembles[{k}]"
        if not isinstance(ens, Mapping):
            add(f"{where} must be an object")
            continue
        if not isinstance(ens.get("id"), str) or not ID_PATTERN.match(ens["id"]):
            add(f"{where}.id must match {ID_PATTERN.pattern}, got {ens.get('id')!r}")
        else:
            ensemble_ids.append(ens["id"])
            where = f"ensemble {ens['id']!r}"
        if ens.get("method", "afa") != "afa":
            add(f"{where}.method must be \"afa\"")
        members = ens.get("experts")
        if not isinstance(members, list) or len(members) < 2:
            add(f"{where}.experts must list at least 2 expert ids")
        else:
            for x in members:
                if x not in expert_ids:
                    add(f"{where} names unknown expert {x!r}")
            if len(set(map(str, members))) != len(members):
                add(f"{where} lists an expert twice")
        if not isinstance(ens.get("graph"), str):
            add(f"{where}.graph must be a path (string)")
        if "subsets" in ens and not isinstance(ens["subsets"], bool):
            add(f"{where}.subsets must be true or false")
        for key in ("title", "description"):
            if key in ens and not isinstance(ens[key], str):
                add(f"{where}.{key} must be a string")
        for key in sorted(set(ens) - _ENSEMBLE_KEYS):
            add(f"unknown key {where}.{key}")

    seen = set()
    for x in expert_ids + ensemble_ids:
        if x in seen:
            add(f"the id {x!r} is used twice")
        seen.add(x)

    if package_dir is not None and not problems:
        problems += _check_package_files(m, package_dir)
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

    tokenizer = resolve(m.get("tokenizer", "tokenizer"), "tokenizer", is_dir=True)
    if tokenizer:
        for f in ("vocab.json", "merges.txt"):
            resolve(os.path.join(m.get("tokenizer", "tokenizer"), f), "tokenizer")
    text_encoder = resolve(m.get("text_encoder", "text_encoder/model.onnx"), "text_encoder")
    vae = resolve(m.get("vae_decoder", "vae_decoder/model.onnx"), "vae_decoder")
    resolve(m.get("scheduler", "scheduler/scheduler_config.json"), "scheduler")

    def needs(path: Optional[str], what: str, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        if path is None:
            return
        have_in, have_out = _graph_io(path)
        lacking = [f"input {n!r}" for n in inputs if n not in have_in] + \
                  [f"output {n!r}" for n in outputs if n not in have_out]
        if lacking:
            problems.append(f"{what} graph lacks {', '.join(lacking)} (has inputs {sorted(have_in)}, "
                            f"outputs {sorted(have_out)})")

    needs(text_encoder, "text_encoder", ["input_ids"], ["last_hidden_state"])
    needs(vae, "vae_decoder", ["latent_sample"], ["sample"])
    unet_inputs = ["sample", "timestep", "encoder_hidden_states"]
    for e in m["experts"]:
        base = e.get("path")
        unet_rel = e.get("unet") or os.path.join(base, "unet", "model.onnx")
        needs(resolve(unet_rel, f"expert {e['id']!r} unet"), f"expert {e['id']!r} unet", unet_inputs, [])
        if e.get("text_encoder") or base:
            resolve(e.get("text_encoder") or os.path.join(base, "text_encoder", "model.onnx"),
                    f"expert {e['id']!r} text_encoder")
        if e.get("tokenizer") or base:
            resolve(e.get("tokenizer") or os.path.join(base, "tokenizer"), f"expert {e['id']!r} tokenizer", True)
    for ens in m.get("ensembles", []):
        what = f"ensemble {ens['id']!r}"
        path = resolve(ens["graph"], what)
        inputs = unet_inputs + (["expert_mask"] if ens.get("subsets") else [])
        needs(path, what, inputs, ["contributions"])
        if path is not None:
            have_in, _ = _graph_io(path)
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


# ---------------------------------------------------------------------------------------------
# Whole packages


@dataclass
class EnsembleSpec:
    """An AFA ensemble to export, with the ids of its experts in the order of its U-Nets."""

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
                 check: Check = "auto", compact: bool = False, log=print) -> PackageResult:
    """Exports everything into out_dir and writes a validated manifest.json.

    manifest_fields: name (required), version, description, defaults (required), size, limits,
    display; `experts` / `ensembles`: {id: {title, description, architecture / subsets}} overrides.
    timestep_int64: ids of experts (or ensembles) whose graph takes timestep int64 [B].
    compact: short intermediate value names (see compact_names), for small graphs.
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
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), dict(scheduler_config))

    text_dim = text_encoder.config.hidden_size
    expert_entries = []
    for eid, unet in experts.items():
        if _text_dim(unet) != text_dim:
            raise ExportError(f"expert {eid!r} attends to text of width {_text_dim(unet)}, the package's "
                              f"text encoder gives {text_dim}")
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
        record(export_afa(spec.ensemble, os.path.join(out_dir, rel), subsets=spec.subsets, name=f"afa {ens_id}",
                          timestep_dtype="int64" if ens_id in int64_ids else "float32",
                          attention_mask=attention_mask, fp16=fp16, check=check, compact=compact))
        extra = dict(ensemble_fields.get(ens_id, {}))
        extra.pop("subsets", None)
        entry = {"id": ens_id, "title": extra.pop("title", spec.title or f"{ens_id.capitalize()} (AFA)"),
                 "description": extra.pop("description", spec.description), "method": "afa",
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
        "scheduler": "scheduler/scheduler_config.json",
        "defaults": fields.pop("defaults"),
    }
    for key in ("size", "limits", "display"):
        if key in fields:
            manifest[key] = fields.pop(key)
    if fields:
        raise ExportError(f"unknown manifest_fields: {sorted(fields)}")
    manifest["experts"] = expert_entries
    manifest["ensembles"] = ensemble_entries
    write_manifest(out_dir, manifest)
    return PackageResult(manifest=manifest, reports=reports)


# ---------------------------------------------------------------------------------------------
# CLI: trained model folders (trainer/checkpointing.py layout) -> package


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
         "defaults": {…}, "size": {…}, "limits": {…}?, "display": {…}?, "attention_mask": false}
    """
    from trainer.checkpointing import (afa_hyperparameters, load_aggregators, load_text_encoder, load_unet,
                                       load_vae, read_afa_config)

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
                        attention_mask=bool(spec.get("attention_mask", False)), check=check, log=log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Export trained models into an ensemble-diffusion model package.")
    parser.add_argument("--spec", required=True, help="JSON spec naming the model folders (see package_from_spec)")
    parser.add_argument("--out", required=True, help="package folder to write (e.g. models/demo)")
    parser.add_argument("--fp16", action="store_true", help="store weights as float16 (compute stays float32)")
    parser.add_argument("--check", choices=("auto", "require", "off"), default="auto",
                        help="run every graph in onnxruntime-node against PyTorch (auto: when node is there)")
    args = parser.parse_args(argv)
    check: Check = {"auto": "auto", "require": True, "off": False}[args.check]
    try:
        with torch.no_grad():
            result = package_from_spec(args.spec, args.out, fp16=args.fp16, check=check)
    except (ExportError, ManifestError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.join(args.out, 'manifest.json')} ({len(result.reports)} graphs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
