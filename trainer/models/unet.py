"""Stable Diffusion U-Net in diffusers' UNet2DConditionModel layout, runnable point by point.

State-dict keys match diffusers, so diffusers checkpoints load unchanged. Besides `forward`, the
model exposes the AFA aggregation points (`points`, `embed_time`, `run_point`): an ensemble runs N
U-Nets point by point and feeds every U-Net the same aggregated tensor, with a shared skip stack.
The blocks it is built from are in trainer.models.unet_blocks.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.unet_blocks import (Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D,
                                        _Block, attention_bias, timestep_embedding)

IntOrInts = Union[int, Tuple[int, ...]]

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
CROSS_ATTN_MID = "UNetMidBlock2DCrossAttn"

# diffusers config keys this implementation does not support, with the value that makes them inert.
_INERT_DIFFUSERS_KEYS: Dict[str, Any] = {
    "only_cross_attention": False,
    "dropout": 0.0,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
}
# Keys whose value only matters together with an unsupported feature.
_IGNORED_DIFFUSERS_KEYS = {"addition_embed_type_num_heads", "addition_time_embed_dim"}


def _is_inert(key: str, value: Any) -> bool:
    neutral = _INERT_DIFFUSERS_KEYS[key]
    if isinstance(value, (list, tuple)):
        return all(_is_inert(key, v) for v in value)
    if key == "mid_block_only_cross_attention" and value is False:
        return True
    if isinstance(neutral, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) == neutral
    return value == neutral


def _per_block(value: Any, n: int, name: str) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


@dataclass
class UNetConfig:
    """UNet2DConditionModel config; field names and defaults are those of diffusers' config.json.

    `attention_head_dim` is diffusers' misnomer: unless `num_attention_heads` is given it is the
    number of heads (SD1.5: 8 heads of 40/80/160 channels; SD2: [5, 10, 20, 20] heads of 64).
    """

    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    mid_block_type: str = CROSS_ATTN_MID
    up_block_types: Tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrInts = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrInts = 1280
    transformer_layers_per_block: IntOrInts = 1
    attention_head_dim: IntOrInts = 8
    num_attention_heads: Optional[IntOrInts] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    class_embed_type: Optional[str] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    time_embedding_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                     "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                     "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        for t in self.down_block_types:
            if t not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise ValueError(f"unsupported down block type {t!r}")
        for t in self.up_block_types:
            if t not in (CROSS_ATTN_UP, PLAIN_UP):
                raise ValueError(f"unsupported up block type {t!r}")
        if self.mid_block_type != CROSS_ATTN_MID:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"unsupported act_fn {self.act_fn!r}")
        if self.downsample_padding not in (0, 1):
            raise ValueError("downsample_padding must be 0 or 1")
        if self.class_embed_type not in (None, "projection"):
            raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r} (None or 'projection')")
        if self.class_embed_type == "projection" and not self.projection_class_embeddings_input_dim:
            raise ValueError("class_embed_type 'projection' needs projection_class_embeddings_input_dim")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("conv_in_kernel and conv_out_kernel must be odd")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
        for c, heads in zip(self.block_out_channels, self.heads_per_block()):
            if c % heads:
                raise ValueError(f"block channels {c} not divisible by {heads} attention heads")
        self.layers_per_block_list()
        self.cross_attention_dims()
        self.transformer_depths()

    # Per-block views (down-path order) of the int-or-list fields.
    def layers_per_block_list(self) -> Tuple[int, ...]:
        return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

    def heads_per_block(self) -> Tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels), "attention heads")

    def cross_attention_dims(self) -> Tuple[int, ...]:
        return _per_block(self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim")

    def transformer_depths(self) -> Tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                          "transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """The Stable Diffusion 1.x U-Net (859,520,964 parameters)."""
        return cls(sample_size=64, cross_attention_dim=768)

    @classmethod
    def tiny(cls, cross_attention_dim: int = 32) -> "UNetConfig":
        """A small SD-shaped U-Net (3 levels, both block kinds) for tests and toy training."""
        return cls(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=(CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN),
            up_block_types=(PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP),
            attention_head_dim=4,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=8,
        )

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "UNetConfig":
        """Reads a diffusers `unet/config.json` dict; raises on features this U-Net lacks."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: Dict[str, Any] = {}
        unsupported = []
        unknown = []
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_DIFFUSERS_KEYS:
                continue
            if key in known:
                kwargs[key] = value
            elif key in _INERT_DIFFUSERS_KEYS:
                if not _is_inert(key, value):
                    unsupported.append(f"{key}={value!r}")
            else:
                unknown.append(key)
        if unsupported:
            raise ValueError("unsupported U-Net config values: " + ", ".join(unsupported))
        if unknown:
            warnings.warn("ignoring unknown U-Net config keys: " + ", ".join(sorted(unknown)))
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """A diffusers-loadable `unet/config.json` dict."""
        out: Dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "num_attention_heads" and value is None:
                continue  # several diffusers versions reject the key outright
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class PointSpec:
    """One AFA aggregation point. See `UNet2DConditionModel.run_point`."""

    name: str          # "conv_in", "down.0.0", "down.0.downsample", "mid", "up.1.2", "out"
    kind: str          # 'conv_in' | 'down' | 'downsample' | 'mid' | 'up' | 'out'
    channels: int      # channels of the tensor produced here (out_channels for 'out')
    downscale: int     # spatial factor relative to the input sample
    pushes_skip: bool  # the caller appends this point's (aggregated) output to `skips`
    pops_skip: bool    # run_point pops one tensor from the end of `skips`


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, channels: int, temb_channels: int, heads: int, context_dim: int, depth: int,
                 config: UNetConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        res = dict(groups=config.norm_num_groups, eps=config.norm_eps,
                   output_scale_factor=config.mid_block_scale_factor, **kw)
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, **res),
                                      ResnetBlock2D(channels, channels, temb_channels, **res)])
        self.attentions = nn.ModuleList([Transformer2DModel(
            channels, heads, context_dim, depth, config.norm_num_groups, config.use_linear_projection,
            config.upcast_attention, **kw)])

    def forward(self, h: Tensor, temb: Tensor, context: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, bias)
        return self.resnets[1](h, temb)


class UNet2DConditionModel(nn.Module):
    """SD U-Net with diffusers' parameter names, plus the AFA point-by-point interface.

    Build SD1.5 without allocating memory with `UNet2DConditionModel(UNetConfig.sd15(), device='meta')`.
    """

    def __init__(self, config: UNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        ch = config.block_out_channels
        n_blocks = len(ch)
        temb_dim = config.time_embed_dim
        layers = config.layers_per_block_list()
        heads = config.heads_per_block()
        context_dims = config.cross_attention_dims()
        depths = config.transformer_depths()
        groups, eps = config.norm_num_groups, config.norm_eps

        def resnet(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(cin, cout, temb_dim, groups, eps, **kw)

        def transformer(c: int, b: int) -> Transformer2DModel:
            return Transformer2DModel(c, heads[b], context_dims[b], depths[b], groups,
                                      config.use_linear_projection, config.upcast_attention, **kw)

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], config.conv_in_kernel,
                                 padding=config.conv_in_kernel // 2, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim, **kw)
        if config.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim, **kw)
        else:
            self.class_embedding = None

        down_blocks = []
        for b, block_type in enumerate(config.down_block_types):
            cin = ch[0] if b == 0 else ch[b - 1]
            cout = ch[b]
            resnets = [resnet(cin if j == 0 else cout, cout) for j in range(layers[b])]
            attentions = ([transformer(cout, b) for _ in range(layers[b])]
                          if block_type == CROSS_ATTN_DOWN else None)
            downsamplers = ([Downsample2D(cout, config.downsample_padding, **kw)]
                            if b < n_blocks - 1 else None)
            down_blocks.append(_Block(resnets, attentions, downsamplers=downsamplers))
        self.down_blocks = nn.ModuleList(down_blocks)

        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb_dim, heads[-1], context_dims[-1], depths[-1],
                                                 config, **kw)

        rev_ch = tuple(reversed(ch))
        rev_layers = tuple(reversed(layers))
        up_blocks = []
        for b, block_type in enumerate(config.up_block_types):
            rb = n_blocks - 1 - b  # the matching down-path level
            prev_out = rev_ch[max(b - 1, 0)]
            cout = rev_ch[b]
            skip_in = rev_ch[min(b + 1, n_blocks - 1)]
            n_layers = rev_layers[b] + 1
            resnets = []
            for j in range(n_layers):
                skip_ch = skip_in if j == n_layers - 1 else cout
                resnets.append(resnet((prev_out if j == 0 else cout) + skip_ch, cout))
            attentions = ([transformer(cout, rb) for _ in range(n_layers)]
                          if block_type == CROSS_ATTN_UP else None)
            upsamplers = [Upsample2D(cout, **kw)] if b < n_blocks - 1 else None
            up_blocks.append(_Block(resnets, attentions, upsamplers=upsamplers))
        self.up_blocks = nn.ModuleList(up_blocks)

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps, **kw)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, config.conv_out_kernel,
                                  padding=config.conv_out_kernel // 2, **kw)

        self.points, self._point_steps = self._build_points()

    def _build_points(self) -> Tuple[List[PointSpec], List[Tuple[str, int, int]]]:
        cfg = self.config
        ch = cfg.block_out_channels
        n_blocks = len(ch)
        layers = cfg.layers_per_block_list()
        points: List[PointSpec] = []
        steps: List[Tuple[str, int, int]] = []

        def add(name: str, kind: str, channels: int, downscale: int, step: Tuple[str, int, int]) -> None:
            push = kind in ("conv_in", "down", "downsample")
            pop = kind in ("up", "out")
            points.append(PointSpec(name, kind, channels, downscale, push, pop))
            steps.append(step)

        add("conv_in", "conv_in", ch[0], 1, ("conv_in", 0, 0))
        for b in range(n_blocks):
            for j in range(layers[b]):
                add(f"down.{b}.{j}", "down", ch[b], 2 ** b, ("down", b, j))
            if b < n_blocks - 1:
                add(f"down.{b}.downsample", "downsample", ch[b], 2 ** (b + 1), ("downsample", b, 0))
        add("mid", "mid", ch[-1], 2 ** (n_blocks - 1), ("mid", 0, 0))
        for b in range(n_blocks):
            n_layers = layers[n_blocks - 1 - b] + 1
            for j in range(n_layers):
                last_of_block = j == n_layers - 1
                if b == n_blocks - 1 and last_of_block:
                    add("out", "out", cfg.out_channels, 1, ("out", b, j))
                    continue
                level = n_blocks - 1 - b
                if last_of_block:
                    level -= 1  # the block's upsampler runs inside its last layer
                add(f"up.{b}.{j}", "up", ch[n_blocks - 1 - b], 2 ** level, ("up", b, j))
        return points, steps

    @property
    def time_embed_dim(self) -> int:
        return self.config.time_embed_dim

    def embed_time(self, timestep: Union[Tensor, int, float], batch: int, dtype: torch.dtype,
                   class_labels: Optional[Tensor] = None) -> Tensor:
        """Time embedding [batch, time_embed_dim]; timestep is [], [1] or [batch], int or float.

        `class_labels` [batch, projection_class_embeddings_input_dim] (e.g. a pooled text embedding)
        is added through `class_embedding` when the config has class_embed_type 'projection'.
        """
        device = self.conv_in.weight.device
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timestep = timestep.to(device).reshape(-1).expand(batch)
        t_proj = timestep_embedding(timestep, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                    self.config.freq_shift)
        emb = self.time_embedding(t_proj.to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this U-Net has a class embedding: pass class_labels")
            emb = emb + self.class_embedding(class_labels.to(dtype))
        return emb

    def run_point(self, i: int, h: Tensor, temb: Tensor, encoder_hidden_states: Tensor, skips: List[Tensor],
                  *, encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
        """Runs the layers of aggregation point i.

        h is the sample for point 0, else the (aggregated) output of point i-1. Up points and 'out'
        pop one tensor from the end of `skips`; after a point with pushes_skip the caller appends
        the (aggregated) output. Upsamplers take the spatial size of the next skip, so odd sizes work.
        """
        kind, b, j = self._point_steps[i]
        bias = attention_bias(encoder_attention_mask, h.dtype)
        if kind == "conv_in":
            if self.config.center_input_sample:
                h = 2 * h - 1.0
            return self.conv_in(h)
        if kind == "down":
            return self.down_blocks[b].layer(j, h, temb, encoder_hidden_states, bias)
        if kind == "downsample":
            return self.down_blocks[b].downsamplers[0](h)
        if kind == "mid":
            return self.mid_block(h, temb, encoder_hidden_states, bias)
        if not skips:
            raise ValueError(f"point {self.points[i].name} needs a skip tensor but `skips` is empty")
        block = self.up_blocks[b]
        h = torch.cat([h, skips.pop()], dim=1)
        h = block.layer(j, h, temb, encoder_hidden_states, bias)
        if kind == "out":
            return self.conv_out(F.silu(self.conv_norm_out(h)))
        if j == len(block.resnets) - 1 and block.upsamplers is not None:
            h = block.upsamplers[0](h, skips[-1].shape[-2:] if skips else None)
        return h

    # No keyword-only arguments: torch 1.13's ONNX export passes defaults positionally.
    def forward(self, sample: Tensor, timestep: Union[Tensor, int, float], encoder_hidden_states: Tensor,
                encoder_attention_mask: Optional[Tensor] = None,
                class_labels: Optional[Tensor] = None) -> Tensor:
        """Noise (or v) prediction [B, out_channels, h, w]; the loop over `points`."""
        temb = self.embed_time(timestep, sample.shape[0], sample.dtype, class_labels)
        skips: List[Tensor] = []
        h = sample
        for i, point in enumerate(self.points):
            h = self.run_point(i, h, temb, encoder_hidden_states, skips,
                               encoder_attention_mask=encoder_attention_mask)
            if point.pushes_skip:
                skips.append(h)
        return h
