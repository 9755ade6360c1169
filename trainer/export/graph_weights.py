"""PyTorch U-Nets read back from the package's own expert graphs (experts/<id>/unet/model.onnx + config.json,
or unets/<id>.onnx + <id>.config.json).

A package made by the trainer keeps no PyTorch weights, but its expert graphs hold them: initializers named
`unet.<parameter>` are the parameters as they are, and the exporter's constant folding turns the others
into `onnx::MatMul_…` (a Linear weight, transposed) or `onnx::Mul_…` / `onnx::Add_…` (a GroupNorm's
scale and shift, reshaped); equal tensors may share one initializer. Which parameter each weight holds
is learnt from a probe: a U-Net of the same config with distinct random weights, exported the same way,
whose nodes are those of the package's graph in the same order, so the weight a node reads in one
graph is the weight the same node reads in the other. float16-stored weights come back as float32
(their values exactly).

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
CAST_SUFFIX = "__float32"  # trainer.export.fp16: the Cast output that float16-stored weights are read through


def _export_options(path: str) -> Dict[str, object]:
    inputs, _ = graph_io(path)
    timestep = inputs.get("timestep")
    int64 = timestep is not None and timestep.type.tensor_type.elem_type == onnx.TensorProto.INT64
    return {"timestep_dtype": "int64" if int64 else "float32",
            "attention_mask": "encoder_attention_mask" in inputs}


def _probe_sources(probe: UNet2DConditionModel, options: Dict[str, object],
                   tmp: str) -> Tuple[onnx.ModelProto, Dict[str, Tuple[str, bool]]]:
    """The probe's graph and, for each of its initializers: (parameter name, transposed)."""
    path = os.path.join(tmp, "model.onnx")
    export_unet(probe, path, check=False, **options)
    model = onnx.load(path)
    params = {name: p.detach().numpy() for name, p in probe.named_parameters()}
    by_size: Dict[int, list] = {}
    for name, value in params.items():
        by_size.setdefault(value.size, []).append(name)
    sources: Dict[str, Tuple[str, bool]] = {}
    for init in model.graph.initializer:
        if init.name.startswith(PREFIX) and init.name[len(PREFIX):] in params:
            sources[init.name] = (init.name[len(PREFIX):], False)
            continue
        value = numpy_helper.to_array(init)
        for name in by_size.get(value.size, []):
            param = params[name]
            if np.array_equal(value.reshape(-1), param.reshape(-1)):
                sources[init.name] = (name, False)
            elif param.ndim == 2 and np.array_equal(value.reshape(param.shape[::-1]), param.T):
                sources[init.name] = (name, True)
            else:
                continue
            break
    return model, sources


def _corresponding_initializers(probe: onnx.ModelProto, graph: onnx.ModelProto, path: str) -> Dict[str, str]:
    """probe initializer name → the package graph's initializer at the same place: the graphs have the same
    nodes in the same order (the package's float16 Casts left out); the exporter may have merged equal
    initializers of the package graph into one (Identity nodes read it for the others), so the names
    themselves cannot be compared."""
    graph_inits = {i.name for i in graph.graph.initializer}
    probe_inits = {i.name for i in probe.graph.initializer}

    def weight(name: str) -> str:
        return name[:-len(CAST_SUFFIX)] if name.endswith(CAST_SUFFIX) and name[:-len(CAST_SUFFIX)] in graph_inits \
            else name

    # the exporter turns a duplicate weight into Identity(the kept one); float16 storage adds Casts
    aliases = {n.output[0]: weight(n.input[0]) for n in graph.graph.node
               if n.op_type == "Identity" and weight(n.input[0]) in graph_inits}
    nodes = [n for n in graph.graph.node if not (n.op_type == "Cast" and n.name.endswith("__cast"))
             and not (n.op_type == "Identity" and n.output[0] in aliases)]
    if len(nodes) != len(probe.graph.node) or any(a.op_type != b.op_type for a, b in zip(nodes, probe.graph.node)):
        raise ExportError(f"{path}: its nodes differ from those of a U-Net of its config exported here "
                          f"({len(nodes)} vs {len(probe.graph.node)}); was it exported by another exporter version?")
    mapping: Dict[str, str] = {}
    for ours, theirs in zip(probe.graph.node, nodes):
        for a, b in zip(ours.input, theirs.input):
            if a in probe_inits:
                b = aliases.get(b, weight(b))
                if b not in graph_inits:
                    raise ExportError(f"{path}: node {theirs.name or theirs.op_type} reads {b!r} where a weight was "
                                      f"expected")
                mapping[a] = b
    return mapping


def config_beside(graph_path: str) -> Optional[str]:
    """The U-Net config of an expert graph: `<stem>.config.json` beside it (a folder of several graphs, e.g.
    unets/curves.onnx → unets/curves.config.json), else `config.json` in its folder; None when neither exists."""
    for path in (os.path.splitext(graph_path)[0] + ".config.json",
                 os.path.join(os.path.dirname(graph_path), "config.json")):
        if os.path.isfile(path):
            return path
    return None


def unet_config_beside(graph_path: str) -> Optional[UNetConfig]:
    """The U-Net config that config_beside finds, read; None when there is none."""
    path = config_beside(graph_path)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return UNetConfig.from_dict(json.load(f))


@torch.no_grad()
def unet_from_graph(graph_path: str, config: Optional[UNetConfig] = None, *, check: Check = "auto",
                    tolerance: float = 1e-4) -> UNet2DConditionModel:
    """The U-Net whose exported graph is `graph_path` (config: `config.json` beside it when not given), in
    float32 and eval mode. Raises ExportError when a parameter cannot be found in the graph, or when the
    re-exported graph's outputs differ from the package graph's (check: as parity's)."""
    if config is None:
        config = unet_config_beside(graph_path)
        if config is None:
            raise ExportError(f"{graph_path}: no config.json beside it, so its U-Net cannot be rebuilt")
    options = _export_options(graph_path)
    probe = UNet2DConditionModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    for p in probe.parameters():  # distinct values, so that every folded tensor names its parameter
        p.copy_(torch.randn(p.shape, generator=generator))
    with tempfile.TemporaryDirectory(prefix="unet-probe-") as tmp:
        probe_model, sources = _probe_sources(probe, options, tmp)
    graph = onnx.load(graph_path)
    places = _corresponding_initializers(probe_model, graph, graph_path)
    stored = {i.name: i for i in graph.graph.initializer}
    shapes = {name: p.shape for name, p in probe.named_parameters()}
    state: Dict[str, torch.Tensor] = {}
    for probe_name, (name, transposed) in sources.items():
        if name in state or probe_name not in places:
            continue
        array = numpy_helper.to_array(stored[places[probe_name]]).astype(np.float32)
        shape = shapes[name]
        array = array.reshape(shape[::-1]).T if transposed else array.reshape(shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ExportError(f"{graph_path}: cannot find {len(missing)} U-Net parameters in the graph (e.g. "
                          f"{', '.join(missing[:3])}); was it exported by another exporter version?")
    unet = UNet2DConditionModel(config).eval()
    unet.load_state_dict(state)
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
