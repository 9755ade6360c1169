"""The Python halves of the prepared GPU run (scripts/gpu/measure.sh, docs/gpu.md), on random-initialised
models of the exact SD1.5 architecture (or tiny ones for the CPU dry run), rebuilt from seeds on every
call so that the engine's package and the PyTorch reference hold the same weights:

    python3 scripts/gpu/measure.py build --out PKG [--preset sd15|tiny]   the package: text encoder, VAE
        decoder, expert e0's U-Net (e1, e2 list the same graph: same architecture, same speed) and the
        3-expert AFA graph, exported by trainer.export, then fp16-compute variants of all of them
    python3 scripts/gpu/measure.py torch --json FILE [--preset …]       the trainer's PyTorch reference
        sampler in float16 on the GPU (float32 on the CPU): text encoder, 25 DDIM steps with CFG, VAE decode
    python3 scripts/gpu/measure.py train --json FILE [--preset …]       SABW training (trainer's AFAObjective,
        3 frozen experts, AdamW on the aggregators, bf16 autocast on CUDA): steps/s and peak memory

Run from the repository root with PYTHONPATH=. (measure.sh does).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List

import torch

from trainer.fixture.tiny import SCHEDULER_CONFIG, expert_config
from trainer.models.afa import AFAEnsemble
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.text.bpe import CLIPTokenizer

TOKENIZER = os.path.join("test", "fixtures", "golden", "clip")
PROMPT = "a photograph of an astronaut riding a horse on the moon"
EXPERTS = 3
PRESETS: Dict[str, Dict[str, Any]] = {
    # size: picture side; steps and guidance as the targets say (512², 25 steps, CFG)
    "sd15": {"size": 512, "steps": 25, "guidance": 7.5, "train_batch": 8},
    "tiny": {"size": 64, "steps": 4, "guidance": 7.5, "train_batch": 2},
}


def log(message: str) -> None:
    print(f"measure.py: {message}", file=sys.stderr, flush=True)


def models(preset: str):
    """(tokenizer, text encoder, VAE, [U-Nets], AFA ensemble), float32 on the CPU, seeded. "tiny" has the
    tiny fixture's sizes (trainer.fixture.tiny), so that the CPU dry run exports in minutes."""
    tokenizer = CLIPTokenizer.from_dir(TOKENIZER)
    sd = preset == "sd15"
    torch.manual_seed(0)
    text_encoder = CLIPTextEncoder(TextEncoderConfig.sd15() if sd else TextEncoderConfig.tiny()).eval()
    torch.manual_seed(1)
    vae = AutoencoderKL(VAEConfig.sd15() if sd else VAEConfig.tiny()).eval()
    unets = []
    for k in range(EXPERTS):
        torch.manual_seed(10 + k)
        unets.append(UNet2DConditionModel(UNetConfig.sd15() if sd else expert_config()).eval())
    torch.manual_seed(5)
    ensemble = (AFAEnsemble(unets, hidden=128, depth=2) if sd else
                AFAEnsemble(unets, hidden=8, depth=1, heads=2, head_dim=4)).eval()
    return tokenizer, text_encoder, vae, unets, ensemble


def build(args) -> int:
    """Exports graph by graph (each to a temporary name, then renamed), skipping graphs already there,
    so that a call cut off by its time limit is resumed by the next one."""
    from trainer.export.fp16_compute import add_fp16_variants, write_fp16_variant
    from trainer.export.graphs import export_afa, export_text_encoder, export_unet, export_vae_decoder
    from trainer.export.manifest import write_manifest
    from trainer.export.package import architecture_tag

    p = PRESETS[args.preset]
    started = time.perf_counter()
    tokenizer, text_encoder, vae, unets, ensemble = models(args.preset)
    timings: Dict[str, float] = {"models_s": time.perf_counter() - started}
    log(f"models built in {timings['models_s']:.1f} s")
    graphs = {
        "text_encoder": ("text_encoder/model.onnx", lambda path: export_text_encoder(text_encoder, path, fp16=True, check=False)),
        "vae_decoder": ("vae_decoder/model.onnx", lambda path: export_vae_decoder(vae, path, fp16=True, check=False)),
        "unet": ("experts/e0/unet/model.onnx", lambda path: export_unet(unets[0], path, name="unet e0", fp16=True, check=False)),
        "afa": ("ensembles/afa/model.onnx", lambda path: export_afa(ensemble, path, subsets=False, name="afa", fp16=True,
                                                                    check=False)),
    }
    for key, (rel, export) in graphs.items():
        final = os.path.join(args.out, rel)
        if os.path.isfile(final):
            log(f"{rel}: there already")
            continue
        folder = os.path.dirname(final)
        tmp = os.path.join(folder, ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        t = time.perf_counter()
        with torch.no_grad():
            log(export(os.path.join(tmp, "model.onnx")).summary())
        for f in os.listdir(tmp):  # model.onnx last: its presence means the graph is complete
            if f != "model.onnx":
                os.replace(os.path.join(tmp, f), os.path.join(folder, f))
        os.replace(os.path.join(tmp, "model.onnx"), final)
        os.rmdir(tmp)
        timings[f"export_{key}_s"] = time.perf_counter() - t
    for name in ("vocab.json", "merges.txt"):
        os.makedirs(os.path.join(args.out, "tokenizer"), exist_ok=True)
        shutil.copyfile(os.path.join(TOKENIZER, name), os.path.join(args.out, "tokenizer", name))
    os.makedirs(os.path.join(args.out, "scheduler"), exist_ok=True)
    with open(os.path.join(args.out, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    size = p["size"]
    tag = architecture_tag(unets[0])
    manifest = {
        "format": "ensemble-diffusion-package", "format_version": 1, "name": f"gpu-{args.preset}", "version": "1.0.0",
        "description": "random SD1.5-architecture models (speed only)",
        "latent": {"channels": vae.config.latent_channels, "downsample": vae.config.downsample_factor,
                   "scale_factor": float(vae.config.scaling_factor)},
        "tokenizer": "tokenizer", "text_encoder": graphs["text_encoder"][0], "vae_decoder": graphs["vae_decoder"][0],
        "scheduler": "scheduler/scheduler_config.json",
        "defaults": {"steps": p["steps"], "guidance": p["guidance"], "scheduler": "ddim", "width": size, "height": size},
        "size": {"min": size // 2, "max": size * 2},
        # e1 and e2 name e0's graph: same architecture, same speed (their weights differ inside the AFA graph)
        "experts": [{"id": f"e{k}", "title": f"E{k}", "description": "", "unet": graphs["unet"][0], "architecture": tag}
                    for k in range(EXPERTS)],
        "ensembles": [{"id": "afa", "title": "AFA (random)", "description": "", "method": "afa",
                       "experts": [f"e{k}" for k in range(EXPERTS)], "graph": graphs["afa"][0], "subsets": False}],
    }
    write_manifest(args.out, manifest)
    t = time.perf_counter()
    add_fp16_variants(args.out, log=log)
    # expert e0att: e0's U-Net with the attention softmax in float16 too (trainer.export.fp16_compute
    # --attention-softmax fp16), to see what the float32 attention softmax costs
    att = "experts/e0/unet/model.fp16att.onnx"
    if not os.path.isfile(os.path.join(args.out, att)):
        write_fp16_variant(os.path.join(args.out, graphs["unet"][0]), os.path.join(args.out, att), "fp16")
    manifest["experts"].append({"id": "e0att", "title": "E0 (fp16 attention softmax)", "description": "",
                                "unet": {"fp32": graphs["unet"][0], "fp16": att}, "architecture": tag})
    with open(os.path.join(args.out, "manifest.json"), encoding="utf-8") as f:
        written = json.load(f)
    written["experts"].append(manifest["experts"][-1])
    write_manifest(args.out, written)
    timings["fp16_variants_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    sizes = {}
    for folder, _, files in os.walk(args.out):
        for f in files:
            if ".onnx" in f:
                sizes[os.path.relpath(os.path.join(folder, f), args.out)] = os.path.getsize(os.path.join(folder, f))
    _write(args.json, {"timings": timings, "file_bytes": sizes})
    return 0


def _write(path: str, data: Any) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    print(json.dumps(data))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference(args) -> int:
    """The trainer's reference sampler (trainer.diffusion.sampler.sample) with the models in float16 on
    CUDA; per mode the median of `rounds` whole pictures (text encoder, steps, VAE decode) after a warm-up."""
    from trainer.diffusion.sampler import decode_latents, sample

    p = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tokenizer, text_encoder, vae, unets, ensemble = models(args.preset)
    for m in (text_encoder, vae, ensemble):
        m.to(device=device, dtype=dtype)
    h = p["size"] // vae.config.downsample_factor

    def denoiser(net, stacked):
        def run(x, t, c):
            out = net(x.to(device, dtype), t.to(device), c)
            if isinstance(out, tuple):  # AFA: (prediction, the weights of every aggregation point)
                maps = out[1]
                maps = [m.float().cpu() for m in maps] if isinstance(maps, (list, tuple)) else maps.float().cpu()
                return out[0].float().cpu(), maps
            return out.float().cpu()
        return run

    def picture(mode: str) -> Dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = tokenizer(["", PROMPT]).to(device)
            hidden = text_encoder(ids)[0]
            uncond, cond = hidden[:1], hidden[1:]
            if mode == "afa":
                fn, c, u = denoiser(ensemble, True), torch.stack([cond] * EXPERTS), torch.stack([uncond] * EXPERTS)
            else:
                fn, c, u = denoiser(unets[0], False), cond, uncond
            _sync(device)
            t1 = time.perf_counter()
            result = sample(fn, c, u, latent_shape=(1, 4, h, h), seed=1, steps=p["steps"], guidance=p["guidance"],
                            scheduler="ddim", scheduler_config=SCHEDULER_CONFIG)
            _sync(device)
            t2 = time.perf_counter()
            decode_latents(lambda z: vae.decode(z.to(device, dtype)), result.latents, vae.config.scaling_factor)
            _sync(device)
            t3 = time.perf_counter()
        return {"total_ms": (t3 - t0) * 1e3, "denoise_ms": (t2 - t1) * 1e3, "decode_ms": (t3 - t2) * 1e3}

    out: Dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "dtype": str(dtype), "torch": torch.__version__, "modes": {}}
    for mode in args.modes.split(","):
        picture(mode)  # warm-up: cuDNN algorithms, allocator
        runs = sorted((picture(mode) for _ in range(args.rounds)), key=lambda r: r["total_ms"])
        out["modes"][mode] = runs[len(runs) // 2]
        log(f"torch {mode}: {out['modes'][mode]}")
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    _write(args.json, out)
    return 0


def train(args) -> int:
    """Steps/s of SABW training at the preset's batch and size, 3 frozen experts: the trainer's
    AFAObjective (its loss: text encoding, noising, the ensemble forward, MSE), AdamW on the aggregators."""
    from trainer.diffusion.losses import DiffusionLoss, schedule_from_config
    from trainer.training.objectives import AFAObjective

    p = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, text_encoder, vae, _unets, ensemble = models(args.preset)
    schedule, config = schedule_from_config(SCHEDULER_CONFIG)
    objective = AFAObjective(ensemble, [text_encoder] * EXPERTS, [tokenizer] * EXPERTS, device,
                             DiffusionLoss(schedule, device, "none", 5.0), config, 0.1, 0.0, 2, None, False, None)
    optimizer = torch.optim.AdamW(ensemble.aggregator_parameters(), lr=1e-4, weight_decay=0.01)
    objective.set_training(True)
    h = p["size"] // vae.config.downsample_factor
    batch = p["train_batch"]
    generator = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(batch, 4, h, h)
    captions = [PROMPT] * batch
    out: Dict[str, Any] = {"batch": batch, "latent": [4, h, h], "experts": EXPERTS,
                           "trainable_parameters": sum(t.numel() for t in ensemble.aggregator_parameters())}
    for precision in args.precisions.split(","):
        if precision == "bf16" and device.type != "cuda":
            continue  # bf16 autocast is the CUDA recipe's (TrainOptions.amp_bf16)
        use_bf16 = precision == "bf16"

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
                loss, _ = objective.loss(x, captions, generator)
            loss.backward()
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step()
        step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        seconds = time.perf_counter() - t0
        row = {"steps_per_s": args.steps / seconds, "s_per_step": seconds / args.steps}
        if device.type == "cuda":
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out[precision] = row
        log(f"train {precision}: {row}")
    _write(args.json, out)
    return 0


TARGETS = [  # (key, what, limit, "max" = at most / "min" = at least)
    ("single_s", "single expert, s per picture", 0.35, "max"),
    ("afa_s", "3-expert AFA, s per picture", 1.2, "max"),
    ("afa_over_singles", "AFA step / Σ the 3 experts' single steps", 1.1, "max"),
    ("engine_vs_torch_single", "PyTorch reference / engine, single (whole picture)", 1.0, "min"),
    ("engine_vs_torch_afa", "PyTorch reference / engine, AFA (whole picture)", 1.0, "min"),
]


def _read(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def report(args) -> int:
    """gpu-measure.json and gpu-measure.md in --out from the phases' JSON files (whatever exists)."""
    engine, torch_ref = _read(os.path.join(args.out, "engine.json")), _read(os.path.join(args.out, "torch.json"))
    training, built = _read(os.path.join(args.out, "train.json")), _read(os.path.join(args.out, "build.json"))
    extra = _read(args.extra) if args.extra else {}
    em, tm = engine.get("modes", {}), torch_ref.get("modes", {})
    figures: Dict[str, Any] = {}
    if "single" in em:
        figures["single_s"] = em["single"]["total_ms"] / 1e3
    if "afa" in em:
        figures["afa_s"] = em["afa"]["total_ms"] / 1e3
    if "single" in em and "afa" in em:
        figures["afa_over_singles"] = em["afa"]["step_ms"] / (EXPERTS * em["single"]["step_ms"])
    for mode in ("single", "afa"):
        if mode in em and mode in tm:
            figures[f"engine_vs_torch_{mode}"] = tm[mode]["total_ms"] / em[mode]["total_ms"]
    result = {"preset": args.preset, "provider": args.provider, "skipped": args.skipped.split(), "figures": figures,
              "engine": engine, "torch": torch_ref, "train": training, "build": built, **extra}
    with open(os.path.join(args.out, "gpu-measure.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    shape = next(iter(em.values()), {})
    lines = [f"Preset {args.preset}: {shape.get('size', '?')}, {shape.get('steps', '?')} steps, guidance "
             f"{shape.get('guidance', '?')}; engine on {args.provider}, PyTorch reference on {torch_ref.get('device', '?')} "
             f"in {torch_ref.get('dtype', '?')}; skipped: {args.skipped or 'nothing'}",
             "(the targets are for SD1.5 at 512², 25 steps, CFG, on an H100/H200)", "",
             "| figure | target | measured | met |", "|---|---|---|---|"]
    for key, what, limit, kind in TARGETS:
        value = figures.get(key)
        met = "" if value is None else ("yes" if (value <= limit if kind == "max" else value >= limit) else "NO")
        lines.append(f"| {what} | {'≤' if kind == 'max' else '≥'} {limit:g} | "
                     f"{'—' if value is None else f'{value:.3g}'} | {met} |")
    lines += ["", "| mode | engine total ms | denoise ms | ms/step | decode ms | first ms | PyTorch total ms |",
              "|---|---|---|---|---|---|---|"]
    if "single" in em and "single_att" in em:
        figures["attention_softmax_fp16_speedup"] = em["single"]["total_ms"] / em["single_att"]["total_ms"]
    for mode in ("single", "single_att", "afa"):
        e, t = em.get(mode), tm.get(mode, {})
        if e:
            lines.append(f"| {mode} | {e['total_ms']:.0f} | {e['denoise_ms']:.0f} | {e['step_ms']:.1f} | "
                         f"{e['decode_ms']:.0f} | {e['first_ms']:.0f} | {t.get('total_ms', float('nan')):.0f} |")
    if "attention_softmax_fp16_speedup" in figures:
        lines.append(f"\nSingle expert with the attention softmax in float16 too (e0att): "
                     f"{figures['attention_softmax_fp16_speedup']:.2f}× the speed of the default fp16 graph")
    if engine:
        lines.append(f"\nEngine load {engine['load_ms'] / 1e3:.1f} s + warm-up of every graph "
                     f"{engine['warm_up_ms'] / 1e3:.1f} s; RSS peak {engine['rss_peak_bytes'] / 2**30:.1f} GiB"
                     + (f"; GPU memory peak {extra['engine_gpu_peak_mib']} MiB" if "engine_gpu_peak_mib" in extra else ""))
    for precision in ("bf16", "fp32"):
        row = training.get(precision)
        if row:
            mem = f", peak {row['peak_gpu_bytes'] / 2**30:.1f} GiB" if "peak_gpu_bytes" in row else ""
            lines.append(f"SABW training ({precision}, batch {training['batch']}, latents {training['latent']}, "
                         f"{training['experts']} frozen experts): {row['steps_per_s']:.2f} steps/s{mem}")
    if built:
        lines.append("Build: " + ", ".join(f"{k} {v:.0f} s" for k, v in built.get("timings", {}).items()))
    with open(os.path.join(args.out, "gpu-measure.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "torch", "train", "report"):
        s = sub.add_parser(name)
        s.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
        s.add_argument("--json", default="")
        if name == "report":
            s.add_argument("--out", required=True)
            s.add_argument("--extra", default="")
            s.add_argument("--skipped", default="")
            s.add_argument("--provider", default="cuda")
        if name == "build":
            s.add_argument("--out", required=True)
        if name == "torch":
            s.add_argument("--modes", default="single,afa")
            s.add_argument("--rounds", type=int, default=3)
        if name == "train":
            s.add_argument("--steps", type=int, default=10)
            s.add_argument("--precisions", default="bf16,fp32")
    args = parser.parse_args(argv)
    return {"build": build, "torch": reference, "train": train, "report": report}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
