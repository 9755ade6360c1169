"""Exporting an AFA graph whose experts do not fit in memory twice (e.g. three SD1.5 U-Nets: 3 × 3.4 GB
of float32 in PyTorch plus as much again in protobuf would need more than 24 GiB).

The graph's structure is traced once with cheap placeholder weights (one float per parameter, broadcast
to its shape, so the trace allocates no weights) and exported without parameters; then the weights
are written tensor by tensor into the graph's external data file (`<graph>_data`), one expert at a
time, from wherever they come from: a callable that returns expert i's U-Net state dict (diffusers
names, e.g. read from its checkpoint) — or the ensemble's own U-Nets when they hold real weights.
The U-Nets may be built on the meta device (`UNet2DConditionModel(config, device="meta")`), so the
exporting process holds the aggregators plus one expert's weights at a time.

Weights are stored float16 (cast to float32 inside the graph, like trainer.export.fp16's
store_weights_fp16) or float32. A weight fed to a Transpose or a constant Unsqueeze alone is written
already transposed or reshaped, so onnxruntime needs no extra copy of it at load. The result computes
what `graphs.export_afa` writes (trainer/tests/export/test_large_graph.py checks this on small models).
"""
from __future__ import annotations

import gc
import inspect
import io
import os
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from trainer.export.errors import ExportError
from trainer.export.fp16 import FP16_MAX, FP16_MIN_ELEMENTS, rename_inputs, round_weights_fp16
from trainer.export.graphs import GraphReport, export_afa, export_unet
from trainer.export.onnx_io import OPSET, graph_signature, onnx_export_kwargs
from trainer.export.parity import FP32_TOLERANCE, Check, check_parity
from trainer.models.afa import AFAEnsemble
from trainer.models.unet import UNet2DConditionModel

ExpertWeights = Callable[[int], Mapping[str, Tensor]]  # expert index -> its U-Net state dict (diffusers names)

# U-Nets with more float32 bytes than this are exported tensor by tensor (SD1.5's: 3.4 GB): the importer
# and --add-to switch to this module's exports above it
STREAM_ABOVE = 1 << 30
UNETS_PREFIX = "ensemble.unets."   # parameter names of trainer.export.graphs.AFAGraph's U-Nets
INLINE_BYTES = 1024                # smaller tensors stay inside the .onnx file
ALIGN = 4096                       # external tensors start on page boundaries (ORT can map them)


def fp32_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters as float32 (it may be on the meta device)."""
    return 4 * sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Tracing without weights


def _placeholders(module: nn.Module) -> List[Tuple[dict, str, nn.Parameter]]:
    """Replaces every parameter by a distinct scalar broadcast to its shape; returns what to restore.

    The values are distinct so that the exporter's de-duplication of equal initializers (it turns
    repeated weights into Identity nodes) does not merge them, and small so the trace stays finite.
    """
    replaced = []
    k = 0
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            k += 1
            dtype = param.dtype if param.dtype.is_floating_point else torch.float32
            value = torch.full((1,), k * 1e-7, dtype=dtype).expand(param.shape) if param.dim() else \
                torch.tensor(k * 1e-7, dtype=dtype)
            sub._parameters[name] = nn.Parameter(value, requires_grad=False)
            replaced.append((sub._parameters, name, param))
    return replaced


def _restore(replaced: Sequence[Tuple[dict, str, nn.Parameter]]) -> None:
    for store, name, param in replaced:
        store[name] = param


def _trace_without_weights(module: nn.Module, args: Tuple[Tensor, ...], input_names: Sequence[str],
                           output_names: Sequence[str], axes: Mapping[str, Mapping[int, str]]) -> onnx.ModelProto:
    """The module's graph with each parameter (and persistent buffer) left as a graph input of its name."""
    buffer = io.BytesIO()
    replaced = _placeholders(module)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            # no constant folding: it would rename the weights it touches (onnx::MatMul_123)
            kwargs = dict(input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes={k: dict(v) for k, v in axes.items()}, opset_version=OPSET,
                          do_constant_folding=False, export_params=False)
            internal = getattr(torch.onnx.utils, "_export", None)
            if internal is not None and "onnx_shape_inference" in inspect.signature(internal).parameters:
                # The exporter's ONNX shape inference visits every graph input for every node: with a
                # few thousand weight inputs that is most of the export time (SD1.5 × 3: hours).
                # onnxruntime infers the shapes itself when it loads the graph.
                internal(module, args, buffer, onnx_shape_inference=False, **kwargs)
            else:
                torch.onnx.export(module, args, buffer, **kwargs, **onnx_export_kwargs())
    finally:
        _restore(replaced)
    return onnx.load_from_string(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Writing the weights


def _constants(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    return {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}


def _layout_folds(graph: onnx.GraphProto, weights: Sequence[str]) -> Dict[str, Tuple[str, onnx.NodeProto, Callable]]:
    """weight -> (the value it becomes, the node that computed it, how to compute it) for weights read only
    by one Transpose or one Unsqueeze with constant axes."""
    weights = set(weights)
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in weights:
                readers.setdefault(name, []).append(node)
    constants = _constants(graph)
    folds = {}
    for name, nodes in readers.items():
        if len(nodes) != 1 or nodes[0].input[0] != name:
            continue
        node = nodes[0]
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folds[name] = (node.output[0], node, lambda t, perm=perm: t.permute(*perm) if perm else t.t())
        elif node.op_type == "Unsqueeze" and len(node.input) == 2 and node.input[1] in constants:
            axes = [int(a) for a in np.atleast_1d(constants[node.input[1]])]

            def unsqueeze(t: Tensor, axes=axes) -> Tensor:
                rank = t.dim() + len(axes)
                for axis in sorted(a % rank for a in axes):
                    t = t.unsqueeze(axis)
                return t
            folds[name] = (node.output[0], node, unsqueeze)
    return folds


class _ExternalData:
    """Appends tensors to one external data file and makes the TensorProtos that point into it."""

    def __init__(self, path: str):
        self.location = os.path.basename(path)
        self.file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        if value.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(value, name)
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        value = np.ascontiguousarray(value)
        self.file.write(memoryview(value.reshape(-1).view(np.uint8)))
        proto = TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(value.dtype) if hasattr(helper, "np_dtype_to_tensor_dtype") \
            else onnx.mapping.NP_TYPE_TO_TENSOR_TYPE[value.dtype]
        proto.dims.extend(value.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, entry in (("location", self.location), ("offset", str(self.offset)), ("length", str(value.nbytes))):
            item = proto.external_data.add()
            item.key, item.value = key, entry
        self.offset += value.nbytes
        return proto

    def close(self) -> None:
        self.file.close()


def _storage(value: Tensor, fp16: bool) -> Tuple[np.ndarray, bool]:
    """(the array to store, whether it is a float16 copy of a float32 weight)."""
    value = value.detach().cpu()
    if not value.is_floating_point():
        return value.numpy(), False
    if fp16 and value.numel() >= FP16_MIN_ELEMENTS and bool((value.float().abs() <= FP16_MAX).all()):
        return value.to(torch.float16).numpy(), True
    return value.to(torch.float32).numpy(), False


def write_weights(model: onnx.ModelProto, path: str, sources: Sequence[Tuple[Callable[[], Mapping[str, Tensor]], str]],
                  fp16: bool) -> onnx.ModelProto:
    """Turns the weight inputs of `model` (a graph exported with export_params=False) into initializers.

    sources: (load, prefix) pairs; load() gives tensors whose names, prefixed, are weight inputs of the
    graph. Each source is loaded, written and dropped before the next one. Every weight input must be
    covered; the graph goes to `path`, its weights to `path + "_data"`.
    """
    graph = model.graph
    data_inputs = {i.name for i in graph.input}
    folds = _layout_folds(graph, data_inputs)
    store = _ExternalData(path + "_data")
    written: Dict[str, bool] = {}      # initializer name -> stored as float16
    try:
        for load, prefix in sources:
            tensors = load()
            for key in list(tensors):
                name = prefix + key
                if name not in data_inputs:
                    continue
                value = tensors[key]
                if name in written:
                    raise ExportError(f"weight {name!r} is given twice")
                target, _, reshape = folds.get(name, (name, None, None))
                if reshape is not None:
                    value = reshape(value)
                array, as_fp16 = _storage(value, fp16)
                graph.initializer.append(store.tensor(target, array))
                written[name] = as_fp16
            del tensors
            gc.collect()
    finally:
        store.close()
    graph_inputs = [i for i in graph.input if i.name not in written]
    missing = [i.name for i in graph_inputs if "." in i.name and i.name.split(".")[0] in ("ensemble", "unet")]
    if missing:
        raise ExportError(f"no weights for {len(missing)} graph input(s): {', '.join(missing[:8])}")
    del graph.input[:]
    graph.input.extend(graph_inputs)
    # folded layout nodes go; float16 weights get a Cast to float32 that their readers read instead
    dropped = {id(folds[name][1]) for name in written if name in folds}
    nodes = [n for n in graph.node if id(n) not in dropped]
    casts, renamed = [], {}
    for name, as_fp16 in written.items():
        target = folds[name][0] if name in folds else name
        if as_fp16:
            renamed[target] = target + "__float32"
            casts.append(helper.make_node("Cast", [target], [target + "__float32"], to=TensorProto.FLOAT,
                                          name=target + "__cast"))
    rename_inputs(nodes, renamed)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save_model(model, path)
    return model


# ---------------------------------------------------------------------------------------------
# The AFA graph


def _small_sample(args: Tuple[Tensor, ...], config) -> Tuple[Tensor, ...]:
    """The trace's sample at the smallest latent size the U-Nets take (height and width are dynamic axes;
    with placeholder weights a large trace only costs time)."""
    sample = args[0]
    smallest = 2 ** len(config.block_out_channels)  # 2×2 at the deepest level
    if sample.shape[-1] <= smallest and sample.shape[-2] <= smallest:
        return args
    return (torch.zeros(*sample.shape[:-2], smallest, smallest, dtype=sample.dtype),) + tuple(args[1:])


def _unet_state(ensemble: AFAEnsemble, i: int) -> Mapping[str, Tensor]:
    state = ensemble.unets[i].state_dict()
    if any(v.is_meta for v in state.values()):
        raise ExportError(f"expert {i}'s U-Net has no weights (meta device) and no expert_weights were given")
    return state


def _writer(config, sources: Callable[[nn.Module], list], parity: bool, fp16: bool, check: Check,
            tolerance: float) -> Callable[..., GraphReport]:
    """The `writer` hook of graphs.export_afa / export_unet: trace without weights, write them from
    sources(module) one source at a time, check the file, and (when the module holds the weights) parity."""

    def writer(graph_name: str, graph_path: str, module: nn.Module, args: Tuple[Tensor, ...],
               input_names: Sequence[str], output_names: Sequence[str], axes: Mapping[str, Mapping[int, str]],
               checks: Sequence[Mapping[str, Tensor]]) -> GraphReport:
        os.makedirs(os.path.dirname(os.path.abspath(graph_path)), exist_ok=True)
        model = _trace_without_weights(module, _small_sample(args, config), input_names, output_names, axes)
        write_weights(model, graph_path, sources(module), fp16)
        del model
        gc.collect()
        try:
            onnx.checker.check_model(graph_path)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{graph_name}: onnx.checker rejects {graph_path}: {e}") from None
        if parity:
            errors, skipped = check_parity(graph_name, graph_path, round_weights_fp16(module) if fp16 else module,
                                           checks, output_names, tolerance, check)
        else:
            errors, skipped = None, "weights streamed from files (parity proven on small models by the tests)"
        inputs, outputs = graph_signature(graph_path)
        size = os.path.getsize(graph_path) + os.path.getsize(graph_path + "_data")
        return GraphReport(graph=graph_name, path=graph_path, inputs=inputs, outputs=outputs,
                           weights_dtype="float16" if fp16 else "float32", bytes=size,
                           max_abs_error=errors, tolerance=tolerance, skipped_reason=skipped)

    return writer


def export_unet_streamed(unet: UNet2DConditionModel, path: str, weights: Optional[Callable[[], Mapping[str, Tensor]]] = None,
                         *, timestep_dtype: str = "float32", attention_mask: bool = False, fp16: bool = False,
                         check: Check = "auto", tolerance: float = FP32_TOLERANCE, seed: int = 0,
                         name: str = "unet") -> GraphReport:
    """graphs.export_unet's graph written the same way: `unet` may be on the meta device when `weights()`
    gives its state dict (e.g. read from a checkpoint), so the process holds one copy of the weights
    instead of PyTorch's plus the exporter's (an SD1.5 U-Net: ~3 GB instead of ~13 GB)."""
    has_weights = not any(p.is_meta for p in unet.parameters())
    if weights is None and not has_weights:
        raise ExportError("the U-Net has no weights (meta device): pass weights")
    load = weights or unet.state_dict
    writer = _writer(unet.config, lambda module: [(load, "unet.")], parity=has_weights and weights is None,
                     fp16=fp16, check=check, tolerance=tolerance)
    return export_unet(unet, path, timestep_dtype=timestep_dtype, attention_mask=attention_mask, fp16=fp16,
                       check=check, tolerance=tolerance, seed=seed, name=name, writer=writer)


def export_afa_streamed(ensemble: AFAEnsemble, path: str, expert_weights: Optional[ExpertWeights] = None, *,
                        subsets: bool = True, timestep_dtype: str = "float32", attention_mask: bool = False,
                        fp16: bool = False, check: Check = "auto", tolerance: float = FP32_TOLERANCE,
                        seed: int = 0, name: str = "afa") -> GraphReport:
    """export_afa's graph (same inputs, outputs and computation), written without holding the experts'
    weights more than one at a time. `expert_weights(i)` gives expert i's U-Net state dict; without it
    the ensemble's U-Nets must hold real weights. The parity check against PyTorch runs only when they
    do (it needs the whole ensemble in memory); otherwise the report says it was skipped."""
    streamed = expert_weights is not None
    has_weights = not any(p.is_meta for p in ensemble.parameters())
    if not streamed and not has_weights:
        raise ExportError("the ensemble's U-Nets have no weights (meta device): pass expert_weights")
    if any(p.is_meta for p in ensemble.aggregators.parameters()):
        raise ExportError("the ensemble's aggregators have no weights (meta device)")

    def sources(module: nn.Module):
        loads = streamed and (lambda i: lambda: expert_weights(i)) or (lambda i: lambda: _unet_state(ensemble, i))
        found = [(loads(i), f"{UNETS_PREFIX}{i}.") for i in range(ensemble.num_experts)]
        found.append((lambda: {k: v for k, v in module.state_dict().items() if not k.startswith(UNETS_PREFIX)}, ""))
        return found

    writer = _writer(ensemble.unets[0].config, sources, parity=has_weights and not streamed, fp16=fp16,
                     check=check, tolerance=tolerance)
    return export_afa(ensemble, path, subsets=subsets, timestep_dtype=timestep_dtype, attention_mask=attention_mask,
                      fp16=fp16, check=check, tolerance=tolerance, seed=seed, name=name, writer=writer)
