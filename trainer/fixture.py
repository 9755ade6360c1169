"""Builds the tiny fixture package `test/fixtures/tiny/` and its reference outputs.

    python3 -m trainer.fixture [--out test/fixtures/tiny]

Random weights (fixed seeds), a BPE tokenizer trained on shape captions, a text encoder, a VAE
decoder (4 latent channels, downsampling 4), experts `alpha` and `beta` (same U-Net config),
their fused AFA graph `duo` (subsets, non-zero SABW logit weights so the contribution maps vary),
and `odd` (another U-Net config, timestep int64, in no ensemble). `reference/` holds what
trainer/sampler.py makes of a few requests; the engine's parity tests replay them.
The format of reference/cases.json is described in docs/model-package.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from trainer.afa import AFAEnsemble
from trainer.bpe import CLIPTokenizer, train_bpe
from trainer.export import EnsembleSpec, save_package
from trainer.sampler import decode_latents, make_scheduler, sample
from trainer.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.unet import (CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel,
                          UNetConfig)
from trainer.vae import AutoencoderKL, VAEConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "test", "fixtures", "tiny")
SEED = 20240611
VOCAB_SIZE = 600
TEXT_DIM = 32
MAX_BYTES = 3 * 1024 * 1024
REFERENCE_FORMAT = "ensemble-diffusion-reference"

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "rescale_betas_zero_snr": False,
}

MANIFEST_FIELDS = {
    "name": "tiny",
    "version": "1.0.0",
    "description": "Random-weight fixture package for engine tests (python3 -m trainer.fixture).",
    "defaults": {"steps": 8, "guidance": 5.0, "scheduler": "ddim", "width": 32, "height": 32},
    "size": {"min": 16, "max": 64},
    "limits": {"max_steps": 50, "max_count": 4},
    "display": {"width": 128, "height": 128},
    "experts": {
        "alpha": {"title": "Alpha", "description": "random expert A"},
        "beta": {"title": "Beta", "description": "random expert B (same architecture as alpha)"},
        "odd": {"title": "Odd", "description": "another U-Net architecture; timestep int64"},
    },
}

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "ring", "square", "diamond", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
BACKGROUNDS = ("white", "black", "gray")

# The requests replayed by the engine's parity tests (fields as in src/engine/api.ts GenerateRequest).
CASES: List[Dict[str, Any]] = [
    {"name": "single_ddim", "mode": "single", "experts": ["alpha"], "prompt": "a red circle on the left",
     "seed": 42, "scheduler": "ddim"},
    {"name": "afa_ddim", "mode": "afa", "ensemble": "duo", "prompt": "a large blue square at the top",
     "seed": 7, "scheduler": "ddim", "contributions": True},
    {"name": "afa_euler", "mode": "afa", "ensemble": "duo", "prompt": "a small green star in the center",
     "seed": 123, "scheduler": "euler", "contributions": True, "width": 40, "height": 24},
    {"name": "single_no_cfg", "mode": "single", "experts": ["alpha"], "prompt": "a yellow ring at the bottom",
     "seed": 42, "scheduler": "ddim", "guidance": 1.0},
    {"name": "single_count2", "mode": "single", "experts": ["beta"], "prompt": "a purple diamond",
     "seed": 1000, "scheduler": "ddim", "count": 2},
    {"name": "single_negative", "mode": "single", "experts": ["alpha"], "prompt": "a red circle on the left",
     "negative": "black background", "seed": 42, "scheduler": "ddim"},
    {"name": "afa_subset_beta", "mode": "afa", "ensemble": "duo", "experts": ["beta"],
     "prompt": "an orange triangle on the right", "seed": 5, "scheduler": "ddim", "contributions": True},
    {"name": "odd_int64_timestep", "mode": "single", "experts": ["odd"], "prompt": "a large gray ring",
     "seed": 3, "scheduler": "euler", "width": 24, "height": 40},
]


def captions() -> List[str]:
    """The tokenizer's corpus: every colour/shape/size/position/background combination."""
    out = []
    for colour, shape, size, position, background in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS,
                                                                       BACKGROUNDS):
        out.append(f"a {size} {colour} {shape} {position}, {background} background")
    return out


def expert_config() -> UNetConfig:
    """alpha and beta: two levels, attention on the first."""
    return UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
                      attention_head_dim=2, cross_attention_dim=TEXT_DIM, norm_num_groups=4)


def odd_config() -> UNetConfig:
    """odd: three levels, attention on the deeper two (another point structure)."""
    return UNetConfig(sample_size=8, block_out_channels=(8, 8, 16), layers_per_block=1,
                      down_block_types=(PLAIN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN),
                      up_block_types=(CROSS_ATTN_UP, CROSS_ATTN_UP, PLAIN_UP),
                      attention_head_dim=2, cross_attention_dim=TEXT_DIM, norm_num_groups=4)


@torch.no_grad()
def _scale_output(module: nn.Module, conv: nn.Conv2d, run, target_std: float) -> None:
    """Rescales `conv` (the last layer) so that run(module) has about target_std."""
    std = float(run(module).std())
    conv.weight.mul_(target_std / std)
    conv.bias.mul_(target_std / std)


def build_models(tokenizer: CLIPTokenizer):
    torch.manual_seed(SEED)
    text_config = TextEncoderConfig.tiny(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, mask_padding=True)
    text_encoder = CLIPTextEncoder(text_config).eval()
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16, 16), norm_num_groups=4)).eval()
    probe = torch.Generator().manual_seed(SEED)
    latents = torch.randn(2, 4, 8, 8, generator=probe) * 3.0
    # images mostly inside [-1, 1] so that clipping leaves something to compare
    _scale_output(vae, vae.decoder.conv_out, lambda m: m.decode(latents), 0.5)

    sample_probe = torch.randn(2, 4, 8, 8, generator=probe)
    text_probe = text_encoder(tokenizer(["a red circle", ""]))[0]
    t_probe = torch.tensor([981.0, 1.0])
    experts: Dict[str, UNet2DConditionModel] = {}
    for k, (eid, config) in enumerate((("alpha", expert_config()), ("beta", expert_config()),
                                       ("odd", odd_config()))):
        torch.manual_seed(SEED + 1 + k)
        unet = UNet2DConditionModel(config).eval()
        # an ε-prediction of unit scale, like a trained model's
        _scale_output(unet, unet.conv_out, lambda m: m(sample_probe, t_probe, text_probe), 1.0)
        experts[eid] = unet

    torch.manual_seed(SEED + 10)
    duo = AFAEnsemble([experts["alpha"], experts["beta"]], hidden=8, depth=1, heads=2, head_dim=4).eval()
    for sabw in duo.aggregators:
        # zero-initialised logits would make every contribution map uniform
        nn.init.normal_(sabw.to_logits.weight, std=0.5)
        nn.init.normal_(sabw.to_logits.bias, std=0.5)
    return text_encoder, vae, experts, duo


def _resolve_request(case: Dict[str, Any]) -> Dict[str, Any]:
    defaults = MANIFEST_FIELDS["defaults"]
    request = {
        "mode": case["mode"],
        "prompt": case["prompt"],
        "negative": case.get("negative", ""),
        "seed": case["seed"],
        "steps": case.get("steps", defaults["steps"]),
        "guidance": case.get("guidance", defaults["guidance"]),
        "scheduler": case.get("scheduler", defaults["scheduler"]),
        "width": case.get("width", defaults["width"]),
        "height": case.get("height", defaults["height"]),
        "count": case.get("count", 1),
        "contributions": case.get("contributions", False),
    }
    if "ensemble" in case:
        request["ensemble"] = case["ensemble"]
    if "experts" in case:
        request["experts"] = list(case["experts"])
    return request


def _write_f32(path: str, tensor: torch.Tensor) -> None:
    with open(path, "wb") as f:
        f.write(tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())


@torch.no_grad()
def write_reference(out_dir: str, tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, vae: AutoencoderKL,
                    experts: Dict[str, UNet2DConditionModel], ensembles: Dict[str, EnsembleSpec],
                    cases: Sequence[Dict[str, Any]] = CASES) -> Dict[str, Any]:
    ref_dir = os.path.join(out_dir, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    downsample = vae.config.downsample_factor
    scale_factor = vae.config.scaling_factor
    entries = []
    for case in cases:
        req = _resolve_request(case)
        name = case["name"]
        count = req["count"]
        cond_ids = tokenizer([req["prompt"]] * count)
        uncond_ids = tokenizer([req["negative"]] * count)
        cond = text_encoder(cond_ids)[0]
        uncond = text_encoder(uncond_ids)[0]
        latent_shape = (count, vae.config.latent_channels, req["height"] // downsample, req["width"] // downsample)
        if req["mode"] == "afa":
            spec = ensembles[req["ensemble"]]
            members = req.get("experts", spec.experts)
            mask = torch.tensor([1.0 if e in members else 0.0 for e in spec.experts])
            n = len(spec.experts)
            cond, uncond = cond.expand(n, -1, -1, -1), uncond.expand(n, -1, -1, -1)

            def denoiser(x, t, text, ensemble=spec.ensemble, mask=mask):
                return ensemble(x, t, text, mask)

            map_experts = list(spec.experts)
        elif req["mode"] == "single":
            (eid,) = req["experts"]
            unet = experts[eid]
            # `odd` is exported with timestep int64 [B]: it sees whole timesteps (truncated, as numpy's
            # astype in Optimum's pipeline and the engine do), as its graph does
            int64 = eid == "odd"

            def denoiser(x, t, text, unet=unet, int64=int64):
                return unet(x, t.long() if int64 else t, text)

            map_experts = None
        else:
            raise ValueError(f"case {name}: unsupported mode {req['mode']!r}")
        result = sample(denoiser, cond, uncond, latent_shape=latent_shape, seed=req["seed"], steps=req["steps"],
                        guidance=req["guidance"], scheduler=req["scheduler"], scheduler_config=SCHEDULER_CONFIG)
        images = decode_latents(lambda z: vae.decode(z), result.latents, scale_factor)
        latents_file = f"{name}.latents.f32"
        _write_f32(os.path.join(ref_dir, latents_file), result.latents)
        image_entries = []
        for i in range(count):
            image_file = f"{name}.{i}.rgb"
            with open(os.path.join(ref_dir, image_file), "wb") as f:
                f.write(images[i].numpy().tobytes())
            entry: Dict[str, Any] = {"seed": req["seed"] + i, "file": image_file,
                                     "width": req["width"], "height": req["height"]}
            if result.contributions is not None and map_experts is not None:
                maps_file = f"{name}.{i}.contributions.f32"
                _write_f32(os.path.join(ref_dir, maps_file), result.contributions[i])
                entry["contributions"] = {"file": maps_file, "experts": map_experts,
                                          "dims": list(result.contributions[i].shape)}
            image_entries.append(entry)
        sched = make_scheduler(req["scheduler"], SCHEDULER_CONFIG, req["steps"])
        entries.append({
            "name": name,
            "request": req,
            "input_ids": {"prompt": cond_ids[0].tolist(), "negative": uncond_ids[0].tolist()},
            "timesteps": [float(t) for t in sched.timesteps],
            "init_noise_sigma": float(sched.init_noise_sigma),
            "latents": {"file": latents_file, "dims": list(result.latents.shape)},
            "images": image_entries,
        })
    cases_json = {
        "format": REFERENCE_FORMAT,
        "format_version": 1,
        "generator": "python3 -m trainer.fixture",
        "scale_factor": scale_factor,
        "cases": entries,
    }
    with open(os.path.join(ref_dir, "cases.json"), "w", encoding="utf-8") as f:
        f.write(_json_text(cases_json))
    return cases_json


def _json_text(data: Any) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(data, indent=2)
    number_list = re.compile(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]")
    return number_list.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def package_bytes(out_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(out_dir) for f in files)


def build(out_dir: str = DEFAULT_OUT, check="auto", log=print) -> Dict[str, Any]:
    """(Re)writes the whole fixture package into out_dir; returns its manifest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tok_dir:
            train_bpe(captions(), VOCAB_SIZE, tok_dir)
            tokenizer = CLIPTokenizer.from_dir(tok_dir)
            text_encoder, vae, experts, duo = build_models(tokenizer)
            ensembles = {"duo": EnsembleSpec(duo, ["alpha", "beta"], subsets=True, title="Duo (AFA)",
                                             description="alpha + beta fused by SABW")}
            result = save_package(out_dir, tok_dir, text_encoder, vae, experts, ensembles, SCHEDULER_CONFIG,
                                  MANIFEST_FIELDS, timestep_int64=["odd"], check=check, compact=True, log=log)
        write_reference(out_dir, tokenizer, text_encoder, vae, experts, ensembles)
        # graphs and raw tensors must never be diffed or line-ending converted
        with open(os.path.join(out_dir, ".gitattributes"), "w", encoding="utf-8") as f:
            f.write("*.onnx binary\n*.rgb binary\n*.f32 binary\n")
    finally:
        torch.set_num_threads(threads)
    size = package_bytes(out_dir)
    if size > MAX_BYTES:
        raise RuntimeError(f"the fixture is {size} bytes, over the {MAX_BYTES} byte budget")
    if log:
        log(f"wrote {out_dir} ({size / 1e6:.2f} MB)")
    return result.manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the tiny fixture model package and its references.")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"package folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity checks")
    args = parser.parse_args(argv)
    build(args.out, check=False if args.no_check else "auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
