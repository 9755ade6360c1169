"""SD U-Net weights from other layouts: diffusers folders and SD1.x single-file checkpoints (LDM key
names), mapped onto trainer.models.unet's diffusers layout, and the checks that weights fit a U-Net."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from trainer.io.ldm_ema import ldm_unet_from_state
from trainer.io.safetensors import PathLike, load_state_dict_file, save_safetensors
from trainer.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNet2DConditionModel, UNetConfig

LDM_UNET_PREFIX = "model.diffusion_model."


class UNetWeightsError(ValueError):
    """A state dict that does not fit the model: names the missing, unexpected and mis-shaped tensors."""


# ---------------------------------------------------------------------------------------------
# Putting weights into a model


def _describe(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")


def check_unet_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raises UNetWeightsError unless state_dict has exactly the model's tensors with its shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    lines = ["the weights do not fit this U-Net"]
    if missing:
        lines.append(f"missing {len(missing)} tensor(s): {_describe(missing)}")
    if unexpected:
        lines.append(f"unexpected {len(unexpected)} tensor(s): {_describe(unexpected)}")
    if mismatched:
        lines.append(f"shape mismatch in {len(mismatched)} tensor(s): " + "; ".join(mismatched[:12])
                     + (f"; … and {len(mismatched) - 12} more" if len(mismatched) > 12 else ""))
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", LDM_UNET_PREFIX)) for k in unexpected):
        lines.append("the keys look like an original (LDM) checkpoint: use load_single_file_unet")
    if mismatched and not (missing or unexpected):
        lines.append("the U-Net config probably differs from the checkpoint's")
    raise UNetWeightsError("\n  ".join(lines))


def load_unet_weights(model: nn.Module, state_dict: Mapping[str, Tensor],
                      device: Union[str, torch.device, None] = None) -> nn.Module:
    """Puts state_dict into model, casting to each parameter's dtype.

    Parameters on the meta device are replaced by the checkpoint tensors (moved to `device`, default
    CPU) instead of being copied into, so a model built with device='meta' costs no extra memory.
    """
    check_unet_state_dict(model, state_dict)
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        for store in (module._parameters, module._buffers):
            for name, current in list(store.items()):
                if current is None or prefix + name not in state_dict:
                    continue
                value = state_dict[prefix + name]
                if current.is_meta:
                    value = value.to(device=device or "cpu", dtype=current.dtype)
                    store[name] = (nn.Parameter(value, requires_grad=current.requires_grad)
                                   if isinstance(current, nn.Parameter) else value)
                else:
                    with torch.no_grad():
                        current.copy_(value.to(dtype=current.dtype))
    return model


# ---------------------------------------------------------------------------------------------
# LDM (original Stable Diffusion) ↔ diffusers key names

# LDM ResBlock sub-module names → diffusers ResnetBlock2D names.
_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}


def ldm_module_map(config: UNetConfig) -> List[Tuple[str, str, bool]]:
    """(LDM module prefix, diffusers module prefix, is_resnet) for every module of the U-Net.

    Attention modules (SpatialTransformer) use the same inner names in both layouts.
    """
    pairs: List[Tuple[str, str, bool]] = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    if config.class_embed_type is not None:
        pairs += [("label_emb.0.0", "class_embedding.linear_1", False),
                  ("label_emb.0.2", "class_embedding.linear_2", False)]
    layers = config.layers_per_block_list()
    n_blocks = len(config.block_out_channels)
    index = 1
    for b, block_type in enumerate(config.down_block_types):
        for j in range(layers[b]):
            pairs.append((f"input_blocks.{index}.0", f"down_blocks.{b}.resnets.{j}", True))
            if block_type == CROSS_ATTN_DOWN:
                pairs.append((f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{j}", False))
            index += 1
        if b < n_blocks - 1:
            pairs.append((f"input_blocks.{index}.0.op", f"down_blocks.{b}.downsamplers.0.conv", False))
            index += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", True),
              ("middle_block.1", "mid_block.attentions.0", False),
              ("middle_block.2", "mid_block.resnets.1", True)]
    index = 0
    for b, block_type in enumerate(config.up_block_types):
        n_layers = layers[n_blocks - 1 - b] + 1
        has_attention = block_type == CROSS_ATTN_UP
        for j in range(n_layers):
            pairs.append((f"output_blocks.{index}.0", f"up_blocks.{b}.resnets.{j}", True))
            if has_attention:
                pairs.append((f"output_blocks.{index}.1", f"up_blocks.{b}.attentions.{j}", False))
            if j == n_layers - 1 and b < n_blocks - 1:
                pairs.append((f"output_blocks.{index}.{2 if has_attention else 1}.conv",
                              f"up_blocks.{b}.upsamplers.0.conv", False))
            index += 1
    return pairs


def _rename(state_dict: Mapping[str, Tensor], prefixes: Dict[str, Tuple[str, bool]],
            inner: Dict[str, str]) -> Dict[str, Tensor]:
    """Renames keys by their longest matching module prefix; unmatched keys are kept as they are."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        new_key = key
        for n in range(len(parts) - 1, 0, -1):
            match = prefixes.get(".".join(parts[:n]))
            if match is None:
                continue
            target, is_resnet = match
            rest = parts[n:]
            if is_resnet:
                for width in (2, 1):
                    sub = ".".join(rest[:width])
                    if len(rest) > width and sub in inner:
                        rest = inner[sub].split(".") + rest[width:]
                        break
                else:
                    break  # not a resnet tensor we know: keep the key, the loader will name it
            new_key = ".".join([target] + rest)
            break
        if new_key in out:
            raise ValueError(f"two checkpoint tensors map to {new_key!r}")
        out[new_key] = value
    return out


def ldm_to_diffusers_unet_state_dict(state_dict: Mapping[str, Tensor], config: UNetConfig) -> Dict[str, Tensor]:
    """LDM U-Net keys (without the 'model.diffusion_model.' prefix) → diffusers keys."""
    prefixes = {ldm: (diffusers, is_resnet) for ldm, diffusers, is_resnet in ldm_module_map(config)}
    return _rename(state_dict, prefixes, _RESNET_LDM_TO_DIFFUSERS)


def diffusers_to_ldm_unet_state_dict(state_dict: Mapping[str, Tensor], config: UNetConfig) -> Dict[str, Tensor]:
    """diffusers U-Net keys → LDM keys (without the 'model.diffusion_model.' prefix)."""
    prefixes = {diffusers: (ldm, is_resnet) for ldm, diffusers, is_resnet in ldm_module_map(config)}
    return _rename(state_dict, prefixes, _RESNET_DIFFUSERS_TO_LDM)


def extract_ldm_unet(checkpoint: Mapping[str, Tensor], use_ema: bool = False) -> Dict[str, Tensor]:
    """The U-Net tensors of a full SD checkpoint, without the 'model.diffusion_model.' prefix.

    With use_ema the EMA copies are used ('model_ema.' + the key without its dots after 'model.'); an
    EMA-only checkpoint (no 'model.diffusion_model.' tensors) gives its EMA copy either way.
    """
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    if not unet and not use_ema and "input_blocks.0.0.weight" in checkpoint:
        return dict(checkpoint)  # already a bare LDM U-Net state dict
    if not unet:
        unet = ldm_unet_from_state(checkpoint)  # EMA-only: the U-Net is there only as LitEma's copy
        if unet:
            return unet
    if not unet:
        sample = _describe(list(checkpoint)[:200], limit=6)
        raise ValueError(f"no U-Net tensors under '{LDM_UNET_PREFIX}' in this checkpoint (keys: {sample})")
    if use_ema:
        ema = {}
        for short in unet:
            ema_key = "model_ema." + "".join(("diffusion_model." + short).split("."))
            if ema_key not in checkpoint:
                raise ValueError(f"use_ema: the checkpoint has no EMA weights ({ema_key!r} is missing)")
            ema[short] = checkpoint[ema_key]
        unet = ema
    return unet


# ---------------------------------------------------------------------------------------------
# Whole-model loaders


def _build_on_meta(config: UNetConfig, dtype: torch.dtype) -> UNet2DConditionModel:
    return UNet2DConditionModel(config, device="meta", dtype=dtype)


def _unet_folder(folder: PathLike) -> str:
    folder = str(folder)
    sub = os.path.join(folder, "unet")
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    raise FileNotFoundError(f"{folder}: neither {folder}/unet/config.json nor {folder}/config.json exists")


def _diffusers_weight_files(folder: str, variant: Optional[str]) -> List[str]:
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    for ext in (".safetensors", ".bin"):
        single = os.path.join(folder, stem + ext)
        if os.path.isfile(single):
            return [single]
        index = single + ".index.json"
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors or {stem}.bin (or a sharded index)")


def load_diffusers_unet(folder: PathLike, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32, variant: Optional[str] = None) -> UNet2DConditionModel:
    """A U-Net from a diffusers pipeline folder (`<folder>/unet/`) or a unet folder itself."""
    unet_dir = _unet_folder(folder)
    with open(os.path.join(unet_dir, "config.json")) as f:
        config = UNetConfig.from_dict(json.load(f))
    state_dict: Dict[str, Tensor] = {}
    for path in _diffusers_weight_files(unet_dir, variant):
        state_dict.update(load_state_dict_file(path))
    model = _build_on_meta(config, dtype)
    return load_unet_weights(model, state_dict, device=device).eval()


def save_diffusers_unet(model: UNet2DConditionModel, folder: PathLike,
                        dtype: Optional[torch.dtype] = None) -> None:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` into folder (a diffusers unet folder)."""
    os.makedirs(folder, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    save_safetensors(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                     metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
        f.write("\n")


def load_single_file_unet(path: PathLike, config: Optional[UNetConfig] = None,
                          device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                          use_ema: bool = False) -> UNet2DConditionModel:
    """The U-Net of an SD1.x single-file checkpoint (.safetensors or .ckpt, LDM key names).

    config defaults to SD1.5's; VAE and text-encoder tensors in the file are ignored.
    """
    config = config or UNetConfig.sd15()
    checkpoint = load_state_dict_file(path)
    unet = ldm_to_diffusers_unet_state_dict(extract_ldm_unet(checkpoint, use_ema=use_ema), config)
    model = _build_on_meta(config, dtype)
    return load_unet_weights(model, unet, device=device).eval()
