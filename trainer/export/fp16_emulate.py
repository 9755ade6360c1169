"""A float16-compute graph (trainer.export.fp16_graph) emulated in float32 arithmetic, for checks on CPUs
whose onnxruntime lacks float16 kernels: `emulate_fp16(model16)` keeps the graph and rounds every
float16 value to float16 (a Cast there and back), which is what a GPU computing in float16 gives up to
the order of its sums."""
from __future__ import annotations

from typing import List

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.export.errors import ExportError
from trainer.export.fp16_graph import FLOAT, FLOAT16, MOVEMENT_OPS, value_types


def emulate_fp16(model16: onnx.ModelProto) -> onnx.ModelProto:
    """`model16` (a float16-compute graph) in float32 arithmetic, every float16 value rounded to
    float16: weights and constants hold float16 numbers, each node that computes in float16 has its
    outputs rounded (Cast to float16 and back). Runs on any CPU provider; a GPU computing in float16
    gives the same up to the order of its sums."""
    types = value_types(model16)
    for v in list(model16.graph.input) + list(model16.graph.output):
        if types.get(v.name) == FLOAT16:
            raise ExportError(f"emulate_fp16: graph input/output {v.name!r} is float16; only float32 boundaries are emulated")
    out = onnx.ModelProto()
    out.CopyFrom(model16)
    g = out.graph
    del g.value_info[:]
    for init in g.initializer:
        if init.data_type == FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes: List[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type in ("Constant", "ConstantOfShape"):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == FLOAT16:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            nodes.append(n)
            continue
        rounded = [j for j, o in enumerate(n.output) if o and types.get(o) == FLOAT16]
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == FLOAT16:
                    a.i = FLOAT
        elif n.op_type in MOVEMENT_OPS:
            rounded = []  # moves values that are float16 numbers already
        final = {}
        for j in rounded:
            final[j] = n.output[j]
            n.output[j] = f"{final[j]}__exact"
        nodes.append(n)
        for j, name in final.items():
            nodes.append(helper.make_node("Cast", [f"{name}__exact"], [f"{name}__h"], to=FLOAT16))
            nodes.append(helper.make_node("Cast", [f"{name}__h"], [name], to=FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    return out
