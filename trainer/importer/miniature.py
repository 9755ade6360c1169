"""Miniature SD1.x checkpoints for tests: the real LDM/A1111 and diffusers layouts and key names, a
tiny config (U-Net 32/64 channels, 2 levels; CLIP 32 wide with SD1.x's 49,408-token vocabulary; VAE
32 channels, 3 levels, downsampling 4), random weights from fixed seeds.

    python3 -m trainer.importer.miniature OUT_DIR [--errors]

writes the set the import tests use (see `write_set`); --errors adds the bad inputs (SDXL, SD2.x,
truncated, pickled).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.io.safetensors import save_safetensors
from trainer.io.sd_checkpoint import LDM_UNET_PREFIX, diffusers_to_ldm_unet_state_dict, save_diffusers_unet
from trainer.io.sd_text_encoder import hf_to_ldm_text_encoder_state_dict
from trainer.io.sd_vae import LDM_VAE_PREFIX, diffusers_to_ldm_vae_state_dict
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL, VAEConfig

UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN),
                  up_block_types=(PLAIN_UP, CROSS_ATTN_UP), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=32)
CLIP = TextEncoderConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=1,
                         intermediate_size=64)
VAE = VAEConfig(block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=32)


def _seeded(module: nn.Module, seed: int, scale: float = 0.0) -> nn.Module:
    """Default init under a fixed seed; scale > 0 adds noise so biases and norms are not all 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if scale:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def make_unet(seed: int, config: UNetConfig = UNET) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return _seeded(UNet2DConditionModel(config), seed, 0.02)


def make_clip(seed: int, config: TextEncoderConfig = CLIP) -> CLIPTextEncoder:
    torch.manual_seed(seed)
    return _seeded(CLIPTextEncoder(config), seed, 0.02)


def make_vae(seed: int, config: VAEConfig = VAE) -> AutoencoderKL:
    torch.manual_seed(seed)
    return _seeded(AutoencoderKL(config), seed, 0.02)


def ldm_checkpoint(unet: UNet2DConditionModel, clip: Optional[CLIPTextEncoder], vae: Optional[AutoencoderKL],
                   dtype: torch.dtype = torch.float32, ema_only: bool = False) -> Dict[str, Tensor]:
    """One single-file state dict in the LDM layout; ema_only keeps the U-Net only as LitEma's copy."""
    out: Dict[str, Tensor] = {}
    for k, v in diffusers_to_ldm_unet_state_dict(unet.state_dict(), unet.config).items():
        if ema_only:
            out["model_ema." + ("diffusion_model." + k).replace(".", "")] = v
        else:
            out[LDM_UNET_PREFIX + k] = v
    if ema_only:
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    if clip is not None:
        out.update(hf_to_ldm_text_encoder_state_dict(clip.state_dict()))
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if vae is not None:
        out.update({LDM_VAE_PREFIX + k: v for k, v in diffusers_to_ldm_vae_state_dict(vae.state_dict()).items()})
    out["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return {k: (v.to(dtype) if v.is_floating_point() and k != "alphas_cumprod" else v).contiguous()
            for k, v in out.items()}


def write_single_file(path: str, state: Dict[str, Tensor]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_safetensors(state, path, metadata={"format": "pt"})
    return path


def write_diffusers(folder: str, unet: UNet2DConditionModel, clip: CLIPTextEncoder, vae: AutoencoderKL) -> str:
    """A diffusers pipeline folder: model_index.json, unet/, text_encoder/ (HF names), vae/."""
    save_diffusers_unet(unet, os.path.join(folder, "unet"))
    te = os.path.join(folder, "text_encoder")
    os.makedirs(te, exist_ok=True)
    save_safetensors(dict(clip.state_dict()), os.path.join(te, "model.safetensors"), metadata={"format": "pt"})
    c = clip.config
    _json(os.path.join(te, "config.json"), {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
    vd = os.path.join(folder, "vae")
    os.makedirs(vd, exist_ok=True)
    save_safetensors(dict(vae.state_dict()), os.path.join(vd, "diffusion_pytorch_model.safetensors"))
    _json(os.path.join(vd, "config.json"), vae.config.diffusers_config())
    _json(os.path.join(folder, "model_index.json"), {"_class_name": "StableDiffusionPipeline",
                                                     "unet": ["diffusers", "UNet2DConditionModel"]})
    return folder


def _json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# The set the import tests use: four single files and a diffusers folder; all but `retrained` share
# one CLIP (stored in fp16 by `alpha`, in fp32 by the others), `retrained` has its own.
SET = {
    "alpha.safetensors": dict(unet=1, clip=100, dtype=torch.float16),
    "beta_fp32.safetensors": dict(unet=2, clip=100, dtype=torch.float32),
    "gamma-pruned-emaonly.safetensors": dict(unet=3, clip=100, dtype=torch.float16, ema_only=True),
    "retrained.safetensors": dict(unet=4, clip=101, dtype=torch.float16),
    "delta": dict(unet=5, clip=100, diffusers=True),
}
VAE_SEED = 200


def write_set(folder: str, names: Sequence[str] = tuple(SET)) -> Dict[str, str]:
    """Writes the chosen members of SET into folder; returns name → path."""
    vae = make_vae(VAE_SEED)
    clips: Dict[int, CLIPTextEncoder] = {}
    paths = {}
    for name in names:
        spec = SET[name]
        clip = clips.setdefault(spec["clip"], make_clip(spec["clip"]))
        unet = make_unet(spec["unet"])
        path = os.path.join(folder, name)
        if spec.get("diffusers"):
            paths[name] = write_diffusers(path, unet, clip, vae)
        else:
            paths[name] = write_single_file(path, ldm_checkpoint(unet, clip, vae, spec["dtype"],
                                                                 spec.get("ema_only", False)))
    return paths


def write_bad_inputs(folder: str) -> Dict[str, str]:
    """Inputs the importer must refuse: SDXL and SD2.x key sets, a truncated file, a pickled .ckpt, and
    another `alpha.safetensors` (no VAE), whose id clashes with the set's."""
    os.makedirs(folder, exist_ok=True)
    unet = make_unet(1)
    good = ldm_checkpoint(unet, make_clip(100), make_vae(VAE_SEED))
    paths = {}
    sdxl = {k: v for k, v in good.items() if not k.startswith("cond_stage_model.")}
    sdxl["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    sdxl[LDM_UNET_PREFIX + "label_emb.0.0.weight"] = torch.zeros(4, 4)
    paths["sdxl"] = write_single_file(os.path.join(folder, "sdxl.safetensors"), sdxl)
    sd2 = {k: v for k, v in good.items() if not k.startswith("cond_stage_model.")}
    sd2["cond_stage_model.model.token_embedding.weight"] = torch.zeros(8, 4)
    paths["sd2"] = write_single_file(os.path.join(folder, "sd2.safetensors"), sd2)
    full = write_single_file(os.path.join(folder, "truncated.safetensors"), good)
    with open(full, "r+b") as f:
        f.truncate(os.path.getsize(full) - 1000)
    paths["truncated"] = full
    paths["duplicate"] = write_single_file(os.path.join(folder, "alpha.safetensors"),
                                           ldm_checkpoint(make_unet(6), make_clip(100), None, torch.float16))
    paths["pickle"] = os.path.join(folder, "pickled.ckpt")
    torch.save({"state_dict": good}, paths["pickle"])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write miniature SD1.x checkpoints (tests).")
    parser.add_argument("out")
    parser.add_argument("--only", help="comma-separated members of the set (default: all)")
    parser.add_argument("--errors", action="store_true", help="also write bad inputs under OUT/bad/")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SET)
    paths = write_set(args.out, names)
    if args.errors:
        paths.update(write_bad_inputs(os.path.join(args.out, "bad")))
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
