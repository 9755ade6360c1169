"""Training runs described by a config file: the keys, their defaults, and building the models and
data they name. `python3 -m trainer.train KIND --config FILE.json` (trainer.training.cli) runs one.

Config file (JSON), merged over DEFAULTS (objects key by key, as k-diffusion's config loader does):
    out_dir        folder for checkpoints/, final/, metrics.jsonl, run_config.json   (required)
    device         "cpu" | "cuda"                                                     (default "cpu")
    data           {"type": "folder", "path": DIR}   images (PNG/.npy/.pt) + captions (.txt or captions.json)
                   {"type": "latents", "path": FILE} latents precomputed by `latents`
    train          TrainOptions fields and the trainer's own keys (below); unknown keys are an error
    vae            model spec; the model trained by `vae`; for `unet`/`afa` the encoder of image data
    unet           model spec                                                                 (unet)
    text_encoder   model spec, or null for an unconditional U-Net                              (unet)
    tokenizer      folder with vocab.json + merges.txt                                   (unet, afa)
    scheduler      diffusers scheduler config (dict or path to scheduler_config.json); default SD1.5's
                   scaled-linear betas, epsilon                                          (unet, afa)
    experts        [model spec, ...] the frozen U-Nets, in the order of the ensemble's N axis  (afa)
    expert_ids     ["curves", ...] names recorded in final/afa/config.json                     (afa)
    text_encoders  one model spec shared by all experts, or one per expert                     (afa)
    tokenizers     optional list of tokenizer folders, one per expert (default: `tokenizer`)   (afa)
    afa            {"hidden": 128, "depth": 2, "heads": 8, "head_dim": 16, "pretrained": DIR?}   (afa)

Model spec: {"config": {...}} builds a new model (random init from `seed`): a diffusers UNet config
dict, TextEncoderConfig fields (vocab_size, eos/pad ids default to the tokenizer's) or VAEConfig
fields. {"pretrained": PATH} loads a folder written by this trainer (final/...) or a diffusers /
Hugging Face folder; a U-Net may also be a single-file SD1.x .safetensors/.ckpt (with "config" for
non-SD1.5 shapes).

`train` keys:
  all kinds  steps, batch_size, lr, weight_decay, adam_betas, adam_eps, warmup_steps, grad_clip,
             ema_decay, seed, checkpoint_every (steps), checkpoint_minutes, keep_checkpoints,
             max_minutes, log_every, amp_bf16, compile, deterministic (see TrainOptions)
  vae        kl_weight
  unet       caption_dropout, snr_weighting ("none" | "min_snr" | "capped"), snr_gamma,
             prediction_type (overrides the scheduler's), train_text_encoder, text_encoder_lr,
             cross_attention_mask
  afa        caption_dropout (0.1), expert_dropout (0.0), expert_min_keep (2), snr_weighting, snr_gamma,
             routing_loss (0.0), routing_window (0.4), routing_temperature (0.2): see train_afa
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from trainer.io.model_folders import (load_aggregators, load_text_encoder, load_unet, load_vae,
                                      text_encoder_config_from_dict, vae_config_from_dict)
from trainer.models.afa import AFAEnsemble
from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL
from trainer.text.bpe import CLIPTokenizer
from trainer.training.data import Example, open_data_source
from trainer.training.options import Evaluate, TrainOptions, TrainResult
from trainer.training.trainers import train_afa, train_unet, train_vae

# What a key left out of a config file means. `data`, `out_dir` and the models a kind trains have no
# default; `text_encoders` falls back to `text_encoder`.
DEFAULTS: Dict[str, Any] = {
    "device": "cpu",
    "out_dir": None,
    "train": {},
    "tokenizer": None,
    "tokenizers": None,
    "scheduler": None,
    "vae": None,
    "text_encoder": None,
    "expert_ids": None,
    "afa": {"hidden": 128, "depth": 2, "heads": 8, "head_dim": 16},
}


def merge(defaults: Any, overrides: Any) -> Any:
    """`overrides` over `defaults`: objects merge key by key, recursively; any other value replaces."""
    if isinstance(defaults, Mapping) and isinstance(overrides, Mapping):
        merged = {k: copy.deepcopy(v) for k, v in defaults.items()}
        for key, value in overrides.items():
            merged[key] = merge(defaults[key], value) if key in defaults else copy.deepcopy(value)
        return merged
    return copy.deepcopy(overrides)


def load_config(path: str) -> Dict[str, Any]:
    """A config file (JSON) merged over DEFAULTS."""
    return merge(DEFAULTS, _read_json_file(path))


def _read_json_file(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _scheduler_config(value: Any) -> Optional[Dict[str, Any]]:
    if value is None or isinstance(value, dict):
        return value
    path = str(value)
    if os.path.isdir(path):
        sub = os.path.join(path, "scheduler", "scheduler_config.json")
        path = sub if os.path.isfile(sub) else os.path.join(path, "scheduler_config.json")
    return _read_json_file(path)


def _spec(value: Any, what: str) -> Dict[str, Any]:
    if isinstance(value, str):
        return {"pretrained": value}
    if not isinstance(value, dict) or not ("config" in value or "pretrained" in value):
        raise ValueError(f"{what}: expected {{\"config\": {{...}}}} or {{\"pretrained\": PATH}}, got {value!r}")
    return value


def build_unet(value: Any, what: str = "unet") -> UNet2DConditionModel:
    spec = _spec(value, what)
    if "pretrained" in spec:
        return load_unet(spec["pretrained"], spec.get("config"))
    return UNet2DConditionModel(UNetConfig.from_dict(dict(spec["config"])))


def build_text_encoder(value: Any, tokenizer: Optional[CLIPTokenizer], what: str = "text_encoder") -> CLIPTextEncoder:
    spec = _spec(value, what)
    if "pretrained" in spec:
        return load_text_encoder(spec["pretrained"])
    fields = dict(spec["config"])
    if tokenizer is not None:
        fields.setdefault("vocab_size", tokenizer.vocab_size)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    return CLIPTextEncoder(text_encoder_config_from_dict(fields))


def build_vae(value: Any, what: str = "vae") -> AutoencoderKL:
    spec = _spec(value, what)
    if "pretrained" in spec:
        return load_vae(spec["pretrained"])
    return AutoencoderKL(vae_config_from_dict(dict(spec["config"])))


def build_ensemble(config: Mapping[str, Any]) -> AFAEnsemble:
    experts = config.get("experts")
    if not isinstance(experts, list) or len(experts) < 2:
        raise ValueError("config.experts must list at least 2 U-Net specs")
    unets = [build_unet(spec, f"experts[{i}]") for i, spec in enumerate(experts)]
    afa = dict(config.get("afa") or {})
    pretrained = afa.pop("pretrained", None)
    unknown = sorted(set(afa) - {"hidden", "depth", "heads", "head_dim"})
    if unknown:
        raise ValueError(f"unknown afa key(s): {', '.join(unknown)}")
    ensemble = AFAEnsemble(unets, **afa)
    if pretrained:
        load_aggregators(ensemble, pretrained)
    return ensemble


_LOOP_KEYS = {
    "vae": {"kl_weight"},
    "unet": {"caption_dropout", "snr_weighting", "snr_gamma", "prediction_type", "train_text_encoder",
             "text_encoder_lr", "cross_attention_mask"},
    "afa": {"caption_dropout", "expert_dropout", "expert_min_keep", "snr_weighting", "snr_gamma", "routing_loss",
            "routing_window", "routing_temperature"},
}


def _split_train_section(kind: str, section: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    option_names = {f.name for f in dataclasses.fields(TrainOptions)}
    options, loop = {}, {}
    unknown = []
    for key, value in section.items():
        if key in option_names:
            options[key] = value
        elif key in _LOOP_KEYS[kind]:
            loop[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown train key(s) for {kind}: {', '.join(sorted(unknown))}")
    return options, loop


def run_from_config(kind: str, config: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None,
                    evaluate: Optional[Evaluate] = None,
                    make_evaluate: Optional[Callable[[Dict[str, Any]], Evaluate]] = None) -> TrainResult:
    """What the CLI does: builds models and data from a config dict, then trains.

    make_evaluate, when given, receives the built objects ("data", "tokenizer", "vae", "unet",
    "text_encoder", "ensemble", "text_encoders", "scheduler_config"; those the kind has) and returns
    the evaluate(step) callback, for evaluations that need the models this function builds.
    """
    if kind not in _LOOP_KEYS:
        raise ValueError(f"unknown training kind {kind!r}")
    source, config = config, merge(DEFAULTS, config)
    option_values, loop = _split_train_section(kind, dict(config.get("train") or {}))
    option_values.setdefault("device", config.get("device", "cpu"))
    if config.get("out_dir") is not None:
        option_values.setdefault("out_dir", config["out_dir"])
    option_values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not option_values.get("out_dir"):
        raise ValueError("the config needs out_dir")
    opts = TrainOptions.build(option_values)
    torch.manual_seed(opts.seed)  # initialisation of models built from configs
    if "data" not in config:
        raise ValueError("the config needs data: {\"type\": \"folder\"|\"latents\", \"path\": ...}")
    data = open_data_source(dict(config["data"]))
    tokenizer = CLIPTokenizer.from_dir(config["tokenizer"]) if config.get("tokenizer") else None
    record = {"source_config": dict(source)}
    built: Dict[str, Any] = {"data": data, "tokenizer": tokenizer}

    def callback() -> Optional[Evaluate]:
        return make_evaluate(built) if make_evaluate is not None else evaluate

    if kind == "vae":
        if "vae" not in config:
            raise ValueError("the config needs vae")
        built["vae"] = build_vae(config["vae"])
        return train_vae(built["vae"], data, options=opts, evaluate=callback(), config=record, **loop)

    vae = build_vae(config["vae"]) if config.get("vae") and data_is_images(data) else None
    scheduler = _scheduler_config(config.get("scheduler"))
    built.update(vae=vae, scheduler_config=scheduler)
    if kind == "unet":
        if "unet" not in config:
            raise ValueError("the config needs unet")
        unet = build_unet(config["unet"])
        text_encoder = None
        if config.get("text_encoder") is not None:
            if tokenizer is None:
                raise ValueError("a text encoder needs config.tokenizer")
            text_encoder = build_text_encoder(config["text_encoder"], tokenizer)
        built.update(unet=unet, text_encoder=text_encoder)
        return train_unet(unet, text_encoder, tokenizer, data, options=opts, scheduler_config=scheduler, vae=vae,
                          evaluate=callback(), config=record, **loop)

    ensemble = build_ensemble(config)
    n = ensemble.num_experts
    tokenizer_dirs = config.get("tokenizers")
    if tokenizer_dirs:
        if len(tokenizer_dirs) != n:
            raise ValueError(f"config.tokenizers has {len(tokenizer_dirs)} entries for {n} experts")
        tokenizers: Union[CLIPTokenizer, List[CLIPTokenizer]] = [CLIPTokenizer.from_dir(d) for d in tokenizer_dirs]
    elif tokenizer is not None:
        tokenizers = tokenizer
    else:
        raise ValueError("afa needs config.tokenizer (or config.tokenizers)")
    encoders_spec = config.get("text_encoders", config.get("text_encoder"))
    if encoders_spec is None:
        raise ValueError("afa needs config.text_encoders (one spec, or one per expert)")
    first_tokenizer = tokenizers[0] if isinstance(tokenizers, list) else tokenizers
    if isinstance(encoders_spec, list):
        if len(encoders_spec) != n:
            raise ValueError(f"config.text_encoders has {len(encoders_spec)} entries for {n} experts")
        encoders: Union[nn.Module, List[nn.Module]] = [
            build_text_encoder(s, tokenizers[i] if isinstance(tokenizers, list) else tokenizers, f"text_encoders[{i}]")
            for i, s in enumerate(encoders_spec)]
    else:
        encoders = build_text_encoder(encoders_spec, first_tokenizer)
    built.update(ensemble=ensemble, text_encoders=encoders, tokenizers=tokenizers)
    return train_afa(ensemble, encoders, tokenizers, data, options=opts, scheduler_config=scheduler, vae=vae,
                     expert_ids=config.get("expert_ids"), evaluate=callback(), config=record, **loop)


def data_is_images(data: Sequence[Example]) -> bool:
    """True unless the source is precomputed latents."""
    return not hasattr(data, "latents")
