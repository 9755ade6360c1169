"""The building blocks of the SD U-Net, with diffusers' module and parameter names: time embedding,
ResNet blocks, (cross-)attention and transformer blocks, down/upsamplers, and the block container.

Attention is plain matmul/softmax so the graph exports to ONNX opset 17 on torch 1.13 and 2.x.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def timestep_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """diffusers' sinusoidal projection (get_timestep_embedding), in float32."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(out_dim, out_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels, **kw)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, **kw)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1, **kw)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


def attention_bias(encoder_attention_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """[B, M] keep-mask (1 keep, 0 ignore) → additive bias [B, 1, 1, M], as diffusers does."""
    if encoder_attention_mask is None:
        return None
    return ((1.0 - encoder_attention_mask.to(dtype)) * -10000.0)[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None,
                 upcast: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False, **kw)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, **kw), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q = self.to_q(x).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(context).reshape(b, -1, self.heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.to_v(context).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        if self.upcast:
            q, k = q.float(), k.float()
        scores = torch.matmul(q * self.scale, k)  # [B, heads, N, M]
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, device=None, dtype=None):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner, device=device, dtype=dtype), nn.Dropout(0.0),
                                  nn.Linear(inner, dim, device=device, dtype=dtype)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast, **kw)
        self.norm3 = nn.LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, **kw)

    def forward(self, x: Tensor, context: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, bias) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int,
                 use_linear_projection: bool, upcast: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        head_dim = channels // heads
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, **kw)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, channels, **kw)
            self.proj_out = nn.Linear(channels, channels, **kw)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1, **kw)
            self.proj_out = nn.Conv2d(channels, channels, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, head_dim, context_dim, upcast, **kw) for _ in range(depth)])

    def forward(self, x: Tensor, context: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, c)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(b, height, width, c).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int, device=None, dtype=None):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))


class _Block(nn.Module):
    """A down or up block: resnets, optional attentions, optional down/upsampler."""

    def __init__(self, resnets: List[ResnetBlock2D], attentions: Optional[List[Transformer2DModel]],
                 downsamplers: Optional[List[nn.Module]] = None, upsamplers: Optional[List[nn.Module]] = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.downsamplers = nn.ModuleList(downsamplers) if downsamplers is not None else None
        self.upsamplers = nn.ModuleList(upsamplers) if upsamplers is not None else None

    def layer(self, j: int, h: Tensor, temb: Tensor, context: Tensor, bias: Optional[Tensor]) -> Tensor:
        h = self.resnets[j](h, temb)
        if self.attentions is not None:
            h = self.attentions[j](h, context, bias)
        return h
