"""PyTorch U-Nets read back from the package's own expert graphs (experts/<id>/unet/model.onnx + config.json).

A package made by the trainer keeps no PyTorch weights, but its expert graphs hold them: initializers named
`unet.<parameter>` are the parameters as they are, and the exporter's constant folding turns the others
into `onnx::MatMul_…` (a Linear weight, transposed) or `onnx::Mul_…` / `onnx::Add_…` (a GroupNorm's
scale and shift, reshaped). Which parameter each folded name holds is learnt from a probe: a U-Net of
the same config with distinct random weights, exported the same way (same exporter, same names).
float16-stored weights come back as float32 (their values exactly).

`unet_from_graph` then checks the result: the graph exported from the recovered U-Net must give the
package's graph's outputs (onnxruntime, both graphs on the same inputs) when onnxruntime is available.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from trainer.export.errors import ExportError
from trainer.export.graphs import export_unet
from trainer.export.onnx_io import graph_io
from trainer.export.parity import Check
from trainer.models.unet import UNet2DConditionModel, UNetConfig

PREFIX = "unet."


def _initializers(path: str) -> Dict[str, np.ndarray]:
    model = onnx.load(path)  # external data too, from the graph's folder
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _export_options(path: str) -> Dict[str, object]:
    inputs, _ = graph_io(path)
    timestep = inputs.get("timestep")
    int64 = timestep is not None and timestep.type.tensor_type.elem_type == onnx.TensorProto.INT64
    return {"timestep_dtype": "int64" if int64 else "float32",
            "attention_mask": "encoder_attention_mask" in inputs}


def _folded_sources(probe: UNet2DConditionModel, options: Dict[str, object]) -> Dict[str, Tuple[str, bool]]:
    """For each folded initializer name of the probe's graph: (parameter name, transposed)."""
    with tempfile.TemporaryDirectory(prefix="unet-probe-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_unet(probe, path, check=False, **options)
        folded = {k: v for k, v in _initializers(path).items() if not k.startswith(PREFIX)}
    params = {name: p.detach().numpy() for name, p in probe.named_parameters()}
    by_size: Dict[int, list] = {}
    for name, value in params.items():
        by_size.setdefault(value.size, []).append(name)
    sources: Dict[str, Tuple[str, bool]] = {}
    for key, value in folded.items():
        for name in by_size.get(value.size, []):
            param = params[name]
            if np.array_equal(value.reshape(-1), param.reshape(-1)):
                sources[key] = (name, False)
            elif param.ndim == 2 and np.array_equal(value.reshape(param.shape[::-1]), param.T):
                sources[key] = (name, True)
            else:
                continue
            break
    return sources


@torch.no_grad()
def unet_from_graph(graph_path: str, config: Optional[UNetConfig] = None, *, check: Check = "auto",
                    tolerance: float = 1e-4) -> UNet2DConditionModel:
    """The U-Net whose exported graph is `graph_path` (config: `config.json` beside it when not given), in
    float32 and eval mode. Raises ExportError when a parameter cannot be found in the graph, or when the
    re-exported graph's outputs differ from the package graph's (check: as parity's)."""
    if config is None:
        config_path = os.path.join(os.path.dirname(graph_path), "config.json")
        if not os.path.isfile(config_path):
            raise ExportError(f"{graph_path}: no config.json beside it, so its U-Net cannot be rebuilt")
        with open(config_path, encoding="utf-8") as f:
            config = UNetConfig.from_dict(json.load(f))
    options = _export_options(graph_path)
    probe = UNet2DConditionModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    for p in probe.parameters():  # distinct values, so that every folded tensor names its parameter
        p.copy_(torch.randn(p.shape, generator=generator))
    sources = _folded_sources(probe, options)
    stored = _initializers(graph_path)
    state: Dict[str, torch.Tensor] = {}
    for key, value in stored.items():
        if key.startswith(PREFIX):
            state[key[len(PREFIX):]] = torch.from_numpy(value.astype(np.float32))
        elif key in sources:
            name, transposed = sources[key]
            shape = dict(probe.named_parameters())[name].shape
            array = value.astype(np.float32)
            array = array.reshape(shape[::-1]).T if transposed else array.reshape(shape)
            state[name] = torch.from_numpy(np.ascontiguousarray(array))
    missing = sorted(set(dict(probe.named_parameters())) - set(state))
    if missing:
        raise ExportError(f"{graph_path}: cannot find {len(missing)} U-Net parameters in the graph (e.g. "
                          f"{', '.join(missing[:3])}); was it exported by another exporter version?")
    unet = UNet2DConditionModel(config).eval()
    unet.load_state_dict(state, strict=False)
    if check:
        _compare(graph_path, unet, options, check, tolerance)
    return unet


def _compare(graph_path: str, unet: UNet2DConditionModel, options: Dict[str, object], check: Check,
             tolerance: float) -> None:
    from trainer.export import ort_check

    reason = ort_check.unavailable_reason()
    if reason is not None:
        if check == "auto":
            return
        raise ExportError(f"{graph_path}: cannot check the rebuilt U-Net: {reason}")
    inputs, _ = graph_io(graph_path)
    generator = torch.Generator().manual_seed(1)
    size = unet.config.sample_size or 8
    dims = inputs["encoder_hidden_states"].type.tensor_type.shape.dim
    feeds = {"sample": torch.randn(2, unet.config.in_channels, size, size, generator=generator).numpy(),
             "timestep": np.array([981, 21], dtype=np.int64 if options["timestep_dtype"] == "int64" else np.float32),
             "encoder_hidden_states": torch.randn(2, 77, dims[2].dim_value, generator=generator).numpy()}
    if options["attention_mask"]:
        feeds["encoder_attention_mask"] = np.ones((2, 77), np.float32)
    if "class_labels" in inputs:
        width = inputs["class_labels"].type.tensor_type.shape.dim[1].dim_value
        feeds["class_labels"] = torch.randn(2, width, generator=generator).numpy()
    with tempfile.TemporaryDirectory(prefix="unet-rebuilt-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_unet(unet, path, check=False, **options)
        ours, theirs = ort_check.run_onnx_many(path, [feeds])[0], ort_check.run_onnx_many(graph_path, [feeds])[0]
    err = float(np.max(np.abs(ours["out_sample"] - theirs["out_sample"])))
    if not err <= tolerance:
        raise ExportError(f"{graph_path}: the U-Net rebuilt from its weights differs from the graph by {err:.3g} "
                          f"(> {tolerance:g})")
