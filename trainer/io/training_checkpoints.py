"""Training checkpoints: save, find and resume.

A checkpoint is a folder `<out_dir>/checkpoints/step-00001234/`:

    model.safetensors   the trained modules' state dicts, keys prefixed by module name
                        ("unet.", "text_encoder.", "vae.", "aggregators."); metadata: step
    ema.safetensors     EMA shadow weights, same keys (only when EMA is on)
    optimizer.safetensors  optimizer state tensors; param_groups and scalar state as JSON metadata
    state.safetensors   step, the training generator's state, torch's CPU/CUDA and Python RNG states
    config.json         step, the run's config (model configs, data, hyperparameters): for people

It is written under a temporary name and renamed into place, so a run killed while saving leaves
the previous checkpoint intact; the newest `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from trainer.io.model_folders import CheckpointError, describe_keys, jsonable, load_state_checked
from trainer.io.safetensors import PathLike, load_safetensors, load_safetensors_metadata, save_safetensors

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------------------
# state dicts of several modules in one file


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
        raise CheckpointError(f"checkpoint holds tensors of modules this run does not train: {describe_keys(stray)}")
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
            json.dump({"step": step, "modules": sorted(modules), "config": jsonable(config or {})}, f, indent=2)
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
