"""The demo model zoo's recipe: model sizes and hyperparameters of every build stage, per device.

`recipe(device, smoke)` returns plain dicts (they are written into the build log as they are).
Minutes are each stage's total time budget, summed over resumed runs; `steps` is an upper bound
that a stage may reach before its budget ends.

Why these choices (docs/demo-notes-trainer.md tells how they were arrived at):
- Latents 4×32×32 (f = 2) on a GPU: a small shape (14 px) is 7 latent pixels wide, not 3.5 as through an
  f = 4 VAE, so reconstructions keep stars and triangles apart; the VAE stage measures that with
  the classifier before anything is trained on its latents.
- A schedule that reaches pure noise (scaled-linear betas rescaled to zero terminal SNR, trailing
  timestep spacing), v-prediction, min-SNR weighting capped at 1 near pure noise, and a text
  encoder that masks its padding: without these, small models read layout from the noisy input.
- Sizes fit a 60 MB package (fp16): a package holds every U-Net twice (each expert
  graph, and inside the fused AFA graph), so a U-Net is ≈ 3.8 M parameters and the aggregator
  (13 points, hidden 64, depth 1) ≈ 2.5 M.
- The pooled text embedding is added to the timestep embedding (`class_labels`, which the engine
  feeds). The U-Nets' cross-attention does not mask padding: the AFA trainer passes no
  `encoder_attention_mask` to the experts, so experts trained with it would see different inputs
  there. The text encoder masks its own padding, so padding tokens only carry the caption.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

FAMILY_IDS = ("curves", "blocks", "spikes")

EXPERT_TEXT = {
    "curves": ("Curves", "circles and rings: fine-tuned on round shapes only"),
    "blocks": ("Blocks", "squares and diamonds: fine-tuned on square shapes only"),
    "spikes": ("Spikes", "triangles and stars: fine-tuned on pointed shapes only"),
}

SCHEDULER_CONFIG: Dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
    "steps_offset": 0,
    "set_alpha_to_one": False,
    "clip_sample": False,
}

_DOWN, _CROSS_DOWN, _UP, _CROSS_UP = "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"

_FULL: Dict[str, Any] = {
    "seed": 0,
    # n_pairs: two-object scenes added to the aggregators' training data (about half of it is then pairs)
    "world": {"n_all": 60_000, "n_family": 20_000, "n_pairs": 30_000, "two_object_prob": 0.3, "omit_prob": 0.2},
    "classifier": {"config": {"widths": [24, 48, 96, 128], "squeeze_channels": 16, "feature_dim": 256},
                   "steps": 3000, "batch_size": 128, "lr": 3e-3, "two_object_prob": 0.4, "eval_n": 2000,
                   "minutes": 30.0},
    "tokenizer": {"vocab_size": 700},  # every caption word becomes one token
    "vae": {
        "config": {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4,
                   "norm_num_groups": 16, "mid_block_attention": False},
        "steps": 200_000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 100, "kl_weight": 1e-6,
        "minutes": 45.0, "eval_n": 512, "scale_samples": 4096,
    },
    "text_encoder": {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "intermediate_size": 512, "mask_padding": True},
    "unet": {
        "sample_size": 32, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [48, 96, 96], "layers_per_block": 1,
        "down_block_types": [_DOWN, _CROSS_DOWN, _CROSS_DOWN], "up_block_types": [_CROSS_UP, _CROSS_UP, _UP],
        "attention_head_dim": 4, "norm_num_groups": 16,
        # the pooled text embedding (the engine feeds it as `class_labels`) joins the time embedding
        "class_embed_type": "projection",
    },
    "scheduler": SCHEDULER_CONFIG,
    "diffusion": {"snr_weighting": "capped", "snr_gamma": 5.0, "caption_dropout": 0.1},
    "base": {"steps": 1_000_000, "batch_size": 32, "lr": 1e-3, "text_encoder_lr": 5e-4, "warmup_steps": 200,
             "grad_clip": 1.0, "ema_decay": 0.999, "minutes": 360.0},
    "expert": {"steps": 1_000_000, "batch_size": 32, "lr": 5e-4, "warmup_steps": 50, "grad_clip": 1.0,
               "ema_decay": 0.995, "minutes": 90.0},
    "afa": {"hidden": 64, "depth": 1, "heads": 4, "head_dim": 16, "steps": 1_000_000, "batch_size": 16,
            "lr": 5e-4, "warmup_steps": 50, "grad_clip": 1.0, "expert_dropout": 0.3, "expert_min_keep": 2,
            "caption_dropout": 0.1, "minutes": 180.0,
            # the routing term (trainer.training.trainers.train_afa): under routing_loss 0, the paper's plain
            # diffusion loss, this trio's aggregator picked experts by layer (routing 0.371, docs/results.md)
            "routing_loss": 1.0, "routing_window": 0.6, "routing_temperature": 0.05,
            # scenes per family for the routing signal measured before training (trainer.demo.routing_signal)
            "signal_n": 128},
    # adherence of sampled images, measured with the classifier at every checkpoint (at the package's guidance)
    "eval": {"n": 64, "steps": 20, "guidance": 2.0, "seed": 1234},
    # rendered scenes whose classifier features `npm run eval`'s Fréchet distance compares against
    "reference": {"n_single": 4000, "n_pair": 2000},
    "checkpoint_minutes": 5.0,
    "export": {"fp16": True, "check": "auto"},
    "package": {
        "name": "demo", "version": "1.0.0",
        "description": "Shapes-world demo: three experts (curves, blocks, spikes) and their AFA ensemble.",
        # guidance 2: at 5 the trio drew red circles green (its aggregator weighs the experts differently
        # with and without the prompt, and guidance multiplies that difference); from 2.5 up large red
        # circles on white get a purple-grey centre (the guided latents leave what the VAE decodes as red).
        # Strict eval, small set (docs/demo-notes.md): AFA full match 88.9/66.7% (single/pairs) at 2,
        # 80.6/58.3% at 3, 88.9/58.3% at 1.5.
        "defaults": {"steps": 20, "guidance": 2.0, "scheduler": "ddim", "width": 64, "height": 64},
        "size": {"min": 32, "max": 128},
        "display": {"width": 512, "height": 512},
    },
}

# One H100/H200, whole build ≤ 10 minutes: bf16 autocast, big batches, data rendered on the GPU. On an
# H200 these budgets give a base with full match 0.91 and experts with 0.93-0.94 on their own family.
_CUDA_OVERRIDES: Dict[str, Any] = {
    "classifier": {"batch_size": 256, "minutes": 0.4},
    "vae": {"batch_size": 256, "minutes": 1.2},
    "base": {"batch_size": 512, "minutes": 2.4},
    "expert": {"batch_size": 512, "minutes": 0.7},
    "afa": {"batch_size": 256, "lr": 1e-3, "minutes": 1.4},
    "eval": {"n": 256},
    "checkpoint_minutes": 1.0,
}

# On 2 CPU cores the U-Net's cost per image decides how much it sees: on 16×16 latents it trains at 75
# images/s against 24 on 32×32 (where the base's shape accuracy stayed at chance for 38 min), so the CPU
# recipe uses an f = 4 VAE ([32, 64, 64]); its reconstructions are measured with the classifier before
# anything is trained on its latents. The GPU recipe keeps f = 2.
_CPU_OVERRIDES: Dict[str, Any] = {
    "vae": {"config": {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
                       "norm_num_groups": 16, "mid_block_attention": False}},
    # ≈ 1,150 steps: experts clearly better on their own family than elsewhere (routing gain 8-25% in
    # trainer.demo.routing_signal, against 1-9% after 6 min at lr 5e-4, when AFA only matched the average)
    "expert": {"lr": 1e-3, "minutes": 12.0},
}
# Tiny sizes and a few steps per stage: the whole pipeline in a few minutes on a CPU.
_SMOKE_OVERRIDES: Dict[str, Any] = {
    "world": {"n_all": 192, "n_family": 48, "n_pairs": 48},
    "classifier": {"config": {"widths": [8, 8, 16, 16], "squeeze_channels": 8, "feature_dim": 32},
                   "steps": 3, "batch_size": 8, "eval_n": 32},
    "tokenizer": {"vocab_size": 560},
    "vae": {"config": {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
                       "norm_num_groups": 8, "mid_block_attention": False},
            "steps": 3, "batch_size": 4, "eval_n": 8, "scale_samples": 32},
    "text_encoder": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "unet": {"block_out_channels": [16, 16, 32], "attention_head_dim": 2, "norm_num_groups": 8},
    "base": {"steps": 3, "batch_size": 4},
    "expert": {"steps": 2, "batch_size": 4},
    "afa": {"hidden": 16, "heads": 2, "head_dim": 8, "steps": 2, "batch_size": 2, "signal_n": 4},
    "eval": {"n": 4, "steps": 2},
    "reference": {"n_single": 48, "n_pair": 24},
    "export": {"fp16": True, "check": False},
}


def _merge(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe(device: str = "cpu", smoke: bool = False, time_scale: float = 1.0) -> Dict[str, Any]:
    """The recipe for `device` ('cpu' or 'cuda'); `smoke` shrinks everything to a pipeline check;
    `time_scale` multiplies every stage's minutes."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    r = _merge(_FULL, _CUDA_OVERRIDES if device == "cuda" else _CPU_OVERRIDES)
    if smoke:
        r = _merge(r, _SMOKE_OVERRIDES)
    # the U-Net's sample size is the latent side: 64 px over the VAE's downsampling
    r["unet"]["sample_size"] = 64 // 2 ** (len(r["vae"]["config"]["block_out_channels"]) - 1)
    r["device"] = device
    r["smoke"] = smoke
    for stage in ("classifier", "vae", "base", "expert", "afa"):
        r[stage]["minutes"] = float(r[stage]["minutes"]) * time_scale
    r["time_scale"] = time_scale
    return r
