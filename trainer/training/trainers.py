"""The three trainers: each builds its objective and runs the shared loop (trainer.training.loop).

    train_vae(vae, data, steps, **options)                                   -> TrainResult
    train_unet(unet, text_encoder | None, tokenizer, data, steps, **options) -> TrainResult
    train_afa(ensemble, text_encoders, tokenizers, data, steps, **options)   -> TrainResult

`data` is a sequence of (tensor, caption) (see trainer.training.data). Options are the TrainOptions
fields (as keywords or `options=TrainOptions(...)`) plus each trainer's own keywords.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from trainer.diffusion.losses import DiffusionLoss, schedule_from_config
from trainer.models.afa import AFAEnsemble
from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.unet import UNet2DConditionModel
from trainer.models.vae import AutoencoderKL
from trainer.text.bpe import CLIPTokenizer
from trainer.training.data import Example
from trainer.training.loop import run_training
from trainer.training.objectives import AFAObjective, RoutingLoss, UNetObjective, VAEObjective
from trainer.training.options import Evaluate, TrainOptions, TrainResult, resolve_device


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
    alone denoises each region best (trainer.models.afa.routing_targets with routing_window, routing_temperature;
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
