"""Training loops: VAE, U-Net (+ text encoder), and the SABW aggregators of an AFA ensemble.

Library:
    train_vae(vae, data, steps, **options)                                   -> TrainResult
    train_unet(unet, text_encoder | None, tokenizer, data, steps, **options) -> TrainResult
    train_afa(ensemble, text_encoders, tokenizers, data, steps, **options)   -> TrainResult
`data` is a sequence of (tensor, caption) (see trainer.data). Options are the TrainOptions fields
(as keywords or `options=TrainOptions(...)`) plus each loop's own keywords. Every random draw of a
step (caption alternatives, caption dropout, VAE posterior noise, diffusion noise, timesteps, expert
masks) comes from one CPU generator seeded with `seed`, and the batch of step s is a function of
(seed, s); the generator is checkpointed, so k steps + resume to 2k equals 2k straight, bit for bit
on the CPU. On CUDA (checked on an H200, torch 2.11) plain runs differ from each other in the last
bits (atomic adds in backward kernels, ~1e-5 after a few steps); `deterministic` selects
deterministic kernels for runs that must match exactly.

evaluate(step) -> dict | None, when given, runs at every checkpoint (checkpoint_every,
checkpoint_minutes, a budget stop; also without out_dir) and at the end, with the EMA weights
applied and the trained modules in eval mode; what it returns goes to metrics.jsonl and
TrainResult.evaluations. Training state is untouched by it: it may use torch's global RNG freely.

CLI:
    python3 -m trainer.train vae|unet|afa --config FILE.json [--device cpu|cuda] [--out-dir DIR]
                                          [--steps N] [--max-minutes M] [--seed S] [--no-resume] [--quiet]
    python3 -m trainer.train latents --vae DIR --data DIR --out FILE.safetensors [--device ...] [--sample]
A run resumes from the newest checkpoint in its out_dir unless --no-resume. The CLI sets
OMP_WAIT_POLICY=PASSIVE when it is not set (2-core machines shared by several processes).

Config file (JSON):
    out_dir        folder for checkpoints/, final/, metrics.jsonl, run_config.json   (required)
    device         "cpu" | "cuda"                                                     (default "cpu")
    data           {"type": "folder", "path": DIR}   images (PNG/.npy/.pt) + captions (.txt or captions.json)
                   {"type": "latents", "path": FILE} latents precomputed by `latents`
    train          TrainOptions fields and the loop's own keys (below); unknown keys are an error
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
  all loops  steps, batch_size, lr, weight_decay, adam_betas, adam_eps, warmup_steps, grad_clip,
             ema_decay, seed, checkpoint_every (steps), checkpoint_minutes, keep_checkpoints,
             max_minutes, log_every, amp_bf16, compile, deterministic (see TrainOptions)
  vae        kl_weight
  unet       caption_dropout, snr_weighting ("none" | "min_snr" | "capped"), snr_gamma,
             prediction_type (overrides the scheduler's), train_text_encoder, text_encoder_lr,
             cross_attention_mask
  afa        caption_dropout (0.1), expert_dropout (0.0), expert_min_keep (2), snr_weighting, snr_gamma,
             routing_loss (0.0), routing_window (0.4), routing_temperature (0.2): see train_afa

Outputs in out_dir: checkpoints/step-XXXXXXXX/ (see trainer.checkpointing), metrics.jsonl (one JSON
object per progress line and per evaluation), run_config.json, and final/ with unet/, text_encoder/,
vae/, afa/, scheduler/, tokenizer/ as trained (EMA weights when EMA is on).
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from trainer.afa import AFAEnsemble, random_expert_mask, routing_divergence, routing_targets
from trainer.bpe import CLIPTokenizer, write_tokenizer_files
from trainer.checkpointing import (latest_checkpoint, load_aggregators, load_checkpoint, load_text_encoder, load_unet,
                                   load_vae, save_aggregators, save_checkpoint, save_text_encoder, save_unet, save_vae,
                                   text_encoder_config_from_dict, vae_config_from_dict)
from trainer.data import Example, StepBatches, encode_latents, open_data_source
from trainer.progress import Progress
from trainer.schedules import NoiseSchedule
from trainer.text_encoder import CLIPTextEncoder, padding_mask_from_ids
from trainer.unet import UNet2DConditionModel, UNetConfig
from trainer.vae import AutoencoderKL, vae_loss

# Stable Diffusion 1.x's training schedule (the AFA reference trains on it).
SD15_SCHEDULER: Dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
SNR_WEIGHTINGS = ("none", "min_snr", "capped")
Evaluate = Callable[[int], Optional[Mapping[str, Any]]]


@dataclass
class TrainOptions:
    """Options shared by all loops. Defaults are the AFA reference recipe (AdamW 1e-4, wd 0.01,
    constant rate, no clipping)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0                   # linear warm-up, then constant
    grad_clip: Optional[float] = None       # max global grad norm
    ema_decay: Optional[float] = None       # e.g. 0.999; effective decay min(decay, (1+s)/(10+s))
    seed: int = 0
    device: str = "cpu"
    out_dir: Optional[str] = None           # None: nothing is written, nothing resumed
    resume: Union[bool, str] = True         # True: newest checkpoint in out_dir; str: that checkpoint
    checkpoint_every: Optional[int] = None  # steps
    checkpoint_minutes: Optional[float] = None
    keep_checkpoints: Optional[int] = 3     # None/0: keep all
    max_minutes: Optional[float] = None     # budget for this call's loop; stops with a checkpoint
    log_every: int = 10
    quiet: bool = False
    amp_bf16: bool = False                  # CUDA only: autocast forward passes to bfloat16
    compile: bool = False                   # torch.compile the trained network's forward (torch ≥ 2)
    deterministic: bool = False             # CUDA: deterministic kernels (CPU runs are deterministic anyway)

    @classmethod
    def build(cls, options: Union["TrainOptions", Mapping[str, Any], None] = None, **overrides) -> "TrainOptions":
        base = options if isinstance(options, TrainOptions) else cls(**dict(options or {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
        built = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None or k in (
            "grad_clip", "ema_decay", "out_dir", "checkpoint_every", "checkpoint_minutes", "max_minutes")})
        built.adam_betas = tuple(built.adam_betas)
        if built.steps < 0 or built.batch_size < 1:
            raise ValueError("steps must be ≥ 0 and batch_size ≥ 1")
        return built


@dataclass
class TrainResult:
    step: int                      # the step reached (counting resumed steps)
    start_step: int                # where this call started (0, or the resumed checkpoint's step)
    completed: bool                # step == options.steps
    stopped_by_budget: bool
    losses: List[float]            # the loss of every step of this call
    checkpoint: Optional[str]      # the last checkpoint written
    final_dir: Optional[str]
    evaluations: List[Tuple[int, Dict[str, Any]]] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


# ---------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of named parameters, kept in float32."""

    def __init__(self, named_parameters: Mapping[str, nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.parameters = dict(named_parameters)
        self.shadow = {k: p.detach().float().clone() for k, p in self.parameters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, p in self.parameters.items():
            self.shadow[key].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    def state_dict(self) -> Dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        for key in self.shadow:
            self.shadow[key] = state[key].to(self.shadow[key].device, torch.float32).clone()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration of the block."""
        backup = {k: p.detach().clone() for k, p in self.parameters.items()}
        with torch.no_grad():
            for key, p in self.parameters.items():
                p.copy_(self.shadow[key].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for key, p in self.parameters.items():
                    p.copy_(backup[key])


# ---------------------------------------------------------------------------------------------
# pieces shared by the objectives


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """The modules in eval mode for the duration of the block, then back in the mode each had."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def drop_captions(captions: Sequence[str], p: float, generator: Optional[torch.Generator] = None) -> List[str]:
    """Each caption replaced by "" with probability p (classifier-free guidance training).
    Always draws one number per caption, so the random stream does not depend on p."""
    draws = torch.rand(len(captions), generator=generator)
    return ["" if float(u) < p else c for u, c in zip(draws, captions)]


def _compiled(module: nn.Module, enabled: bool) -> Callable[..., Any]:
    if not enabled:
        return module
    if not hasattr(torch, "compile"):
        warnings.warn("compile=True needs torch ≥ 2.0; running eagerly")
        return module
    return torch.compile(module)


def _check_tokenizer(text_encoder: nn.Module, tokenizer: CLIPTokenizer, what: str) -> None:
    config = text_encoder.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{what}: the tokenizer has {tokenizer.vocab_size} tokens, the text encoder only "
                         f"{config.vocab_size}")
    if tokenizer.eos_token_id != config.eos_token_id:
        raise ValueError(f"{what}: the tokenizer's <|endoftext|> is {tokenizer.eos_token_id}, the text encoder's "
                         f"eos_token_id is {config.eos_token_id}")


class TextConditioner:
    """Captions → (hidden states [B,77,D], pooled [B,D], padding mask [B,77]) through one text encoder."""

    def __init__(self, text_encoder: nn.Module, tokenizer: CLIPTokenizer, device: torch.device, trainable: bool):
        _check_tokenizer(text_encoder, tokenizer, "text conditioning")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self.trainable = trainable
        self._ids: Dict[str, Tensor] = {}

    def input_ids(self, captions: Sequence[str]) -> Tensor:
        for caption in captions:
            if caption not in self._ids:
                self._ids[caption] = self.tokenizer([caption])[0]
        return torch.stack([self._ids[c] for c in captions]).to(self.device)

    def __call__(self, captions: Sequence[str]) -> Tuple[Tensor, Tensor, Tensor]:
        ids = self.input_ids(captions)
        with contextlib.nullcontext() if self.trainable else torch.no_grad():
            hidden, pooled = self.text_encoder(ids)
        return hidden, pooled, padding_mask_from_ids(ids, self.tokenizer.eos_token_id)


class DiffusionLoss:
    """Noise, timesteps (uniform over the schedule's train timesteps), targets and the weighted MSE."""

    def __init__(self, schedule: NoiseSchedule, device: torch.device, snr_weighting: str = "none",
                 snr_gamma: float = 5.0):
        if snr_weighting not in SNR_WEIGHTINGS:
            raise ValueError(f"snr_weighting must be one of {SNR_WEIGHTINGS}, got {snr_weighting!r}")
        self.schedule = schedule
        self.device = device
        self.snr_weighting = snr_weighting
        self.snr_gamma = snr_gamma

    def noisy_inputs(self, x0: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
        """(noisy sample, timesteps [B] on the device, target); noise and timesteps are drawn on the CPU."""
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(self.device, x0.dtype)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(self.device)
        return self.schedule.add_noise(x0, noise, t), t, self.schedule.target(x0, noise, t)

    def __call__(self, prediction: Tensor, target: Tensor, t: Tensor) -> Tensor:
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.snr_weighting == "none":
            return per_sample.mean()
        if self.snr_weighting == "min_snr":
            weights = self.schedule.min_snr_weights(t, self.snr_gamma)
        else:
            weights = self.schedule.capped_snr_weights(t, self.snr_gamma)
        return (per_sample * weights.to(per_sample.device)).mean()


def _encode_images(vae: Optional[AutoencoderKL], x: Tensor, device: torch.device,
                   generator: torch.Generator) -> Tensor:
    """Latents (× scaling_factor) of images through a frozen VAE, or x itself when there is no VAE."""
    x = x.to(device, torch.float32)
    if vae is None:
        return x
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        return vae.sample_latent(mean, logvar, generator) * float(vae.config.scaling_factor)


def _check_channels(x0: Tensor, expected: int, have_vae: bool) -> None:
    if x0.shape[1] != expected:
        hint = "" if have_vae else " (image data needs a VAE to encode it, or precomputed latents)"
        raise ValueError(f"training data has {x0.shape[1]} channels, the U-Net takes {expected}{hint}")


def schedule_from_config(scheduler_config: Optional[Mapping[str, Any]],
                         prediction_type: Optional[str] = None) -> Tuple[NoiseSchedule, Dict[str, Any]]:
    config = dict(SD15_SCHEDULER if scheduler_config is None else scheduler_config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return NoiseSchedule.from_config(config), config


def _write_scheduler(folder: str, config: Mapping[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", **config}, f, indent=2)
        f.write("\n")


def _write_tokenizer(folder: str, tokenizer: CLIPTokenizer) -> None:
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    write_tokenizer_files(tokenizer.encoder, merges, folder)


# ---------------------------------------------------------------------------------------------
# objectives: what one step computes, what is trained, what a finished run writes


class Objective:
    modules: Dict[str, nn.Module]  # trained and checkpointed, by name

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        return [{"params": [p for m in self.modules.values() for p in m.parameters() if p.requires_grad], "lr": lr}]

    def named_trainable(self) -> Dict[str, nn.Parameter]:
        return {f"{name}.{k}": p for name, m in self.modules.items() for k, p in m.named_parameters()
                if p.requires_grad}

    def set_training(self, mode: bool) -> None:
        for module in self.modules.values():
            module.train(mode)

    def loss(self, x: Tensor, captions: List[str], generator: torch.Generator) -> Tuple[Tensor, Dict[str, float]]:
        raise NotImplementedError

    def export(self, folder: str) -> None:
        raise NotImplementedError


class VAEObjective(Objective):
    def __init__(self, vae: AutoencoderKL, device: torch.device, kl_weight: float):
        self.vae = vae.to(device)
        self.vae.requires_grad_(True)
        self.device = device
        self.kl_weight = kl_weight
        self.modules = {"vae": self.vae}

    def loss(self, x, captions, generator):
        loss, recon, kl = vae_loss(self.vae, x.to(self.device, torch.float32), self.kl_weight, generator)
        return loss, {"recon": float(recon.detach()), "kl": float(kl.detach())}

    def export(self, folder):
        save_vae(self.vae, os.path.join(folder, "vae"))


class UNetObjective(Objective):
    def __init__(self, unet: UNet2DConditionModel, text_encoder: Optional[CLIPTextEncoder],
                 tokenizer: Optional[CLIPTokenizer], device: torch.device, diffusion: DiffusionLoss,
                 scheduler_config: Mapping[str, Any], caption_dropout: float, train_text_encoder: bool,
                 text_encoder_lr: Optional[float], vae: Optional[AutoencoderKL], cross_attention_mask: bool,
                 compile_forward: bool):
        self.unet = unet.to(device)
        self.unet.requires_grad_(True)
        self.device = device
        self.diffusion = diffusion
        self.scheduler_config = dict(scheduler_config)
        self.caption_dropout = caption_dropout
        self.text_encoder_lr = text_encoder_lr
        self.cross_attention_mask = cross_attention_mask
        self.vae = vae.to(device).eval().requires_grad_(False) if vae is not None else None
        self.forward = _compiled(self.unet, compile_forward)
        self.modules = {"unet": self.unet}
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.conditioner: Optional[TextConditioner] = None
        if text_encoder is not None:
            if tokenizer is None:
                raise ValueError("a text encoder needs a tokenizer")
            text_encoder.to(device).requires_grad_(train_text_encoder)
            text_encoder.train(train_text_encoder)
            self.conditioner = TextConditioner(text_encoder, tokenizer, device, train_text_encoder)
            if train_text_encoder:
                self.modules["text_encoder"] = text_encoder
        elif train_text_encoder:
            raise ValueError("train_text_encoder needs a text encoder")
        self.context_dim = unet.config.cross_attention_dims()[0]

    def param_groups(self, lr):
        groups = [{"params": list(self.unet.parameters()), "lr": lr}]
        if "text_encoder" in self.modules:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": self.text_encoder_lr or lr})
        return groups

    def loss(self, x, captions, generator):
        captions = drop_captions(captions, self.caption_dropout, generator)
        x0 = _encode_images(self.vae, x, self.device, generator)
        _check_channels(x0, self.unet.config.in_channels, self.vae is not None)
        batch = x0.shape[0]
        pooled = mask = None
        if self.conditioner is None:
            # unconditional: every key of an all-zero context is equal, so cross-attention adds nothing
            hidden = torch.zeros(batch, 1, self.context_dim, device=self.device)
        else:
            hidden, pooled, mask = self.conditioner(captions)
        noisy, t, target = self.diffusion.noisy_inputs(x0, generator)
        class_labels = pooled if self.unet.class_embedding is not None else None
        if class_labels is None and self.unet.class_embedding is not None:
            raise ValueError("this U-Net adds a pooled text embedding (class_embed_type 'projection'): "
                             "it needs a text encoder")
        prediction = self.forward(noisy, t, hidden, mask if self.cross_attention_mask else None, class_labels)
        return self.diffusion(prediction, target, t), {}

    def set_training(self, mode):
        super().set_training(mode)
        if self.text_encoder is not None and "text_encoder" not in self.modules:
            self.text_encoder.eval()

    def export(self, folder):
        save_unet(self.unet, os.path.join(folder, "unet"))
        if "text_encoder" in self.modules:
            save_text_encoder(self.text_encoder, os.path.join(folder, "text_encoder"))
        if self.tokenizer is not None:
            _write_tokenizer(os.path.join(folder, "tokenizer"), self.tokenizer)
        _write_scheduler(os.path.join(folder, "scheduler"), self.scheduler_config)


@dataclasses.dataclass(frozen=True)
class RoutingLoss:
    """The optional routing term of the aggregators' loss (see train_afa)."""
    weight: float = 0.0
    window: float = 0.4
    temperature: float = 0.2

    def __post_init__(self):
        if self.weight < 0 or self.window <= 0 or self.temperature <= 0:
            raise ValueError(f"routing_loss must be ≥ 0 and routing_window, routing_temperature > 0, got {self}")


class AFAObjective(Objective):
    def __init__(self, ensemble: AFAEnsemble, text_encoders: Sequence[nn.Module], tokenizers: Sequence[CLIPTokenizer],
                 device: torch.device, diffusion: DiffusionLoss, scheduler_config: Mapping[str, Any],
                 caption_dropout: float, expert_dropout: float, expert_min_keep: int,
                 vae: Optional[AutoencoderKL], compile_forward: bool, expert_ids: Optional[Sequence[str]],
                 routing: Optional[RoutingLoss] = None):
        n = ensemble.num_experts
        if len(text_encoders) != n or len(tokenizers) != n:
            raise ValueError(f"the ensemble has {n} experts: give one text encoder and tokenizer, or {n} of each")
        self.ensemble = ensemble.to(device)
        self.ensemble.requires_grad_(False)
        for p in ensemble.aggregator_parameters():
            p.requires_grad_(True)
        self.device = device
        self.diffusion = diffusion
        self.scheduler_config = dict(scheduler_config)
        self.caption_dropout = caption_dropout
        self.expert_dropout = expert_dropout
        self.expert_min_keep = expert_min_keep
        self.routing = routing if routing is not None and routing.weight > 0 else None
        self.expert_ids = list(expert_ids) if expert_ids is not None else None
        self.vae = vae.to(device).eval().requires_grad_(False) if vae is not None else None
        self.forward = _compiled(self.ensemble, compile_forward)
        self.tokenizer = tokenizers[0]
        # experts sharing a text encoder and tokenizer share one forward pass
        self.conditioners: Dict[Tuple[int, int], TextConditioner] = {}
        self.expert_keys: List[Tuple[int, int]] = []
        for encoder, tokenizer in zip(text_encoders, tokenizers):
            key = (id(encoder), id(tokenizer))
            if key not in self.conditioners:
                encoder.to(device).eval().requires_grad_(False)
                self.conditioners[key] = TextConditioner(encoder, tokenizer, device, trainable=False)
            self.expert_keys.append(key)
        self.needs_pooled = any(u.class_embedding is not None for u in ensemble.unets)
        self.modules = {"aggregators": ensemble.aggregators}

    def param_groups(self, lr):
        return [{"params": self.ensemble.aggregator_parameters(), "lr": lr}]

    def set_training(self, mode):
        self.ensemble.train(mode)  # keeps the experts in eval mode

    def loss(self, x, captions, generator):
        captions = drop_captions(captions, self.caption_dropout, generator)
        x0 = _encode_images(self.vae, x, self.device, generator)
        _check_channels(x0, self.ensemble.unets[0].config.in_channels, self.vae is not None)
        encoded = {key: conditioner(captions) for key, conditioner in self.conditioners.items()}
        if len(encoded) == 1:
            hidden, pooled, _ = next(iter(encoded.values()))
        else:
            hidden = torch.stack([encoded[k][0] for k in self.expert_keys])
            pooled = torch.stack([encoded[k][1] for k in self.expert_keys])
        noisy, t, target = self.diffusion.noisy_inputs(x0, generator)
        mask = None
        if self.expert_dropout > 0:
            mask = random_expert_mask(self.ensemble.num_experts, x0.shape[0], self.expert_dropout, generator,
                                      self.expert_min_keep).to(self.device)
        kwargs = {"class_labels": pooled} if self.needs_pooled else {}
        prediction, weights = self.forward(noisy, t, hidden, mask, **kwargs)
        loss = self.diffusion(prediction, target, t)
        if self.routing is None:
            return loss, {}
        errors = self._expert_errors(noisy, t, hidden, kwargs, target)
        targets = routing_targets(errors, self.routing.window, self.routing.temperature, mask)
        divergence = routing_divergence(weights, targets)
        return loss + self.routing.weight * divergence, {"routing_kl": float(divergence.detach())}

    @torch.no_grad()
    def _expert_errors(self, noisy: Tensor, t: Tensor, hidden: Tensor, kwargs: Dict[str, Tensor],
                       target: Tensor) -> Tensor:
        """[B,N,h,w]: each expert run alone on the ensemble's input, its squared error (mean over channels)."""
        predictions = self.ensemble.each_alone(noisy, t, hidden, **kwargs)
        return torch.stack([(p.float() - target.float()).pow(2).mean(1) for p in predictions], 1)

    def export(self, folder):
        extra: Dict[str, Any] = {"prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
                                 "expert_dropout": self.expert_dropout}
        if self.expert_ids is not None:
            extra["expert_ids"] = self.expert_ids
        save_aggregators(self.ensemble, os.path.join(folder, "afa"), extra)
        _write_tokenizer(os.path.join(folder, "tokenizer"), self.tokenizer)
        _write_scheduler(os.path.join(folder, "scheduler"), self.scheduler_config)


# ---------------------------------------------------------------------------------------------
# the loop


def _make_deterministic(device: torch.device) -> None:
    """Process-wide: cuBLAS workspace config, deterministic cuDNN and deterministic scatter/index kernels.
    Without it CUDA runs differ in the last bits (atomic adds), so a resumed run only approximates."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _autocast(options: TrainOptions, device: torch.device):
    if options.amp_bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_RESUME_NEUTRAL = {"steps", "out_dir", "resume", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
                   "max_minutes", "log_every", "quiet", "device", "compile", "amp_bf16", "deterministic"}


def _warn_changed_options(saved: Mapping[str, Any], options: TrainOptions) -> None:
    current = dataclasses.asdict(options)
    changed = [f"{k}: {saved[k]!r} → {v!r}" for k, v in current.items()
               if k in saved and k not in _RESUME_NEUTRAL and saved[k] != (list(v) if isinstance(v, tuple) else v)]
    if changed:
        warnings.warn("resuming with changed options (the result will differ from an uninterrupted run): "
                      + "; ".join(changed))


class _MetricsLog:
    def __init__(self, out_dir: Optional[str]):
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_training(objective: Objective, data: Sequence[Example], options: TrainOptions,
                 evaluate: Optional[Evaluate] = None, config: Optional[Mapping[str, Any]] = None) -> TrainResult:
    """The shared loop: AdamW, warm-up, clipping, EMA, checkpoints, budget, progress, evaluation."""
    with torch.enable_grad():  # whatever grad mode the caller left behind
        return _run_training(objective, data, options, evaluate, config)


def _run_training(objective: Objective, data: Sequence[Example], options: TrainOptions,
                  evaluate: Optional[Evaluate], config: Optional[Mapping[str, Any]]) -> TrainResult:
    device = resolve_device(options.device)
    if options.deterministic:
        _make_deterministic(device)
    out_dir = options.out_dir
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(options.seed)
    groups = objective.param_groups(options.lr)
    for group in groups:
        group["base_lr"] = group["lr"]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=options.adam_betas, eps=options.adam_eps,
                                  weight_decay=options.weight_decay)
    ema = EMA(objective.named_trainable(), options.ema_decay) if options.ema_decay else None
    run_config = {**dict(config or {}), "options": dataclasses.asdict(options)}
    say = (lambda text: None) if options.quiet else (lambda text: print(text, flush=True))

    start_step = 0
    checkpoint: Optional[str] = None
    if out_dir and options.resume:
        path = options.resume if isinstance(options.resume, str) else latest_checkpoint(out_dir)
        if path:
            loaded = load_checkpoint(path, objective.modules, optimizer, generator)
            start_step, checkpoint = loaded.step, path
            _warn_changed_options(loaded.config.get("options", {}), options)
            if ema is not None:
                if loaded.ema_state is None:
                    warnings.warn(f"{path} has no EMA weights; the EMA starts from the resumed weights")
                    ema = EMA(objective.named_trainable(), options.ema_decay)
                else:
                    ema.load_state_dict(loaded.ema_state)
            say(f"resumed from {path} at step {start_step}")
    if out_dir:
        with open(os.path.join(out_dir, "run_config.json"), "w") as f:
            json.dump(json.loads(json.dumps(run_config, default=repr)), f, indent=2)
            f.write("\n")

    batches = StepBatches(data, options.batch_size, options.seed)
    budget = options.max_minutes * 60 if options.max_minutes is not None else None
    progress = Progress(options.steps, start_step, every=options.log_every, budget_seconds=budget,
                        stream=None if options.quiet else sys.stdout)
    metrics = _MetricsLog(out_dir)
    result = TrainResult(step=start_step, start_step=start_step, completed=start_step >= options.steps,
                         stopped_by_budget=False, losses=[], checkpoint=checkpoint, final_dir=None)

    def save(step: int) -> None:
        result.checkpoint = save_checkpoint(out_dir, step, objective.modules, optimizer, generator,
                                            ema.state_dict() if ema else None, run_config, options.keep_checkpoints)

    def run_evaluation(step: int) -> None:
        if evaluate is None:
            return
        objective.set_training(False)
        try:
            with ema.applied() if ema else contextlib.nullcontext():
                outcome = evaluate(step)
        finally:
            objective.set_training(True)
        outcome = dict(outcome or {})
        result.evaluations.append((step, outcome))
        metrics.write({"step": step, "eval": outcome})
        if outcome:
            say(f"eval @ {step}: " + "  ".join(f"{k} {v}" for k, v in outcome.items()))

    step = start_step
    last_save = time.monotonic()
    last_saved_step = start_step if checkpoint else None
    objective.set_training(True)
    try:
        while step < options.steps:
            step_started = time.monotonic()
            x, captions = batches(step, generator)
            factor = min(1.0, (step + 1) / options.warmup_steps) if options.warmup_steps else 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with _autocast(options, device):
                loss, extras = objective.loss(x, captions, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                extras["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
            optimizer.step()
            step += 1
            if ema is not None:
                ema.update(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {step}")
            result.losses.append(value)
            result.step = step
            line = progress.update(step, value, extras)
            if line is not None:
                metrics.write({"step": step, "loss": progress.mean_loss, "steps_per_s": progress.steps_per_second,
                               "eta_s": progress.eta_seconds, "lr": optimizer.param_groups[0]["lr"],
                               "elapsed_s": progress.elapsed, **progress.mean_extras()})
            step_time = time.monotonic() - step_started
            out_of_time = budget is not None and progress.elapsed + step_time > budget and step < options.steps
            due = step < options.steps and (
                bool(options.checkpoint_every and step % options.checkpoint_every == 0)
                or bool(options.checkpoint_minutes and time.monotonic() - last_save >= options.checkpoint_minutes * 60))
            if due or out_of_time:  # evaluations follow the checkpoint schedule, also without out_dir
                if out_dir:
                    save(step)
                    last_saved_step = step
                last_save = time.monotonic()
                run_evaluation(step)
            if out_of_time:
                result.stopped_by_budget = True
                say(f"time budget of {options.max_minutes} min reached at step {step}; stopping")
                break
    except KeyboardInterrupt:
        if out_dir and step > start_step and last_saved_step != step:
            save(step)
            say(f"interrupted: saved {result.checkpoint}")
        raise

    result.completed = step >= options.steps
    if result.completed:
        if out_dir and last_saved_step != step:
            save(step)
        if not result.evaluations or result.evaluations[-1][0] != step:
            run_evaluation(step)
    if out_dir:
        final = os.path.join(out_dir, "final")
        objective.set_training(False)
        with ema.applied() if ema else contextlib.nullcontext():
            objective.export(final)
        with open(os.path.join(final, "training.json"), "w") as f:
            json.dump({"step": step, "completed": result.completed, "steps": options.steps,
                       "ema": bool(ema), "checkpoint": result.checkpoint}, f, indent=2)
            f.write("\n")
        result.final_dir = final
    return result


# ---------------------------------------------------------------------------------------------
# public entry points


def train_vae(vae: AutoencoderKL, data: Sequence[Example], steps: Optional[int] = None, *,
              options: Union[TrainOptions, Mapping[str, Any], None] = None, kl_weight: float = 1e-6,
              evaluate: Optional[Evaluate] = None, config: Optional[Mapping[str, Any]] = None,
              **option_overrides) -> TrainResult:
    """Trains an AutoencoderKL on images in [-1, 1]: loss = pixel MSE + kl_weight · KL."""
    opts = TrainOptions.build(options, steps=steps, **option_overrides)
    objective = VAEObjective(vae, resolve_device(opts.device), kl_weight)
    run_config = {"kind": "vae", "vae": vae.config.to_dict(), "kl_weight": kl_weight, **dict(config or {})}
    return run_training(objective, data, opts, evaluate, run_config)


def train_unet(unet: UNet2DConditionModel, text_encoder: Optional[CLIPTextEncoder], tokenizer: Optional[CLIPTokenizer],
               data: Sequence[Example], steps: Optional[int] = None, *,
               options: Union[TrainOptions, Mapping[str, Any], None] = None,
               scheduler_config: Optional[Mapping[str, Any]] = None, prediction_type: Optional[str] = None,
               snr_weighting: str = "none", snr_gamma: float = 5.0, caption_dropout: float = 0.0,
               train_text_encoder: bool = False, text_encoder_lr: Optional[float] = None,
               vae: Optional[AutoencoderKL] = None, cross_attention_mask: bool = False,
               evaluate: Optional[Evaluate] = None, config: Optional[Mapping[str, Any]] = None,
               **option_overrides) -> TrainResult:
    """Trains (from scratch or fine-tunes) a U-Net on latents, or on images through a frozen `vae`.

    text_encoder None: unconditional (an all-zero context). snr_weighting: "min_snr" (Min-SNR-γ for
    the prediction type) or "capped" (min(1, γ/(snr+1)), for v-prediction on zero-terminal-SNR
    schedules). cross_attention_mask also hides padding tokens from the U-Net's cross-attention
    (the exported graph then needs the mask too). U-Nets with a projection class embedding receive
    the pooled text embedding.
    """
    opts = TrainOptions.build(options, steps=steps, **option_overrides)
    device = resolve_device(opts.device)
    schedule, sched_config = schedule_from_config(scheduler_config, prediction_type)
    diffusion = DiffusionLoss(schedule, device, snr_weighting, snr_gamma)
    objective = UNetObjective(unet, text_encoder, tokenizer, device, diffusion, sched_config, caption_dropout,
                              train_text_encoder, text_encoder_lr, vae, cross_attention_mask, opts.compile)
    run_config = {
        "kind": "unet", "unet": unet.config.to_dict(),
        "text_encoder": text_encoder.config.to_dict() if text_encoder is not None else None,
        "scheduler": sched_config, "snr_weighting": snr_weighting, "snr_gamma": snr_gamma,
        "caption_dropout": caption_dropout, "train_text_encoder": train_text_encoder,
        "text_encoder_lr": text_encoder_lr, "cross_attention_mask": cross_attention_mask,
        **dict(config or {}),
    }
    return run_training(objective, data, opts, evaluate, run_config)


def train_afa(ensemble: AFAEnsemble, text_encoders: Union[nn.Module, Sequence[nn.Module]],
              tokenizers: Union[CLIPTokenizer, Sequence[CLIPTokenizer]], data: Sequence[Example],
              steps: Optional[int] = None, *, options: Union[TrainOptions, Mapping[str, Any], None] = None,
              scheduler_config: Optional[Mapping[str, Any]] = None, caption_dropout: float = 0.1,
              expert_dropout: float = 0.0, expert_min_keep: int = 2, snr_weighting: str = "none",
              snr_gamma: float = 5.0, vae: Optional[AutoencoderKL] = None,
              expert_ids: Optional[Sequence[str]] = None, evaluate: Optional[Evaluate] = None,
              config: Optional[Mapping[str, Any]] = None, routing_loss: float = RoutingLoss.weight,
              routing_window: float = RoutingLoss.window, routing_temperature: float = RoutingLoss.temperature,
              **option_overrides) -> TrainResult:
    """Trains only the SABW aggregators of `ensemble` over its frozen experts.

    Defaults are the reference recipe: MSE against the schedule's target (ε for SD1.5's config) on
    the aggregated output, timesteps uniform in 0..num_train_timesteps-1, AdamW lr 1e-4 wd 0.01 at a
    constant rate, captions → "" with p = 0.1. expert_dropout > 0 trains with random expert masks
    (at least expert_min_keep experts kept) so one aggregator serves any subset of its experts.
    text_encoders / tokenizers: one shared by all experts, or one per expert (in expert order).

    routing_loss > 0 adds routing_loss · KL(target ‖ weights) at every point, the target being which expert
    alone denoises each region best (trainer.afa.routing_targets with routing_window, routing_temperature;
    it costs one extra forward pass per expert). The plain diffusion loss (0, the paper's recipe) leaves the
    weights free to pick experts per layer, so the contribution maps need not show who drew what.
    """
    opts = TrainOptions.build(options, steps=steps, **option_overrides)
    device = resolve_device(opts.device)
    n = ensemble.num_experts
    single = isinstance(text_encoders, nn.Module) and not isinstance(text_encoders, nn.ModuleList)
    encoders = [text_encoders] * n if single else list(text_encoders)
    toks = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers] * n
    schedule, sched_config = schedule_from_config(scheduler_config)
    diffusion = DiffusionLoss(schedule, device, snr_weighting, snr_gamma)
    routing = RoutingLoss(routing_loss, routing_window, routing_temperature)
    objective = AFAObjective(ensemble, encoders, toks, device, diffusion, sched_config, caption_dropout,
                             expert_dropout, expert_min_keep, vae, opts.compile, expert_ids, routing)
    run_config = {
        "kind": "afa", "experts": [u.config.to_dict() for u in ensemble.unets], "expert_ids": expert_ids,
        "scheduler": sched_config, "caption_dropout": caption_dropout, "expert_dropout": expert_dropout,
        "expert_min_keep": expert_min_keep, "snr_weighting": snr_weighting,
        **({"routing": dataclasses.asdict(routing)} if routing_loss > 0 else {}), **dict(config or {}),
    }
    return run_training(objective, data, opts, evaluate, run_config)


# ---------------------------------------------------------------------------------------------
# CLI


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
    record = {"source_config": dict(config)}
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m trainer.train",
                                     description="Train a VAE, a U-Net (+ text encoder) or AFA aggregators.")
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("vae", "unet", "afa"):
        p = sub.add_parser(kind, help=f"train a {kind} from a JSON config (keys: see the module docstring)")
        p.add_argument("--config", required=True, help="JSON config file")
        p.add_argument("--device", choices=("cpu", "cuda"), help="overrides config.device")
        p.add_argument("--out-dir", help="overrides config.out_dir")
        p.add_argument("--steps", type=int, help="overrides train.steps")
        p.add_argument("--max-minutes", type=float, help="time budget; stops with a checkpoint")
        p.add_argument("--seed", type=int, help="overrides train.seed")
        p.add_argument("--no-resume", action="store_true", help="start from step 0 even if out_dir has checkpoints")
        p.add_argument("--quiet", action="store_true", help="no progress lines")
        p.add_argument("--deterministic", action="store_true", help="CUDA: deterministic kernels (exact resume)")
        p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p = sub.add_parser("latents", help="encode an image folder into a latents file with a VAE")
    p.add_argument("--vae", required=True, help="VAE folder (final/ of a vae run, or a diffusers vae/ folder)")
    p.add_argument("--data", required=True, help="image folder (images + captions)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="store a posterior sample instead of the mean")
    p.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.kind == "latents":
        from trainer.data import ImageFolder

        data = ImageFolder(args.data)
        encode_latents(load_vae(args.vae), data, args.out, args.batch_size, resolve_device(args.device), args.sample)
        print(f"wrote {args.out}: {len(data)} latents")
        return 0

    config = _read_json_file(args.config)
    overrides = {"device": args.device, "out_dir": args.out_dir, "steps": args.steps,
                 "max_minutes": args.max_minutes, "seed": args.seed}
    if args.no_resume:
        overrides["resume"] = False
    if args.quiet:
        overrides["quiet"] = True
    if args.deterministic:
        overrides["deterministic"] = True
    result = run_from_config(args.kind, config, overrides)
    state = "completed" if result.completed else ("stopped by the time budget" if result.stopped_by_budget else "stopped")
    print(f"{state} at step {result.step}; mean loss of this run {result.mean_loss:.4f}; "
          f"checkpoint {result.checkpoint}; final models in {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
