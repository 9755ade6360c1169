"""The CLIP text encoder of SD1.x single-file checkpoints (LDM/A1111 layout) and of diffusers folders,
mapped onto trainer.models.text_encoder (Hugging Face CLIPTextModel names).

In an LDM checkpoint the text encoder is a transformers CLIPTextModel stored under
`cond_stage_model.transformer.`: `cond_stage_model.transformer.text_model.encoder.layers.0…` (or, from
transformers before 4.x, without the `text_model.` level). Weights do not show every hyperparameter:
the number of heads is taken as hidden_size / 64 (every CLIP text tower has 64-wide heads: ViT-L/14
768/12), the activation as quick_gelu and EOS = pad = 49407 (SD1.x's tokenizer); the rest comes from
the tensor shapes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, Mapping, Optional

from torch import Tensor

from trainer.io.safetensors import PathLike, load_state_dict_file
from trainer.models.text_encoder import HF_POSITION_IDS_KEY, CLIPTextEncoder, TextEncoderConfig

LDM_TEXT_PREFIX = "cond_stage_model.transformer."
HF_PREFIX = "text_model."
CLIP_HEAD_WIDTH = 64
SD1_EOS = 49407
# SD2.x keeps an OpenCLIP model here instead (the other layout is refused by name).
OPEN_CLIP_PREFIX = "cond_stage_model.model."


def extract_ldm_text_encoder(checkpoint: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The text encoder's tensors of a single-file checkpoint, in Hugging Face CLIPTextModel names
    (`text_model.…`); empty when the file has none. The legacy position_ids buffer is dropped."""
    return {hf: checkpoint[name] for hf, name in ldm_text_encoder_names(checkpoint).items()}


def ldm_text_encoder_names(names: Iterable[str]) -> Dict[str, str]:
    """Hugging Face name → the checkpoint's name, for the text encoder's tensors among `names`."""
    out: Dict[str, str] = {}
    for key in names:
        if not key.startswith(LDM_TEXT_PREFIX):
            continue
        rest = key[len(LDM_TEXT_PREFIX):]
        if not rest.startswith(HF_PREFIX):
            rest = HF_PREFIX + rest  # transformers 3.x names: embeddings.…, encoder.…, final_layer_norm.…
        if rest != HF_POSITION_IDS_KEY:
            out[rest] = key
    return out


def hf_to_ldm_text_encoder_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Hugging Face CLIPTextModel names → the single-file checkpoint's names (with the prefix)."""
    return {LDM_TEXT_PREFIX + k: v for k, v in state_dict.items() if k != HF_POSITION_IDS_KEY}


_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def infer_text_encoder_config(state_dict: Mapping[str, Tensor]) -> TextEncoderConfig:
    """A TextEncoderConfig from the shapes of a CLIPTextModel state dict (HF names; tensors or meta)."""
    try:
        vocab, hidden = state_dict["text_model.embeddings.token_embedding.weight"].shape
        positions = state_dict["text_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a CLIP text encoder: tensor {e.args[0]!r} is missing") from None
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, state_dict) if m)
    heads = max(1, hidden // CLIP_HEAD_WIDTH) if hidden % CLIP_HEAD_WIDTH == 0 or hidden < CLIP_HEAD_WIDTH else None
    if heads is None or hidden % heads:
        raise ValueError(f"text encoder width {hidden} is not a multiple of CLIP's {CLIP_HEAD_WIDTH}-wide heads")
    return TextEncoderConfig(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=int(intermediate),
                             max_position_embeddings=int(positions), eos_token_id=SD1_EOS, pad_token_id=SD1_EOS)


def text_encoder_from_state_dict(state_dict: Mapping[str, Tensor],
                                 config: Optional[TextEncoderConfig] = None) -> CLIPTextEncoder:
    """A float32 CLIPTextEncoder in eval mode holding these weights (HF names)."""
    config = config or infer_text_encoder_config(state_dict)
    model = CLIPTextEncoder(config)
    model.load_hf_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def config_from_hf(config: Mapping) -> TextEncoderConfig:
    """A TextEncoderConfig from a transformers CLIPTextConfig dict (a diffusers `text_encoder/config.json`).

    SD1.x's config says eos_token_id 2 (a transformers default that its CLIPTextModel ignored): EOS and
    pad are the tokenizer's 49407 whatever it says."""
    fields = {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "hidden_act",
                                     "layer_norm_eps") if k in config}
    return TextEncoderConfig(**fields, eos_token_id=SD1_EOS, pad_token_id=SD1_EOS)


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")


def diffusers_text_encoder_files(folder: PathLike) -> list:
    """The weight file(s) of a diffusers `text_encoder/` folder (single or sharded)."""
    folder = str(folder)
    for name in _HF_WEIGHT_FILES:
        single = os.path.join(folder, name)
        if os.path.isfile(single):
            return [single]
        index = single + ".index.json"
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    raise FileNotFoundError(f"{folder}: no {' / '.join(_HF_WEIGHT_FILES[:2])} (or a sharded index)")


def load_diffusers_text_encoder(folder: PathLike) -> CLIPTextEncoder:
    """The text encoder of a diffusers `text_encoder/` folder (config.json + weights), float32, eval."""
    with open(os.path.join(str(folder), "config.json"), encoding="utf-8") as f:
        config = config_from_hf(json.load(f))
    state: Dict[str, Tensor] = {}
    for path in diffusers_text_encoder_files(folder):
        state.update(load_state_dict_file(path))
    state = {k if k.startswith(HF_PREFIX) else HF_PREFIX + k: v for k, v in state.items()}
    state.pop(HF_POSITION_IDS_KEY, None)
    return text_encoder_from_state_dict(state, config)
