"""Post-processing of exported graphs: weights stored as float16 (cast to float32 inside the graph),
the matching rounding of a PyTorch module for parity checks, and short value names."""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from trainer.export.errors import ExportError

# Initializers smaller than this stay float32 in fp16 exports (eps-like constants, scales).
FP16_MIN_ELEMENTS = 16
FP16_MAX = 65504.0


def rename_inputs(nodes: Iterable[onnx.NodeProto], mapping: Mapping[str, str]) -> None:
    """Applies mapping to node inputs, including outer-scope references inside If/Loop subgraphs."""
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                rename_inputs(sub.node, mapping)
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
    rename_inputs(graph.node, renamed)
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
    rename_inputs(graph.node, mapping)
    for value in graph.value_info:
        if value.name in mapping:
            value.name = mapping[value.name]
    return model


def round_weights_fp16(module: nn.Module) -> nn.Module:
    """A copy whose float weights carry float16 precision (what an fp16-stored graph computes with)."""
    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in list(rounded.parameters()) + list(rounded.buffers()):
            if tensor.is_floating_point() and tensor.numel() >= FP16_MIN_ELEMENTS and \
                    bool((tensor.abs() <= FP16_MAX).all()):
                tensor.copy_(tensor.half().float())
    return rounded
