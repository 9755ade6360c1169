"""Graphs that COMPUTE in float16, for the CUDA execution provider (contract C1's "fp16" variant).

`to_fp16_compute(model)` turns an exported float32-compute graph (weights float32, or stored as float16
and cast to float32 inside the graph: the `--fp16` export) into one whose weights and activations are
float16, with float32 kept where float16 loses too much:

- normalisation statistics: InstanceNormalization (the exporter's GroupNorm is Reshape →
  InstanceNormalization → Reshape → Mul → Add; only the InstanceNormalization runs in float32),
  GroupNormalization, BatchNormalization; statistics computed in the graph: Reduce*, Pow, squares
  Mul(a, a), centred values x − ReduceMean(x), and the elementwise nodes computed from statistics
  alone (a decomposed LayerNorm's or a variance's chain: + eps, Sqrt, Div, Log …; a square past 256
  overflows float16); LayerNormalization stays float16 with `stash_type` 1, which makes its mean and
  variance float32 by the operator's definition;
- Softmax / LogSoftmax (attention and the SABW weights), Exp, Log, Sqrt, Reciprocal;
- the timestep embedding: Sin, Cos and every node their arguments are computed from (the timestep
  input, its Cast, the frequencies), so t · freq is formed in float32 (t = 999 has a float16 ulp of 0.5);
- control flow (If/Loop/Scan) with their subgraphs as they are;
- the graph's inputs and outputs keep their dtypes: a Cast at the boundary, so the engine feeds the
  same tensors to either variant.

A float32 island costs two Casts; data-movement nodes (Reshape, Identity, …) and constants that
feed only float32 nodes stay float32, so constants are not cast at run time. Float16 constants are
clamped to ±65504.

trainer.export.fp16_emulate runs such a graph's float16 rounding on any CPU; trainer.export.fp16_compute
applies the transform to packages (the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trainer.export.errors import ExportError
from trainer.export.onnx_io import EXTERNAL_DATA_BYTES

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0

# Ops computed in float32 whatever their neighbours.
FP32_OPS = frozenset({
    "InstanceNormalization", "GroupNormalization", "BatchNormalization", "LpNormalization",
    "MeanVarianceNormalization",
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum", "Range",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "EyeLike",
})
# Roots of the timestep embedding: everything their arguments are computed from stays float32.
EMBEDDING_ROOTS = frozenset({"Sin", "Cos"})
# Ops that only move or select values: they take the precision of whatever consumes them.
MOVEMENT_OPS = frozenset({
    "Identity", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Concat", "Slice", "Gather", "GatherElements",
    "Expand", "Flatten", "Tile", "Split", "Constant", "ConstantOfShape", "Cast", "Where", "Pad",
})
# Elementwise ops that stay float32 when every non-constant input is a float32 statistic.
STATISTIC_FOLLOWERS = frozenset({
    "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Log", "Exp", "Abs", "Neg", "Max", "Min", "Clip",
    "Identity", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Expand", "Where",
})
# Inputs that do not take the node's float type T (left as they are).
FIXED_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
# Nodes that read only the shape or that accept any input type.
ANY_INPUT_OPS = frozenset({"Shape", "Size", "Cast", "CastLike"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass
class Fp16Report:
    fp16_nodes: int = 0
    fp32_nodes: Dict[str, int] = field(default_factory=dict)   # op type → count computing in float32
    casts_added: int = 0
    clamped_values: int = 0                                     # constants past ±65504

    def summary(self) -> str:
        kept = ", ".join(f"{op} {n}" for op, n in sorted(self.fp32_nodes.items())) or "none"
        return (f"{self.fp16_nodes} nodes in float16; float32 kept for {kept}; {self.casts_added} casts added"
                + (f"; {self.clamped_values} constant values clamped to ±65504" if self.clamped_values else ""))


# ---------------------------------------------------------------------------------------------- types

def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers carry no data (types and dims only), for type inference of
    graphs past protobuf's 2 GiB; small ones (shapes, axes) keep their values for shape inference."""
    light = onnx.ModelProto()
    inits = list(model.graph.initializer)
    del model.graph.initializer[:]
    try:
        light.CopyFrom(model)
    finally:
        model.graph.initializer.extend(inits)
    for init in inits:
        if init.data_type in (FLOAT, FLOAT16, TensorProto.DOUBLE) and int(np.prod(init.dims)) > 256:
            light.graph.initializer.append(TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
        else:
            light.graph.initializer.append(init)
    return light


def value_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Element type of every value of the main graph: inputs, initializers, node outputs."""
    types: Dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_strip_weights(model))
    except Exception as e:  # noqa: BLE001 - any inference failure is reported the same way
        raise ExportError(f"type inference failed on the float32 graph: {e}") from None
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    types[node.output[0]] = FLOAT
    return types


def _subgraph_outer_names(node: onnx.NodeProto) -> Set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: Set[str] = set()

    def walk(graph: onnx.GraphProto, bound: Set[str]) -> None:
        local = set(bound) | {i.name for i in graph.input} | {i.name for i in graph.initializer}
        for n in graph.node:
            for name in n.input:
                if name and name not in local:
                    names.add(name)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub, local)
            local.update(o for o in n.output if o)
        for o in graph.output:
            if o.name not in local:
                names.add(o.name)

    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            walk(sub, set())
    return names


def _rename_in_subgraphs(node: onnx.NodeProto, old: str, new: str) -> None:
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                for i, name in enumerate(n.input):
                    if name == old:
                        n.input[i] = new
                _rename_in_subgraphs(n, old, new)
            for o in sub.output:
                if o.name == old:
                    o.name = new  # an output that passes an outer value straight through
                    # (not produced inside, so renaming it renames the reference)


# --------------------------------------------------------------------------------------- precision plan

def _is_float(types: Mapping[str, int], name: str) -> bool:
    return types.get(name) in (FLOAT, FLOAT16)


def _reads_float(op: str, index: int) -> bool:
    """Whether input `index` of `op` takes the node's float type (so must match its precision)."""
    return op not in ANY_INPUT_OPS and index not in FIXED_INPUTS.get(op, ())


def _is_attention_softmax(k: int, nodes: Sequence[onnx.NodeProto], producer: Mapping[str, int]) -> bool:
    """A Softmax over the last axis of scores made by a MatMul (through scaling, masking, reshapes)."""
    n = nodes[k]
    axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
    if axis != -1:
        return False
    name = n.input[0]
    for _ in range(5):
        p = producer.get(name)
        if p is None:
            return False
        if nodes[p].op_type == "MatMul":
            return True
        if nodes[p].op_type not in ("Mul", "Add", "Div", "Sub", "Where", "Reshape", "Cast", "Identity"):
            return False
        # follow the input that is computed, not the constant (Where: the scores are input 1 or 2)
        candidates = [x for x in nodes[p].input[1 if nodes[p].op_type == "Where" else 0:] if x in producer
                      and nodes[producer[x]].op_type not in ("Constant", "ConstantOfShape", "Shape")]
        if not candidates:
            return False
        name = candidates[0]
    return False


def plan_precisions(model: onnx.ModelProto, types: Mapping[str, int], attention_softmax: str = "fp32") -> List[str]:
    """'fp32' or 'fp16' for each node of the main graph. attention_softmax="fp16" leaves the attention
    Softmax (over the last axis of a MatMul's scores) in float16; the SABW softmax stays float32."""
    nodes = list(model.graph.node)
    producer: Dict[str, int] = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    consumers: Dict[str, List[Tuple[int, int]]] = {}
    for k, n in enumerate(nodes):
        for i, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((k, i))
    graph_outputs = {o.name for o in model.graph.output}
    fp32 = [n.op_type in FP32_OPS or n.op_type in CONTROL_FLOW_OPS for n in nodes]
    if attention_softmax not in ("fp32", "fp16"):
        raise ValueError(f"attention_softmax must be fp32 or fp16, got {attention_softmax!r}")
    if attention_softmax == "fp16":
        for k, n in enumerate(nodes):
            if n.op_type == "Softmax" and _is_attention_softmax(k, nodes, producer):
                fp32[k] = False

    # the timestep embedding: every node that the arguments of Sin / Cos are computed from
    stack = [k for k, n in enumerate(nodes) if n.op_type in EMBEDDING_ROOTS]
    seen: Set[int] = set(stack)
    while stack:
        n = nodes[stack.pop()]
        for i, name in enumerate(n.input):
            if name in producer and _is_float(types, name) and _reads_float(n.op_type, i) or \
                    name in producer and n.op_type == "Cast":
                k = producer[name]
                if k not in seen:
                    seen.add(k)
                    fp32[k] = True
                    stack.append(k)

    # statistics: Reduce*, Pow, squares Mul(a, a), centred values x − ReduceMean(x) (a decomposed
    # norm's or a variance's), and the cheap elementwise nodes computed from statistics alone (the
    # variance's division, eps, Sqrt, Log …) run in float32: a square past 256 overflows float16
    stats: Set[str] = set()
    constants = {i.name for i in model.graph.initializer} | \
        {o for n in nodes if n.op_type in ("Constant", "ConstantOfShape") for o in n.output}
    for k, n in enumerate(nodes):
        float_in = [x for i, x in enumerate(n.input) if x and _is_float(types, x) and _reads_float(n.op_type, i)]
        source = n.op_type.startswith("Reduce") or n.op_type == "Pow" or \
            (n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]) or \
            (n.op_type == "Sub" and n.input[1] in producer and nodes[producer[n.input[1]]].op_type == "ReduceMean"
             and nodes[producer[n.input[1]]].input[0] == n.input[0])
        variable = [x for x in float_in if x not in constants]
        derived = n.op_type in STATISTIC_FOLLOWERS and variable and all(x in stats for x in variable)
        if source or derived:
            fp32[k] = True
            stats.update(o for o in n.output if o and _is_float(types, o))

    # movement ops and constants feeding only float32 consumers stay float32 (no casts of constants)
    changed = True
    while changed:
        changed = False
        for k in range(len(nodes) - 1, -1, -1):
            n = nodes[k]
            if fp32[k] or n.op_type not in MOVEMENT_OPS:
                continue
            float_outputs = [o for o in n.output if o and _is_float(types, o)]
            readers = [(c, i) for o in float_outputs for c, i in consumers.get(o, [])
                       if _reads_float(nodes[c].op_type, i)]
            if any(not fp32[c] for c, _ in readers):
                continue
            wanted_fp32 = bool(readers) or any(o in graph_outputs for o in float_outputs)
            # a constant read only by Shape/Cast or by inputs of fixed type (Resize scales) keeps its type
            if wanted_fp32 or n.op_type in ("Constant", "ConstantOfShape"):
                fp32[k] = True
                changed = True
    return ["fp32" if f else "fp16" for f in fp32]


# ------------------------------------------------------------------------------------------- rewrite

def _to_fp16_array(values: np.ndarray, report: Fp16Report) -> np.ndarray:
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    over = finite & (np.abs(values) > FP16_MAX)
    report.clamped_values += int(over.sum())
    return np.where(over, np.sign(values) * FP16_MAX, values).astype(np.float16)


def _tensor_fp16(t: TensorProto, report: Fp16Report) -> TensorProto:
    if t.data_type != FLOAT:
        return t
    return numpy_helper.from_array(_to_fp16_array(numpy_helper.to_array(t), report), t.name)


def to_fp16_compute(model: onnx.ModelProto, *, attention_softmax: str = "fp32") -> Tuple[onnx.ModelProto, Fp16Report]:
    """The float16-compute version of a float32-compute graph (the input model is not changed).
    The weights of a graph with external data must be loaded (onnx.load does that by default).
    attention_softmax="fp16": the attention Softmax computes in float16 too (onnxruntime's CUDA kernel
    accumulates in float32; at 64² latents the casts around a float32 one move 16·4096² values twice)."""
    report = Fp16Report()
    types = value_types(model)
    modes = plan_precisions(model, types, attention_softmax)
    src = model.graph
    out = onnx.ModelProto()
    # copy everything but the graph's nodes, initializers and value_info
    saved = (list(src.node), list(src.initializer), list(src.value_info))
    del src.node[:], src.initializer[:], src.value_info[:]
    try:
        out.CopyFrom(model)
    finally:
        src.node.extend(saved[0])
        src.initializer.extend(saved[1])
        src.value_info.extend(saved[2])
    g = out.graph
    initializers = {i.name: i for i in src.initializer}
    graph_inputs = {i.name for i in src.input}

    # precision of each float value as it exists after the rewrite
    precision: Dict[str, str] = {}
    for name in graph_inputs:
        if _is_float(types, name):
            precision[name] = "fp16" if types[name] == FLOAT16 else "fp32"
    variant_names: Dict[Tuple[str, str], str] = {}
    new_initializers: List[TensorProto] = []
    new_nodes: List[onnx.NodeProto] = []
    used_names = set(types) | {o for n in src.node for o in n.output}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used_names:
            name, k = f"{base}_{k}", k + 1
        used_names.add(name)
        return name

    # initializers take the precision of their readers; read in both → both copies
    init_wants: Dict[str, Set[str]] = {}
    for k, n in enumerate(src.node):
        for i, name in enumerate(n.input):
            if name in initializers and _is_float(types, name):
                want = modes[k] if _reads_float(n.op_type, i) else None
                init_wants.setdefault(name, set()).add(want or ("fp16" if types[name] == FLOAT16 else "fp32"))
    for name, init in initializers.items():
        wants = init_wants.get(name, set())
        if not _is_float(types, name) or not wants:
            new_initializers.append(init)
            continue
        native = "fp16" if init.data_type == FLOAT16 else "fp32"
        values = None
        for want in sorted(wants):
            target = name if want == native or len(wants) == 1 else fresh(f"{name}__{want}")
            if want == native:
                tensor = init
            else:
                values = numpy_helper.to_array(init) if values is None else values
                arr = _to_fp16_array(values, report) if want == "fp16" else values.astype(np.float32)
                tensor = numpy_helper.from_array(arr, target)
            new_initializers.append(tensor)
            precision[target] = want
            variant_names[(name, want)] = target

    def value_in(name: str, want: str) -> str:
        """`name` as a value of precision `want`, casting when needed (cached)."""
        have = precision.get(name)
        if have is None or have == want:
            return name
        key = (name, want)
        if key not in variant_names:
            cast = fresh(f"{name}__{want}")
            new_nodes.append(helper.make_node("Cast", [name], [cast], to=FLOAT16 if want == "fp16" else FLOAT,
                                              name=fresh(f"{cast}__cast")))
            report.casts_added += 1
            precision[cast] = want
            variant_names[key] = cast
        return variant_names[key]

    for k, node in enumerate(src.node):
        mode = modes[k]
        n = onnx.NodeProto()
        n.CopyFrom(node)
        for i, name in enumerate(n.input):
            if not name or not _is_float(types, name) or not _reads_float(n.op_type, i):
                continue  # an initializer keeps its name for its native copy, so Shape/Cast still find it
            n.input[i] = value_in(name if name not in initializers else variant_names.get((name, mode), name), mode)
        if n.op_type in CONTROL_FLOW_OPS:
            for name in sorted(_subgraph_outer_names(n)):
                if _is_float(types, name) and precision.get(name) == "fp16":
                    _rename_in_subgraphs(n, name, value_in(name, "fp32"))
        touches_float = any(_is_float(types, o) for o in n.output) or \
            any(_is_float(types, x) for x in n.input if x)
        if touches_float:
            if mode == "fp16":
                report.fp16_nodes += 1
                _retype_node(n, report)
            else:
                report.fp32_nodes[n.op_type] = report.fp32_nodes.get(n.op_type, 0) + 1
        for j, o in enumerate(n.output):
            if o and _is_float(types, o):
                fixed_fp32 = n.op_type == "LayerNormalization" and j > 0
                precision[o] = "fp32" if fixed_fp32 else mode
        new_nodes.append(n)

    # graph outputs keep their dtype
    for o in g.output:
        want = "fp16" if types.get(o.name) == FLOAT16 else "fp32"
        if _is_float(types, o.name) and precision.get(o.name) != want:
            inner = fresh(f"{o.name}__{precision[o.name]}")
            for n in new_nodes:
                for i, name in enumerate(n.input):
                    if name == o.name:
                        n.input[i] = inner
                for j, name in enumerate(n.output):
                    if name == o.name:
                        n.output[j] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [o.name], to=types[o.name], name=fresh(f"{o.name}__cast")))
            report.casts_added += 1

    g.node.extend(_drop_noop_casts(new_nodes, precision, {o.name for o in g.output}))
    g.initializer.extend(new_initializers)
    return out, report


def _retype_node(n: onnx.NodeProto, report: Fp16Report) -> None:
    """Attributes that fix a float32 output type, for a node that now computes in float16."""
    if n.op_type == "LayerNormalization":
        for a in n.attribute:
            if a.name == "stash_type":
                a.i = 1  # mean and variance in float32
    elif n.op_type == "Cast":
        for a in n.attribute:
            if a.name == "to" and a.i == FLOAT:
                a.i = FLOAT16
    elif n.op_type in ("Constant", "ConstantOfShape"):
        for a in n.attribute:
            if a.name == "value" and a.t.data_type == FLOAT:
                a.t.CopyFrom(_tensor_fp16(a.t, report))
            elif a.name in ("value_float", "value_floats"):
                values = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
                tensor = numpy_helper.from_array(_to_fp16_array(values, report).reshape(
                    () if a.name == "value_float" else (-1,)))
                n.attribute.remove(a)
                n.attribute.append(helper.make_attribute("value", tensor))
                break


def _drop_noop_casts(nodes: List[onnx.NodeProto], precision: Mapping[str, str], outputs: Set[str]) -> List[onnx.NodeProto]:
    """Removes Casts to the type their input already has (the `--fp16` storage casts, now float16 → float16)."""
    renamed: Dict[str, str] = {}
    kept = []
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
        if n.op_type == "Cast" and n.output[0] not in outputs:
            to = next(a.i for a in n.attribute if a.name == "to")
            src = n.input[0]
            src_type = {"fp16": FLOAT16, "fp32": FLOAT}.get(precision.get(src, ""))
            if src_type == to:
                renamed[n.output[0]] = src
                continue
        kept.append(n)
    for n in kept:
        if n.op_type in CONTROL_FLOW_OPS:
            for name in sorted(_subgraph_outer_names(n) & set(renamed)):
                _rename_in_subgraphs(n, name, renamed[name])
    return kept
