"""ONNX files: torch.onnx.export the same way on torch 1.13 and 2.x (the TorchScript exporter at
opset 17), writing graphs (external data past protobuf's 2 GiB), and reading their inputs and outputs.
Also the bare single-graph exporters of the text encoder and the VAE decoder and encoder (no parity check)."""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Dict, Mapping, Sequence, Set, Tuple

import onnx
import torch
from onnx import TensorProto, external_data_helper
from torch import Tensor, nn

from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.vae import AutoencoderKL, VAEDecoderOnly

OPSET = 17
# Above this a graph's weights go to an external `model.onnx_data` file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def onnx_export_kwargs() -> dict:
    """dynamo=False where torch.onnx.export has that argument (torch 2.x), so the TorchScript exporter is used."""
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


def torch_export(module: nn.Module, args: Tuple[Tensor, ...], path: str, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """torch.onnx.export to `path`; a graph past 2 GiB, which torch writes with one external file per
    tensor, is rewritten as save_onnx writes graphs (its weights in one `<name>_data` file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    before = set(os.listdir(folder))
    with torch.no_grad(), warnings.catch_warnings():
        # shape-dependent Python branches (odd sizes, resizes) are intended; the ORT check covers them
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        warnings.filterwarnings("ignore", message="The shape inference of prim::Constant type is missing")
        torch.onnx.export(module, args, path, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, opset_version=OPSET,
                          do_constant_folding=True, **onnx_export_kwargs())
    if set(os.listdir(folder)) - before - {os.path.basename(path)}:
        consolidate_external_data(path)


def external_locations(model: onnx.ModelProto) -> Set[str]:
    """The external data files a graph's tensors point to (relative to the graph's folder)."""
    tensors = getattr(external_data_helper, "_get_all_tensors", lambda m: m.graph.initializer)(model)
    return {entry.value for t in tensors if t.data_location == TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def consolidate_external_data(path: str) -> None:
    """A graph whose weights lie in external files (e.g. one per tensor, as torch.onnx.export writes a
    graph past 2 GiB) rewritten by save_onnx: inline, or all weights in `<name>_data`. The old files go."""
    model = onnx.load(path, load_external_data=False)
    locations = external_locations(model)
    if not locations:
        return
    folder = os.path.dirname(os.path.abspath(path))
    external_data_helper.load_external_data_for_model(model, folder)
    for location in locations:
        os.remove(os.path.join(folder, location))
    save_onnx(model, path)


def save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Writes a graph; weights go to `<name>_data` next to it when the protobuf would pass 2 GiB.

    An existing `<name>_data` that the model does not read from is removed first (onnx appends to
    an existing external data file, which would keep the old weights in it)."""
    stale = path + "_data"
    if os.path.exists(stale) and os.path.basename(stale) not in external_locations(model):
        os.remove(stale)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


_ELEM_TYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
                    TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.UINT8: "uint8",
                    TensorProto.INT8: "int8", TensorProto.BOOL: "bool"}


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


def file_bytes(path: str) -> int:
    """Bytes of a graph file with its external data file, if any."""
    total = os.path.getsize(path)
    data = path + "_data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)


def graph_io(path: str) -> Tuple[Dict[str, onnx.ValueInfoProto], Dict[str, onnx.ValueInfoProto]]:
    model = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return ({v.name: v for v in model.graph.input if v.name not in initializers},
            {v.name: v for v in model.graph.output})


def export_text_encoder_onnx(model: CLIPTextEncoder, path, opset: int = 17) -> None:
    """Write the package's text_encoder graph: input_ids int64 [B,77] -> last_hidden_state, pooler_output."""
    model = model.eval()
    ids = torch.full((1, model.config.max_position_embeddings), model.config.eos_token_id, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids,),
            path,
            input_names=["input_ids"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            **onnx_export_kwargs(),
        )


def export_vae_decoder_onnx(vae: AutoencoderKL, path, latent_size: int = 8, opset: int = 17) -> None:
    """Write vae_decoder/model.onnx with batch, height and width dynamic."""
    module = VAEDecoderOnly(vae).eval()
    example = torch.zeros(1, vae.config.latent_channels, latent_size, latent_size)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            path,
            input_names=["latent_sample"],
            output_names=["sample"],
            dynamic_axes={
                "latent_sample": {0: "batch", 2: "height", 3: "width"},
                "sample": {0: "batch", 2: "pixel_height", 3: "pixel_width"},
            },
            opset_version=opset,
            do_constant_folding=True,
            **onnx_export_kwargs(),
        )


class VAEEncoderGraph(nn.Module):
    """The package's vae_encoder graph: sample [B,3,H,W] in [-1,1] -> latent_parameters [B,2C,h,w], the
    posterior's moments: mean, then logvar, on the channel axis (diffusers' `latent_dist.parameters`,
    as Optimum exports it). As there, logvar is not yet clamped: the reader clamps it to [-30, 20]
    (DiagonalGaussianDistribution, AutoencoderKL.encode) and draws the latent."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, sample: Tensor) -> Tensor:
        # AutoencoderKL.encode before its chunk and clamp (whose torch.cat would lose the static 2C)
        return self.vae.quant_conv(self.vae.encoder(sample))


VAE_ENCODER_AXES = {"sample": {0: "batch", 2: "pixel_height", 3: "pixel_width"},
                    "latent_parameters": {0: "batch", 2: "height", 3: "width"}}


def export_vae_encoder_onnx(vae: AutoencoderKL, path, latent_size: int = 8, opset: int = 17) -> None:
    """Write vae_encoder/model.onnx (sample -> latent_parameters) with batch, height and width dynamic."""
    module = VAEEncoderGraph(vae).eval()
    side = latent_size * vae.config.downsample_factor
    example = torch.zeros(1, vae.config.in_channels, side, side)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            path,
            input_names=["sample"],
            output_names=["latent_parameters"],
            dynamic_axes={k: dict(v) for k, v in VAE_ENCODER_AXES.items()},
            opset_version=opset,
            do_constant_folding=True,
            **onnx_export_kwargs(),
        )
