"""The EMA copy of an LDM U-Net: LitEma stores `model_ema.` + the name after `model.` with its dots
removed (`model_ema.diffusion_modelinput_blocks00weight`); these map such names back to LDM names,
so that EMA-only checkpoints load like the others."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional

from torch import Tensor

EMA_PREFIX = "model_ema."
EMA_UNET_PREFIX = EMA_PREFIX + "diffusion_model"
LDM_UNET_PREFIX = "model.diffusion_model."


def _rest_patterns(max_depth: int = 32) -> Dict[str, str]:
    """Dotless → dotted for every sub-module tensor name below a block index."""
    leaves = ("weight", "bias")
    dotted: List[str] = list(leaves)  # input_blocks.0.0 (conv_in) holds its tensors directly
    for mod in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3", "skip_connection",
                "op", "conv", "norm", "proj_in", "proj_out"):
        dotted += [f"{mod}.{leaf}" for leaf in leaves]
    for k in range(max_depth):
        t = f"transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            dotted += [f"{t}.{attn}.to_q.weight", f"{t}.{attn}.to_k.weight", f"{t}.{attn}.to_v.weight"]
            dotted += [f"{t}.{attn}.to_out.0.{leaf}" for leaf in leaves]
        for mod in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            dotted += [f"{t}.{mod}.{leaf}" for leaf in leaves]
    return {d.replace(".", ""): d for d in dotted}


_RESTS = _rest_patterns()


def ema_name_to_ldm(name: str) -> Optional[str]:
    """`model_ema.diffusion_modelinput_blocks11transformer_blocks0attn1to_kweight` →
    `input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight`; None for other names (decay, num_updates).

    A block's sub-module index is one digit (≤ 3 sub-modules), so `input_blocks110…` is block 11, part 0.
    """
    if not name.startswith(EMA_UNET_PREFIX):
        return None
    s = name[len(EMA_UNET_PREFIX):]
    m = re.match(r"^(time_embed|out)(\d)(weight|bias)$", s)
    if m:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.match(r"^label_emb0(\d)(weight|bias)$", s)
    if m:
        return f"label_emb.0.{m.group(1)}.{m.group(2)}"
    m = re.match(r"^(input_blocks|output_blocks)(\d+)(\d)([a-z_].*)$", s) or \
        re.match(r"^(middle_block)()(\d)([a-z_].*)$", s)
    if not m or m.group(4) not in _RESTS:
        return None
    block, i, j, rest = m.groups()
    return ".".join(p for p in (block, i, j, _RESTS[rest]) if p)


def ema_unet_names(names: Iterable[str]) -> Dict[str, str]:
    """LDM name (no prefix) → the EMA tensor's name in the checkpoint, for every EMA U-Net tensor."""
    out: Dict[str, str] = {}
    for name in names:
        ldm = ema_name_to_ldm(name)
        if ldm is not None:
            out[ldm] = name
    return out


def ldm_unet_from_state(checkpoint: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Convenience for in-memory checkpoints: the U-Net under `model.diffusion_model.`, else its EMA copy."""
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    if unet:
        return unet
    return {ldm: checkpoint[name] for ldm, name in ema_unet_names(checkpoint).items()}
