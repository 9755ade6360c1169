"""AutoencoderKL-style VAE with diffusers' AutoencoderKL state_dict layout (SD1.x VAE weights load as-is).

Attention is written with matmul/softmax so that it runs on torch 1.13 and exports to ONNX opset 17.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


GROUP_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = field(default_factory=lambda: (128, 256, 512, 512))
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    # Not used by the network; carried so that packages and samplers know how latents are scaled.
    scaling_factor: float = 0.18215

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}")

    @classmethod
    def sd15(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        fields = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
        fields.update(overrides)
        return cls(**fields)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    def diffusers_config(self) -> dict:
        """The equivalent diffusers AutoencoderKL config.json contents."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "mid_block_add_attention": self.mid_block_attention,
            "scaling_factor": self.scaling_factor,
        }


def _group_norm(channels: int, groups: int, device=None) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, affine=True, device=device)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, device=None):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups, device)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, device=device)
        self.norm2 = _group_norm(out_channels, groups, device)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, device=device)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1, device=device) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over pixels with a residual (diffusers' VAE mid-block Attention)."""

    def __init__(self, channels: int, groups: int, device=None):
        super().__init__()
        self.group_norm = _group_norm(channels, groups, device)
        self.to_q = nn.Linear(channels, channels, device=device)
        self.to_k = nn.Linear(channels, channels, device=device)
        self.to_v = nn.Linear(channels, channels, device=device)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, device=device)])
        self.scale = channels ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q = self.to_q(tokens)
        k = self.to_k(tokens)
        v = self.to_v(tokens)
        weights = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
        out = self.to_out[0](torch.matmul(weights, v))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool, device=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, groups, device), ResnetBlock2D(channels, channels, groups, device)]
        )
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, device)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv after padding one pixel on the right and bottom only (as SD's VAE does)."""

    def __init__(self, channels: int, device=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int, device=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool, device=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, device) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, device)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool, device=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, device) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, device)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig, device=None):
        super().__init__()
        ch = config.block_out_channels
        g = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1, device=device)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                ch[max(i - 1, 0)], ch[i], config.layers_per_block, g, downsample=i < len(ch) - 1, device=device
            )
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, config.mid_block_attention, device)
        self.conv_norm_out = _group_norm(ch[-1], g, device)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig, device=None):
        super().__init__()
        rev = tuple(reversed(config.block_out_channels))
        g = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], 3, padding=1, device=device)
        self.mid_block = MidBlock(rev[0], g, config.mid_block_attention, device)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, g, upsample=i < len(rev) - 1, device=device
            )
            for i in range(len(rev))
        )
        self.conv_norm_out = _group_norm(rev[-1], g, device)
        self.conv_out = nn.Conv2d(rev[-1], config.out_channels, 3, padding=1, device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(x in [-1,1]) -> (mean, logvar); decode(z) -> x. z is the *unscaled* latent (diffusers' convention:
    diffusion models see z * scaling_factor)."""

    def __init__(self, config: VAEConfig, device=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, device)
        self.decoder = Decoder(config, device)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1, device=device)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1, device=device)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def sample_latent(
        mean: torch.Tensor, logvar: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=noise_device).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        mean, logvar = self.encode(x)
        return self.decode(self.sample_latent(mean, logvar, generator))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over batch and latent elements."""
    return 0.5 * torch.mean(mean.pow(2) + torch.exp(logvar) - 1.0 - logvar)


def vae_loss(
    model: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, recon_mse, kl) with loss = recon_mse + kl_weight * kl; both terms are per-element means
    (pixels for the reconstruction, latent elements for the KL)."""
    mean, logvar = model.encode(x)
    recon = model.decode(model.sample_latent(mean, logvar, generator))
    recon_mse = F.mse_loss(recon, x)
    kl = kl_divergence(mean, logvar)
    return recon_mse + kl_weight * kl, recon_mse, kl


class VAEDecoderOnly(nn.Module):
    """The package's vae_decoder graph: latent_sample (already divided by scaling_factor) -> sample in ~[-1,1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample)

