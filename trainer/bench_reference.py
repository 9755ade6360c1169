"""PyTorch reference timing for `npm run bench`: ms per denoising step of the reference sampler on
the same models the engine runs. Prints one JSON line `{"step_ms": {"single": …, "afa": …}}`.

Only packages whose PyTorch modules can be rebuilt here are supported: the tiny fixture (rebuilt
bit-for-bit from its seed by trainer.fixture). Exits 3 for other packages."""
import argparse
import json
import os
import sys
import time

import torch

from trainer.bpe import CLIPTokenizer
from trainer.fixture import SCHEDULER_CONFIG, build_models
from trainer.sampler import sample


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with open(os.path.join(args.model_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("name") != "tiny":
        print(f"no PyTorch modules for package {manifest.get('name')!r}", file=sys.stderr)
        return 3
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tokenizer = CLIPTokenizer.from_dir(os.path.join(args.model_dir, "tokenizer"))
    text_encoder, _vae, experts, duo = build_models(tokenizer)
    with torch.no_grad():
        ids = tokenizer(["", "a red circle on the left and a blue square on the right, white background"])
        hidden = text_encoder(ids)[0]
    uncond, cond = hidden[:1], hidden[1:]
    h = w = manifest["defaults"]["height"] // manifest["latent"]["downsample"]
    stacked = lambda x: torch.stack([x, x])  # noqa: E731  (each expert's own embeddings; shared here)
    denoisers = {
        "single": (lambda x, t, c: experts["alpha"](x, t, c), cond, uncond),
        "afa": (lambda x, t, c: duo(x, t, c), stacked(cond), stacked(uncond)),
    }
    result = {}
    with torch.no_grad():
        for name, (fn, c, u) in denoisers.items():
            run = lambda: sample(fn, c, u, latent_shape=(1, 4, h, w), seed=1, steps=args.steps, guidance=5.0,  # noqa: E731
                                 scheduler="ddim", scheduler_config=SCHEDULER_CONFIG)
            run()
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1000 / args.steps)
            times.sort()
            result[name] = times[len(times) // 2]
    print(json.dumps({"step_ms": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
