"""Training checkpoints (save, find, resume) and the model folders a finished run leaves behind.

A checkpoint is a folder `<out_dir>/checkpoints/step-00001234/`:

    model.safetensors   the trained modules' state dicts, keys prefixed by module name
                        ("unet.", "text_encoder.", "vae.", "aggregators."); metadata: step
    ema.safetensors     EMA shadow weights, same keys (only when EMA is on)
    optimizer.safetensors  optimizer state tensors; param_groups and scalar state as JSON metadata
    state.safetensors   step, the training generator's state, torch's CPU/CUDA and Python RNG states
    config.json         step, the run's config (model configs, data, hyperparameters): for people

It is written under a temporary name and renamed into place, so a run killed while saving leaves
the previous checkpoint intact; the newest `keep` checkpoints are kept.

Model folders (what `final/` holds and what `{"pretrained": ...}` specs load):

    unet/          config.json + diffusion_pytorch_model.safetensors    (diffusers layout)
    text_encoder/  config.json + model.safetensors                      (Hugging Face CLIPTextModel layout)
    vae/           config.json + diffusion_pytorch_model.safetensors    (diffusers AutoencoderKL layout)
    afa/           config.json + aggregators.safetensors                (SABW weights; experts listed by the caller)
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from trainer.checkpoint_io import (load_diffusers_unet, load_safetensors, load_safetensors_metadata,
                                   load_single_file_unet, load_state_dict_file,
                                   save_diffusers_unet, save_safetensors)
from trainer.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.unet import UNet2DConditionModel, UNetConfig
from trainer.vae import AutoencoderKL, VAEConfig

PathLike = Union[str, os.PathLike]
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or model folder that does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# state dicts of several modules in one file


def _describe(keys: List[str], limit: int = 10) -> str:
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
            lines.append(f"missing {len(missing)} tensor(s): {_describe(missing)}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): {_describe(unexpected)}")
        if mismatched:
            lines.append("shape mismatch: " + "; ".join(mismatched[:10]))
        raise CheckpointError("\n  ".join(lines))
    module.load_state_dict(dict(state))


def combined_state_dict(modules: Mapping[str, nn.Module]) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            out[f"{name}.{key}"] = value
    return out


def split_state_dict(state: Mapping[str, Tensor], names: List[str]) -> Dict[str, Dict[str, Tensor]]:
    parts: Dict[str, Dict[str, Tensor]] = {name: {} for name in names}
    stray = []
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name in parts:
            parts[name][rest] = value
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(f"checkpoint holds tensors of modules this run does not train: {_describe(stray)}")
    return parts


# ---------------------------------------------------------------------------------------------
# optimizer and RNG states as safetensors + JSON metadata (no pickle: torch 1.13's weights_only
# loader cannot even read floats, and pickles are not safe to share)


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: PathLike) -> None:
    state_dict = optimizer.state_dict()
    tensors: Dict[str, Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars)}
    save_safetensors(tensors, path, metadata)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: PathLike) -> None:
    metadata = load_safetensors_metadata(path) or {}
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in load_safetensors(path).items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, entries in json.loads(metadata["scalars"]).items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(path: PathLike, step: int, generator: torch.Generator) -> None:
    """step, the training generator, torch's CPU (and CUDA) RNG and Python's `random` state."""
    tensors = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    metadata = {"step": str(step), "python_random": json.dumps([version, list(internal), gauss])}
    save_safetensors(tensors, path, metadata)


def load_training_state(path: PathLike, generator: Optional[torch.Generator] = None) -> int:
    """Restores the RNG states (when a generator is given) and returns the step."""
    metadata = load_safetensors_metadata(path) or {}
    if generator is not None:
        tensors = load_safetensors(path)
        generator.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_cpu"])
        version, internal, gauss = json.loads(metadata["python_random"])
        random.setstate((version, tuple(internal), gauss))
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda.")),
                                           key=lambda k: int(k.split(".")[1]))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return int(metadata["step"])


# ---------------------------------------------------------------------------------------------
# training checkpoints


def checkpoint_dir(out_dir: PathLike, step: int) -> str:
    return os.path.join(str(out_dir), CHECKPOINTS, f"step-{step:08d}")


def list_checkpoints(out_dir: PathLike) -> List[Tuple[int, str]]:
    """(step, path) of the complete checkpoints under out_dir, oldest first."""
    root = os.path.join(str(out_dir), CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: PathLike) -> Optional[str]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: PathLike, step: int, modules: Mapping[str, nn.Module],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    ema_state: Optional[Mapping[str, Tensor]] = None,
                    config: Optional[Mapping[str, Any]] = None, keep: Optional[int] = None) -> str:
    """Writes the checkpoint of `step` and prunes all but the newest `keep` (None or 0: keep all)."""
    final = checkpoint_dir(out_dir, step)
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        metadata = {"step": str(step)}
        save_safetensors(combined_state_dict(modules), os.path.join(tmp, "model.safetensors"), metadata)
        if ema_state is not None:
            save_safetensors(dict(ema_state), os.path.join(tmp, "ema.safetensors"), metadata)
        save_optimizer_state(optimizer, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"step": step, "modules": sorted(modules), "config": _jsonable(config or {})}, f, indent=2)
            f.write("\n")
        # the state file last: list_checkpoints only counts folders that have it
        save_training_state(os.path.join(tmp, STATE_FILE), step, generator)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    path: str
    step: int
    ema_state: Optional[Dict[str, Tensor]]
    config: Dict[str, Any]


def load_checkpoint(path: PathLike, modules: Mapping[str, nn.Module],
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    generator: Optional[torch.Generator] = None) -> LoadedCheckpoint:
    """Loads weights into `modules` (each on its own device), and the optimizer and RNG states when given."""
    path = str(path)
    parts = split_state_dict(load_safetensors(os.path.join(path, "model.safetensors")), list(modules))
    for name, module in modules.items():
        if not parts[name]:
            raise CheckpointError(f"{path}: no weights for module {name!r}")
        load_state_checked(module, parts[name], f"{name} (checkpoint {path})")
    if optimizer is not None:
        load_optimizer_state(optimizer, os.path.join(path, "optimizer.safetensors"))
    step = load_training_state(os.path.join(path, STATE_FILE), generator)
    ema_path = os.path.join(path, "ema.safetensors")
    ema_state = load_safetensors(ema_path) if os.path.isfile(ema_path) else None
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f).get("config", {})
    return LoadedCheckpoint(path=path, step=step, ema_state=ema_state, config=config)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ---------------------------------------------------------------------------------------------
# model folders


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
    config = {**afa_hyperparameters(ensemble), "points": [p.name for p in ensemble.points], **_jsonable(extra or {})}
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
