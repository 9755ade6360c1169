"""Command line of the trainer (`python3 -m trainer.train`, a shim that calls `main` here).

    python3 -m trainer.train vae|unet|afa --config FILE.json [--device cpu|cuda] [--out-dir DIR]
                                          [--steps N] [--max-minutes M] [--seed S] [--no-resume] [--quiet]
    python3 -m trainer.train latents --vae DIR --data DIR --out FILE.safetensors [--device ...] [--sample]

The config file's keys are documented in trainer.training.config. A run resumes from the newest
checkpoint in its out_dir unless --no-resume. The shim sets OMP_WAIT_POLICY=PASSIVE when it is not
set (2-core machines shared by several processes).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from trainer.io.model_folders import load_vae
from trainer.training.config import load_config, run_from_config
from trainer.training.data import ImageFolder, encode_latents
from trainer.training.options import resolve_device


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m trainer.train",
                                     description="Train a VAE, a U-Net (+ text encoder) or AFA aggregators.")
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("vae", "unet", "afa"):
        p = sub.add_parser(kind, help=f"train a {kind} from a JSON config (keys: see trainer/training/config.py)")
        p.add_argument("--config", required=True, help="JSON config file")
        p.add_argument("--device", choices=("cpu", "cuda"), help="overrides config.device")
        p.add_argument("--out-dir", help="overrides config.out_dir")
        p.add_argument("--steps", type=int, help="overrides train.steps")
        p.add_argument("--max-minutes", type=float, help="time budget; stops with a checkpoint")
        p.add_argument("--seed", type=int, help="overrides train.seed")
        p.add_argument("--no-resume", action="store_true", help="start from step 0 even if out_dir has checkpoints")
        p.add_argument("--quiet", action="store_true", help="no progress lines")
        p.add_argument("--deterministic", action="store_true", help="CUDA: deterministic kernels (exact resume)")
        p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p = sub.add_parser("latents", help="encode an image folder into a latents file with a VAE")
    p.add_argument("--vae", required=True, help="VAE folder (final/ of a vae run, or a diffusers vae/ folder)")
    p.add_argument("--data", required=True, help="image folder (images + captions)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="store a posterior sample instead of the mean")
    p.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.kind == "latents":
        data = ImageFolder(args.data)
        encode_latents(load_vae(args.vae), data, args.out, args.batch_size, resolve_device(args.device), args.sample)
        print(f"wrote {args.out}: {len(data)} latents")
        return 0

    config = load_config(args.config)
    overrides = {"device": args.device, "out_dir": args.out_dir, "steps": args.steps,
                 "max_minutes": args.max_minutes, "seed": args.seed}
    if args.no_resume:
        overrides["resume"] = False
    if args.quiet:
        overrides["quiet"] = True
    if args.deterministic:
        overrides["deterministic"] = True
    result = run_from_config(args.kind, config, overrides)
    state = "completed" if result.completed else ("stopped by the time budget" if result.stopped_by_budget else "stopped")
    print(f"{state} at step {result.step}; mean loss of this run {result.mean_loss:.4f}; "
          f"checkpoint {result.checkpoint}; final models in {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
