"""What an SD1.x single-file checkpoint's U-Net is, read from its LDM tensor names and shapes alone:
the UNetConfig, so that miniature and full-size checkpoints load the same way (EMA-only checkpoints:
trainer.io.ldm_ema gives their LDM names).

Weights do not show every hyperparameter; SD1.x's are assumed for those: 8 attention heads per block,
32 GroupNorm groups, GroupNorm eps 1e-5, downsampling convolutions with padding 1. Everything else
(channels, levels, layers, attention placement, transformer depth, text width, projections, kernel
sizes, time-embedding width) comes from the shapes, and the result is checked against every tensor.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

from trainer.io.sd_checkpoint import diffusers_to_ldm_unet_state_dict
from trainer.models.unet import (CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel,
                                 UNetConfig)

SD1_HEADS = 8
SD1_NORM_GROUPS = 32


def _shape(state: Mapping[str, object], key: str) -> Tuple[int, ...]:
    return tuple(int(d) for d in state[key].shape)  # type: ignore[attr-defined]


def _depth(state: Mapping[str, object], prefix: str) -> int:
    blocks = [int(m.group(1)) for m in (re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k)
                                        for k in state) if m]
    return 1 + max(blocks) if blocks else 0


def infer_unet_config(state: Mapping[str, object], sample_size: Optional[int] = None) -> UNetConfig:
    """A UNetConfig from LDM U-Net names (no `model.diffusion_model.` prefix) and shapes.

    `state` maps names to anything with a `.shape` (tensors, meta tensors, safetensors header entries).
    Raises ValueError when the tensors are no SD-style U-Net.
    """
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        raise ValueError("not an SD U-Net: input_blocks.0.0.weight or out.2.weight is missing")
    c0, in_channels, k_in, _ = _shape(state, "input_blocks.0.0.weight")
    out_channels, _, k_out, _ = _shape(state, "out.2.weight")
    temb = _shape(state, "time_embed.0.weight")[0]
    channels: List[int] = []
    layers: List[int] = []
    attention: List[bool] = []
    depths: List[int] = []
    context_dims: List[int] = []
    linear: List[bool] = []
    level_layers = 0
    index = 1
    while any(k.startswith(f"input_blocks.{index}.") for k in state):
        if f"input_blocks.{index}.0.op.weight" in state:
            layers.append(level_layers)
            level_layers = 0
        else:
            out_c = _shape(state, f"input_blocks.{index}.0.in_layers.2.weight")[0]
            if level_layers == 0:
                channels.append(out_c)
                attn = f"input_blocks.{index}.1."
                has_attention = any(k.startswith(attn) for k in state)
                attention.append(has_attention)
                if has_attention:
                    depths.append(_depth(state, attn))
                    context_dims.append(_shape(state, attn + "transformer_blocks.0.attn2.to_k.weight")[1])
                    linear.append(len(_shape(state, attn + "proj_in.weight")) == 2)
            level_layers += 1
        index += 1
    layers.append(level_layers)
    if not channels or len(layers) != len(channels):
        raise ValueError("not an SD U-Net: cannot read its levels from input_blocks")
    mid = "middle_block.1."
    if not any(k.startswith(mid) for k in state):
        raise ValueError("not an SD1.x U-Net: its middle block has no attention")
    context_dims.append(_shape(state, mid + "transformer_blocks.0.attn2.to_k.weight")[1])
    linear.append(len(_shape(state, mid + "proj_in.weight")) == 2)
    if len(set(context_dims)) != 1 or len(set(linear)) != 1:
        raise ValueError(f"U-Net blocks attend to text of different widths {sorted(set(context_dims))} "
                         f"or mix projection kinds")
    level_depths = iter(depths)
    per_level = tuple(next(level_depths) if a else _depth(state, mid) for a in attention)  # plain levels: any
    depth = per_level[0] if len(set(per_level)) == 1 else per_level
    config = UNetConfig(
        sample_size=sample_size,
        in_channels=in_channels, out_channels=out_channels,
        down_block_types=tuple(CROSS_ATTN_DOWN if a else PLAIN_DOWN for a in attention),
        up_block_types=tuple(CROSS_ATTN_UP if a else PLAIN_UP for a in reversed(attention)),
        block_out_channels=tuple(channels),
        layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
        cross_attention_dim=context_dims[0],
        transformer_layers_per_block=depth,
        attention_head_dim=SD1_HEADS,
        use_linear_projection=linear[0],
        norm_num_groups=SD1_NORM_GROUPS,
        time_embedding_dim=None if temb == 4 * c0 else temb,
        conv_in_kernel=k_in, conv_out_kernel=k_out,
    )
    return config


def ldm_unet_shapes(config: UNetConfig) -> Dict[str, Tuple[int, ...]]:
    """Every LDM U-Net name (no prefix) of this config with its shape; costs no memory (meta device)."""
    model = UNet2DConditionModel(config, device="meta")
    ldm = diffusers_to_ldm_unet_state_dict(model.state_dict(), config)
    return {k: tuple(int(d) for d in v.shape) for k, v in ldm.items()}


def check_ldm_unet(state: Mapping[str, object], config: UNetConfig) -> None:
    """Raises ValueError unless `state` has exactly the LDM tensors of `config` with their shapes."""
    expected = ldm_unet_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and _shape(state, k) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{what} {len(keys)} tensor(s), e.g. {', '.join(keys[:3])}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if keys]
        raise ValueError("the U-Net is not an SD1.x U-Net of any shape this importer reads: " + "; ".join(parts))
