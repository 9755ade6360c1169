"""The VAE (AutoencoderKL) of SD1.x single-file checkpoints, of standalone VAE files and of diffusers
folders, mapped onto trainer.models.vae (diffusers' AutoencoderKL names).

LDM names (under `first_stage_model.` in a full checkpoint, bare in a standalone VAE file such as
vae-ft-mse-840000-ema-pruned): `encoder.down.{i}.block.{j}.…`, `encoder.down.{i}.downsample.conv`,
`encoder.mid.{block_1,attn_1,block_2}`, `decoder.up.{i}.…` (numbered from the lowest resolution
up: LDM's up.{i} is diffusers' up_blocks.{n-1-i}), `nin_shortcut` for conv_shortcut, `norm_out` for
conv_norm_out, and the mid-block attention as 1×1 convolutions `q, k, v, proj_out` (diffusers: linear
`to_q, to_k, to_v, to_out.0`; diffusers before 0.14: `query, key, value, proj_attn`). Weights do not
show the GroupNorm group count: SD's 32 is assumed.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Mapping, Optional, Tuple

from torch import Tensor

from trainer.io.safetensors import PathLike, load_state_dict_file
from trainer.models.vae import AutoencoderKL, VAEConfig

LDM_VAE_PREFIX = "first_stage_model."
SD_NORM_GROUPS = 32
SD_SCALING_FACTOR = 0.18215

_RESNET_LDM_TO_DIFFUSERS = {"nin_shortcut": "conv_shortcut"}
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_OLD_DIFFUSERS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")


def extract_ldm_vae(checkpoint: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The VAE tensors of a full checkpoint (without `first_stage_model.`) or of a standalone LDM VAE
    file (its `encoder.`/`decoder.`/`quant_conv`/`post_quant_conv` tensors; `loss.` ones dropped)."""
    vae = {k[len(LDM_VAE_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_VAE_PREFIX)}
    if not vae:
        vae = dict(checkpoint)
    return {k: v for k, v in vae.items()
            if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}


def is_ldm_vae(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in state_dict)


def _up_levels(keys) -> int:
    found = [int(m.group(1)) for m in (re.match(r"^decoder\.up\.(\d+)\.", k) for k in keys) if m]
    return 1 + max(found) if found else 0


def ldm_to_diffusers_vae_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """LDM VAE names (no prefix) → diffusers AutoencoderKL names; attention convs become linear weights."""
    n = _up_levels(state_dict)
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"^encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.*)$", key)
        if m:
            i, kind, j, rest = m.group(1), m.group(2), m.group(3), m.group(4)
            if kind == "downsample":
                new = f"encoder.down_blocks.{i}.downsamplers.0.{rest}"
            else:
                new = f"encoder.down_blocks.{i}.resnets.{j}.{_resnet(rest)}"
        m = re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$", key)
        if m:
            b = n - 1 - int(m.group(1))
            kind, j, rest = m.group(2), m.group(3), m.group(4)
            if kind == "upsample":
                new = f"decoder.up_blocks.{b}.upsamplers.0.{rest}"
            else:
                new = f"decoder.up_blocks.{b}.resnets.{j}.{_resnet(rest)}"
        m = re.match(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$", key)
        if m:
            side, part, rest = m.groups()
            if part == "attn_1":
                name, _, leaf = rest.rpartition(".")
                new = f"{side}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS.get(name, name)}.{leaf}"
                if _ATTN_LDM_TO_DIFFUSERS.get(name) in _ATTN_LINEAR and value.dim() == 4:
                    value = value.reshape(value.shape[0], value.shape[1])
            else:
                new = f"{side}.mid_block.resnets.{0 if part == 'block_1' else 1}.{_resnet(rest)}"
        m = re.match(r"^(encoder|decoder)\.norm_out\.(.*)$", key)
        if m:
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        if new in out:
            raise ValueError(f"two VAE tensors map to {new!r}")
        out[new] = value
    return out


def _resnet(rest: str) -> str:
    name, _, leaf = rest.rpartition(".")
    return f"{_RESNET_LDM_TO_DIFFUSERS.get(name, name)}.{leaf}"


def diffusers_to_ldm_vae_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """diffusers AutoencoderKL names → LDM names (no prefix); attention weights become 1×1 convs."""
    ups = [int(m.group(1)) for m in (re.match(r"^decoder\.up_blocks\.(\d+)\.", k) for k in state_dict) if m]
    n = 1 + max(ups) if ups else 0
    attn_back = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)$",
                     key)
        if m:
            side, i, kind, j, rest = m.groups()
            index = i if side == "encoder.down" else str(n - 1 - int(i))
            if kind.startswith("resnets"):
                name, _, leaf = rest.rpartition(".")
                rest = f"{'nin_shortcut' if name == 'conv_shortcut' else name}.{leaf}"
                new = f"{side}.{index}.block.{j}.{rest}"
            else:
                new = f"{side}.{index}.{'downsample' if kind.startswith('down') else 'upsample'}.{rest}"
        m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets\.(\d)|attentions\.0)\.(.*)$", key)
        if m:
            side, kind, j, rest = m.groups()
            if kind.startswith("resnets"):
                name, _, leaf = rest.rpartition(".")
                rest = f"{'nin_shortcut' if name == 'conv_shortcut' else name}.{leaf}"
                new = f"{side}.mid.block_{int(j) + 1}.{rest}"
            else:
                name, _, leaf = rest.rpartition(".")
                new = f"{side}.mid.attn_1.{attn_back.get(name, name)}.{leaf}"
                if name in _ATTN_LINEAR and value.dim() == 2:
                    value = value.reshape(value.shape[0], value.shape[1], 1, 1)
        m = re.match(r"^(encoder|decoder)\.conv_norm_out\.(.*)$", key)
        if m:
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        out[new] = value
    return out


def normalize_diffusers_vae_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Older diffusers attention names (query/key/value/proj_attn) → today's (to_q/to_k/to_v/to_out.0)."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"^(.*\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
        out[f"{m.group(1)}.{_ATTN_OLD_DIFFUSERS[m.group(2)]}.{m.group(3)}" if m else key] = value
    return out


def infer_vae_config(state_dict: Mapping[str, Tensor], scaling_factor: float = SD_SCALING_FACTOR) -> VAEConfig:
    """A VAEConfig from the shapes of a diffusers-named AutoencoderKL state dict (tensors or meta)."""
    try:
        in_channels = state_dict["encoder.conv_in.weight"].shape[1]
        out_channels = state_dict["decoder.conv_out.weight"].shape[0]
        latent = state_dict["post_quant_conv.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an AutoencoderKL: tensor {e.args[0]!r} is missing") from None
    levels = sorted({int(m.group(1)) for m in (re.match(r"^encoder\.down_blocks\.(\d+)\.", k) for k in state_dict) if m})
    if not levels:
        raise ValueError("not an AutoencoderKL: no encoder.down_blocks tensors")
    channels = tuple(int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
    layers = 1 + max(int(m.group(1)) for m in (re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)
                                                for k in state_dict) if m)
    attention = any(k.startswith("encoder.mid_block.attentions.") for k in state_dict)
    return VAEConfig(in_channels=int(in_channels), out_channels=int(out_channels), block_out_channels=channels,
                     layers_per_block=layers, latent_channels=int(latent), norm_num_groups=SD_NORM_GROUPS,
                     mid_block_attention=attention, scaling_factor=scaling_factor)


def vae_from_state_dict(state_dict: Mapping[str, Tensor], config: Optional[VAEConfig] = None) -> AutoencoderKL:
    """A float32 AutoencoderKL in eval mode holding these (diffusers-named) weights."""
    config = config or infer_vae_config(state_dict)
    model = AutoencoderKL(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        raise ValueError("the VAE weights do not fit an SD AutoencoderKL: "
                         + "; ".join(f"{what} {len(keys)} tensor(s) e.g. {', '.join(keys[:4])}"
                                     for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                        ("mis-shaped", mismatched)) if keys))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def vae_state_dict_from_any(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """diffusers names from a full checkpoint, a standalone LDM VAE or a diffusers VAE state dict."""
    if any(k.startswith(LDM_VAE_PREFIX) for k in state_dict) or is_ldm_vae(state_dict):
        return ldm_to_diffusers_vae_state_dict(extract_ldm_vae(state_dict))
    return normalize_diffusers_vae_state_dict(state_dict)


def _diffusers_vae_file(folder: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def read_diffusers_vae_config(folder: PathLike) -> Tuple[Optional[dict], str]:
    """(config.json contents or None, the weight file) of a diffusers `vae/` folder."""
    folder = str(folder)
    config_path = os.path.join(folder, "config.json")
    config = None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    return config, _diffusers_vae_file(folder)


def config_from_diffusers(config: Mapping) -> VAEConfig:
    """A VAEConfig from a diffusers AutoencoderKL config.json dict."""
    return VAEConfig(in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
                     block_out_channels=tuple(config.get("block_out_channels", (128, 256, 512, 512))),
                     layers_per_block=config.get("layers_per_block", 2),
                     latent_channels=config.get("latent_channels", 4),
                     norm_num_groups=config.get("norm_num_groups", SD_NORM_GROUPS),
                     mid_block_attention=config.get("mid_block_add_attention", True),
                     scaling_factor=float(config.get("scaling_factor") or SD_SCALING_FACTOR))


def load_diffusers_vae(folder: PathLike) -> AutoencoderKL:
    """The AutoencoderKL of a diffusers `vae/` folder, float32, eval."""
    config, weights = read_diffusers_vae_config(folder)
    state = normalize_diffusers_vae_state_dict(load_state_dict_file(weights))
    return vae_from_state_dict(state, config_from_diffusers(config) if config else None)
