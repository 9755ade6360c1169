"""Objectives: what one training step computes, which modules it trains, and what a finished run
writes to final/. The loop (trainer.training.loop) runs any of them."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from trainer.diffusion.losses import DiffusionLoss
from trainer.io.model_folders import save_aggregators, save_text_encoder, save_unet, save_vae
from trainer.models.afa import AFAEnsemble, random_expert_mask, routing_divergence, routing_targets
from trainer.models.text_encoder import CLIPTextEncoder
from trainer.models.unet import UNet2DConditionModel
from trainer.models.vae import AutoencoderKL, vae_loss
from trainer.text.bpe import CLIPTokenizer, write_tokenizer_files
from trainer.training.conditioning import TextConditioner, drop_captions


def _compiled(module: nn.Module, enabled: bool) -> Callable[..., Any]:
    if not enabled:
        return module
    if not hasattr(torch, "compile"):
        warnings.warn("compile=True needs torch ≥ 2.0; running eagerly")
        return module
    return torch.compile(module)


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


def _write_scheduler(folder: str, config: Mapping[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", **config}, f, indent=2)
        f.write("\n")


def _write_tokenizer(folder: str, tokenizer: CLIPTokenizer) -> None:
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    write_tokenizer_files(tokenizer.encoder, merges, folder)


# ---------------------------------------------------------------------------------------------
# the objectives


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
