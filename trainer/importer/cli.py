"""`python3 -m trainer.importer --out models/<name> [options] A.safetensors B.safetensors dir/ …`
(what `npm run import` runs): SD1.x checkpoints → a model package. Bad input: one line on stderr, exit 1."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from trainer.importer.errors import ImportFailure
from trainer.importer.package import ImportOptions, import_checkpoints


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="npm run import --",
        description="Turn SD1.x checkpoints (single-file .safetensors in the LDM/A1111 layout, or diffusers "
                    "folders) into a model package: one U-Net per checkpoint, shared text encoders and VAE, "
                    "CLIP's tokenizer, SD1.5's scheduler, a manifest (docs/import.md).")
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT", help=".safetensors files or diffusers folders")
    p.add_argument("--out", required=True, help="package folder to write, e.g. models/mine")
    p.add_argument("--name", help="package name (default: the --out folder's name)")
    p.add_argument("--vae", metavar="FILE", help="VAE to use (a VAE .safetensors, a checkpoint, or a diffusers "
                                                 "vae/ folder); default: the first checkpoint's")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="fp16", action="store_true", default=True,
                           help="store weights as float16, compute in float32 (default; half the disk)")
    precision.add_argument("--fp32", dest="fp16", action="store_false", help="store weights as float32")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, and number inputs that give the same id")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .ckpt/.pt/.bin files (they can run code: only files you trust)")
    p.add_argument("--size", type=int, help="default picture side in pixels (default: 512 for SD1.x; "
                                            "derived from the U-Net for other sizes)")
    p.add_argument("--steps", type=int, help="default denoising steps (default 25)")
    p.add_argument("--cuda-fp16", action="store_true",
                   help="also write float16-compute variants of every graph (model.fp16.onnx, for CUDA hosts)")
    p.add_argument("--check", choices=("auto", "require", "off"), default="auto",
                   help="run each graph in onnxruntime-node against PyTorch (auto: when node is there)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    opts = ImportOptions(out=args.out, inputs=args.inputs, name=args.name, vae=args.vae, fp16=args.fp16,
                         force=args.force, allow_pickle=args.allow_pickle, size=args.size, steps=args.steps,
                         check={"auto": "auto", "require": True, "off": False}[args.check], cuda_fp16=args.cuda_fp16)
    try:
        with torch.no_grad():
            import_checkpoints(opts, log=lambda line: print(line, flush=True))
    except ImportFailure as e:
        print(f"import failed: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("import failed: out of memory (importing SD1.5 checkpoints needs about 4 GB free)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"import failed: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
