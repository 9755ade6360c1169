"""Model folders: what a finished run's `final/` holds and what `{"pretrained": ...}` specs load.

    unet/          config.json + diffusion_pytorch_model.safetensors    (diffusers layout)
    text_encoder/  config.json + model.safetensors                      (Hugging Face CLIPTextModel layout)
    vae/           config.json + diffusion_pytorch_model.safetensors    (diffusers AutoencoderKL layout)
    afa/           config.json + aggregators.safetensors                (SABW weights; experts listed by the caller)

Loaders also take diffusers / Hugging Face folders (a pipeline folder or the model's own), and a U-Net
may be a single-file SD1.x checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from trainer.io.safetensors import PathLike, load_safetensors, load_state_dict_file, save_safetensors
from trainer.io.sd_checkpoint import load_diffusers_unet, load_single_file_unet, save_diffusers_unet
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL, VAEConfig


class CheckpointError(ValueError):
    """A checkpoint or model folder that does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# loading state dicts with errors that name every problem


def describe_keys(keys: List[str], limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", … and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state_checked(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped tensors in one error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"the weights do not fit the {what}"]
        if missing:
            lines.append(f"missing {len(missing)} tensor(s): {describe_keys(missing)}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): {describe_keys(unexpected)}")
        if mismatched:
            lines.append("shape mismatch: " + "; ".join(mismatched[:10]))
        raise CheckpointError("\n  ".join(lines))
    module.load_state_dict(dict(state))


def jsonable(value: Any) -> Any:
    """value as JSON types: dataclasses as dicts, tuples as lists, anything else as its repr."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ---------------------------------------------------------------------------------------------
# the folders


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _subfolder(folder: PathLike, name: str) -> str:
    """`folder/name` when that holds a config.json, else folder itself (a pipeline folder or a model folder)."""
    sub = os.path.join(str(folder), name)
    return sub if os.path.isfile(os.path.join(sub, "config.json")) else str(folder)


def save_unet(unet: UNet2DConditionModel, folder: PathLike) -> None:
    save_diffusers_unet(unet, folder)


def load_unet(path: PathLike, config: Optional[Mapping[str, Any]] = None,
              device: Union[str, torch.device] = "cpu") -> UNet2DConditionModel:
    """A diffusers folder (pipeline or unet/), or a single-file SD1.x checkpoint (config default SD1.5)."""
    if os.path.isdir(str(path)):
        return load_diffusers_unet(path, device=device)
    unet_config = UNetConfig.from_dict(dict(config)) if config else None
    return load_single_file_unet(path, unet_config, device=device)


def text_encoder_config_from_dict(data: Mapping[str, Any]) -> TextEncoderConfig:
    """Our config.json or a Hugging Face CLIPTextConfig; unknown keys are ignored."""
    known = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    kwargs = {k: v for k, v in data.items() if k in known}
    # transformers' legacy CLIP configs say eos_token_id 2 and then pool at the highest id, which
    # for the CLIP vocabulary is <|endoftext|>; this encoder pools at eos_token_id, so use that id.
    if kwargs.get("eos_token_id") == 2 and kwargs.get("vocab_size", 49408) == 49408:
        kwargs["eos_token_id"] = 49407
        kwargs["pad_token_id"] = 49407
    return TextEncoderConfig(**kwargs)


def save_text_encoder(model: CLIPTextEncoder, folder: PathLike) -> None:
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **model.config.to_dict()}
    _write_json(os.path.join(folder, "config.json"), config)
    save_safetensors(model.state_dict(), os.path.join(folder, "model.safetensors"), {"format": "pt"})


def load_text_encoder(folder: PathLike, device: Union[str, torch.device] = "cpu") -> CLIPTextEncoder:
    folder = _subfolder(folder, "text_encoder")
    config = text_encoder_config_from_dict(_read_json(os.path.join(folder, "config.json")))
    model = CLIPTextEncoder(config)
    weights = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights):
        state = load_safetensors(weights)
    else:
        state = load_state_dict_file(os.path.join(folder, "pytorch_model.bin"))
    state = {k: v for k, v in state.items() if k != "text_model.embeddings.position_ids"}
    load_state_checked(model, state, f"text encoder ({folder})")
    return model.to(device).eval()


def vae_config_from_dict(data: Mapping[str, Any]) -> VAEConfig:
    """Our VAEConfig dict or a diffusers AutoencoderKL config.json."""
    known = {f.name for f in dataclasses.fields(VAEConfig)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if "mid_block_add_attention" in data:
        kwargs["mid_block_attention"] = bool(data["mid_block_add_attention"])
    return VAEConfig(**kwargs)


def save_vae(model: AutoencoderKL, folder: PathLike) -> None:
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), model.config.diffusers_config())
    save_safetensors(model.state_dict(), os.path.join(folder, "diffusion_pytorch_model.safetensors"), {"format": "pt"})


def load_vae(folder: PathLike, device: Union[str, torch.device] = "cpu") -> AutoencoderKL:
    folder = _subfolder(folder, "vae")
    model = AutoencoderKL(vae_config_from_dict(_read_json(os.path.join(folder, "config.json"))))
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_safetensors(weights) if os.path.isfile(weights) else load_state_dict_file(
        os.path.join(folder, "diffusion_pytorch_model.bin"))
    load_state_checked(model, state, f"VAE ({folder})")
    return model.to(device).eval()


def afa_hyperparameters(ensemble: nn.Module) -> Dict[str, int]:
    """hidden, depth, heads, head_dim and num_experts of an AFAEnsemble, read from its modules."""
    sabw = ensemble.aggregators[0]
    block = sabw.transformer.transformer_blocks[0]
    return {
        "num_experts": int(sabw.num_experts),
        "hidden": int(sabw.proj_in.out_channels),
        "depth": len(sabw.transformer.transformer_blocks),
        "heads": int(block.attn1.heads),
        "head_dim": int(block.attn1.head_dim),
    }


def save_aggregators(ensemble: nn.Module, folder: PathLike, extra: Optional[Mapping[str, Any]] = None) -> None:
    """config.json (AFA hyperparameters, point names, `extra` such as expert ids) + aggregators.safetensors."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    config = {**afa_hyperparameters(ensemble), "points": [p.name for p in ensemble.points], **jsonable(extra or {})}
    _write_json(os.path.join(folder, "config.json"), config)
    save_safetensors(ensemble.aggregators.state_dict(), os.path.join(folder, "aggregators.safetensors"),
                     {"format": "pt"})


def read_afa_config(folder: PathLike) -> Dict[str, Any]:
    return _read_json(os.path.join(_subfolder(folder, "afa"), "config.json"))


def load_aggregators(ensemble: nn.Module, folder: PathLike) -> None:
    """Loads SABW weights saved by save_aggregators into an ensemble built with the same hyperparameters."""
    folder = _subfolder(folder, "afa")
    config = _read_json(os.path.join(folder, "config.json"))
    have = afa_hyperparameters(ensemble)
    differing = {k: (config[k], v) for k, v in have.items() if k in config and config[k] != v}
    if differing:
        raise CheckpointError(f"{folder}: aggregators were saved with different hyperparameters "
                              + ", ".join(f"{k} {a} (file) vs {b} (ensemble)" for k, (a, b) in differing.items()))
    state = load_safetensors(os.path.join(folder, "aggregators.safetensors"))
    load_state_checked(ensemble.aggregators, state, f"AFA aggregators ({folder})")
