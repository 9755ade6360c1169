"""The stages of the demo build. Each takes a StageRun (the recipe, the run folder's products, its
budget, where to go on from, how to log and report time) and returns its record for the build log,
with "done" telling whether the stage finished; trainer.demo.build decides what runs when.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.demo import classifier as clf
from trainer.demo import shapes
from trainer.demo.bundle import FUSE_ID, fuse_spec
from trainer.demo.eval_reference import write_reference
from trainer.demo.metrics import (adherence_scores, cross_family_pairs, generate, latent_scale,
                                  vae_reconstruction)
from trainer.demo.products import RunProducts, to_signed
from trainer.demo.recipe import EXPERT_TEXT, FAMILY_IDS
from trainer.demo.routing_signal import routing_signal
from trainer.export.package import EnsembleSpec, save_package
from trainer.io.model_folders import load_aggregators, load_text_encoder, load_unet, load_vae, save_vae
from trainer.io.png import write_png
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import UNet2DConditionModel, UNetConfig, count_parameters
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.text.bpe import CLIPTokenizer, train_bpe
from trainer.training.data import TensorExamples
from trainer.training.loop import evaluating
from trainer.training.options import TrainResult
from trainer.training.trainers import train_afa, train_unet, train_vae

VAE_EVAL_SEED = 2**31 - 100


@dataclass
class StageRun:
    """One run of one stage."""

    name: str                            # "vae", "expert-curves", …
    recipe: Dict[str, Any]
    products: RunProducts
    out_dir: str                         # the package folder (export)
    budget: Optional[float]              # minutes left of the stage's budget; None for stages without one
    continue_from: Optional[str]         # final weights an extended stage goes on from (it has no checkpoint)
    charge_time: Callable[[], None]      # counts the time spent so far into the build's state (at checkpoints)
    write_build_log: Callable[[], None]  # (re)writes build_log.md in the run folder
    log: Callable[[str], None]
    started: float                       # time.monotonic() when the run began

    @property
    def device(self) -> torch.device:
        return self.products.device

    @property
    def cuda(self) -> bool:
        return self.products.cuda

    def path(self, *parts: str) -> str:
        return self.products.path(*parts)

    def spent(self) -> bool:
        """Whether this run used (nearly) all of the stage's remaining budget."""
        if self.budget is None:
            return False
        return (time.monotonic() - self.started) / 60 >= self.budget - 0.05


# ---------------------------------------------------------------------------------------------
# shared pieces


def train_options(run: StageRun, section: str, out_dir: str) -> Dict[str, Any]:
    """The trainer options of a training stage, from its recipe section."""
    r = run.recipe
    s = r[section]
    opts = {
        "batch_size": s["batch_size"], "lr": s["lr"], "warmup_steps": s.get("warmup_steps", 0),
        "grad_clip": s.get("grad_clip"), "ema_decay": s.get("ema_decay"), "seed": r["seed"],
        "device": str(run.device), "out_dir": out_dir, "checkpoint_minutes": r["checkpoint_minutes"],
        "max_minutes": run.budget, "log_every": 100 if run.cuda else 20, "amp_bf16": run.cuda,
    }
    if r["smoke"]:
        opts["log_every"] = 1
    return opts


def eval_batch(recipe: Dict[str, Any], families: Optional[Sequence[str]], n: int, two_object_prob: float = 0.3,
               seed_offset: int = 0) -> shapes.ShapesBatch:
    """Rendered scenes whose captions the evaluations sample images for."""
    e = recipe["eval"]
    return shapes.sample_batch(n, e["seed"] + seed_offset, families=families, two_object_prob=two_object_prob,
                               omit_prob=recipe["world"]["omit_prob"])


def adherence(run: StageRun, model: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer,
              batch: shapes.ShapesBatch, ensemble: bool = False, seed: int = 0) -> Tuple[Dict[str, Any], torch.Tensor]:
    """Scores of images sampled (with the recipe's eval settings) for batch's captions, and the images."""
    e = run.recipe["eval"]
    with evaluating(model, text_encoder):
        images, contributions = generate(model, text_encoder, tokenizer, batch.captions, seed,
                                         vae=run.products.vae(), device=run.device, steps=e["steps"],
                                         guidance=e["guidance"], scheduler_config=run.recipe["scheduler"],
                                         ensemble=ensemble)
    return adherence_scores(run.products.classifier(), images, contributions, batch), images


def save_samples(path: str, images: Optional[torch.Tensor]) -> None:
    """Up to 16 images as a grid of 8 per row (nothing without images)."""
    if images is None or len(images) == 0:
        return
    pixels = images[:16].permute(0, 2, 3, 1).numpy()
    per_row = min(8, len(pixels))
    rows = [np.concatenate(list(pixels[r * per_row:(r + 1) * per_row]), axis=1)
            for r in range(len(pixels) // per_row)]
    write_png(path, np.concatenate(rows, axis=0))


def training_record(run: StageRun, result: TrainResult, parameters: Dict[str, int]) -> Dict[str, Any]:
    return {"done": result.completed or run.spent(), "steps": result.step, "parameters": parameters,
            "loss_last": float(np.mean(result.losses[-50:])) if result.losses else None,
            "loss_first": float(np.mean(result.losses[:50])) if result.losses else None,
            "measured": dict(result.evaluations[-1][1]) if result.evaluations else {},
            "evaluations": [{"step": s, **e} for s, e in result.evaluations]}


# ---------------------------------------------------------------------------------------------
# the stages


def stage_world(run: StageRun) -> Dict[str, Any]:
    counts, captions = run.products.render_world()
    two = float((run.products.world("all").num_objects == 2).float().mean())
    return {"done": True, "measured": {"scenes": counts, "two_object_share": round(two, 3),
                                       "distinct_captions": len(set(captions))}}


def stage_classifier(run: StageRun) -> Dict[str, Any]:
    r = run.recipe
    c = r["classifier"]
    os.makedirs(run.path("classifier"), exist_ok=True)
    torch.manual_seed(r["seed"])
    model = clf.AttributeClassifier(clf.ClassifierConfig(**c["config"]))
    result = clf.train_classifier(
        model, steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"], seed=r["seed"], device=run.device,
        two_object_prob=c["two_object_prob"], max_minutes=run.budget,
        checkpoint_path=run.path("classifier", "train_state.pt"),
        checkpoint_every_s=60 * r["checkpoint_minutes"], eval_n=c["eval_n"], log=run.log,
        use_autocast=run.cuda)
    clf.save_classifier(model, run.path("classifier", "classifier.pt"), {"accuracy": result.accuracy})
    run.products.forget("classifier")
    done = result.steps >= c["steps"] or run.spent()
    return {"done": done, "steps": result.steps, "parameters": count_parameters(model),
            "loss_last": float(np.mean(result.losses[-50:])) if result.losses else None,
            "measured": {"accuracy_on_renders": {k: round(v, 4) for k, v in result.accuracy.items()}}}


def stage_tokenizer(run: StageRun) -> Dict[str, Any]:
    if not os.path.exists(run.path("world", "captions.txt")):
        run.log("world captions are missing: rendering the world again")
        run.products.render_world()
    with open(run.path("world", "captions.txt")) as f:
        captions = [line.rstrip("\n") for line in f if line.strip()]
    vocab, merges = train_bpe(captions, run.recipe["tokenizer"]["vocab_size"], run.path("tokenizer"))
    tok = run.products.tokenizer()
    lengths = [len(tok.encode(c)) for c in captions[:2000]]
    words = sorted({w for c in captions for w in c.replace(",", " ,").split()})
    split_words = [w for w in words if len(tok.encode(w)) > 1]
    return {"done": True, "measured": {"vocab": len(vocab), "merges": len(merges),
                                       "max_tokens": max(lengths), "words_not_one_token": len(split_words)}}


def stage_vae(run: StageRun) -> Dict[str, Any]:
    r = run.recipe
    v = r["vae"]
    torch.manual_seed(r["seed"])
    earlier = run.continue_from
    vae = load_vae(earlier, run.device) if earlier else AutoencoderKL(VAEConfig(**v["config"]))
    world = run.products.world("all")
    images = world.images.to(run.device) if run.cuda else world.images
    data = TensorExamples(images, world.captions, to_signed)
    held_out = shapes.sample_batch(v["eval_n"], VAE_EVAL_SEED, two_object_prob=0.3)

    def evaluate(step: int) -> Dict[str, Any]:
        run.charge_time()
        return vae_reconstruction(vae, run.products.classifier(), held_out, run.device)

    opts = train_options(run, "vae", run.path("vae"))
    opts.pop("ema_decay", None)
    result = train_vae(vae, data, v["steps"], kl_weight=v["kl_weight"], evaluate=evaluate, **opts)
    done = result.completed or run.spent()
    record = {"done": done, "steps": result.step, "parameters": count_parameters(vae),
              "loss_last": float(np.mean(result.losses[-50:])) if result.losses else None}
    measured = dict(result.evaluations[-1][1]) if result.evaluations else {}
    if done:
        final = load_vae(run.path("vae", "final"), run.device)
        final.config.scaling_factor = latent_scale(final, world, v["scale_samples"], run.device)
        save_vae(final, run.path("vae", "final", "vae"))
        run.products.keep_vae(final)
        measured["scaling_factor"] = round(final.config.scaling_factor, 5)
        run.products.encode_latents(final)
    record["measured"] = measured
    return record


def stage_base(run: StageRun) -> Dict[str, Any]:
    r = run.recipe
    tok = run.products.tokenizer()
    torch.manual_seed(r["seed"])
    earlier = run.continue_from
    if earlier:
        unet, text_encoder = load_unet(earlier), load_text_encoder(earlier)
    else:
        te_config = TextEncoderConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.eos_token_id, **r["text_encoder"])
        text_encoder = CLIPTextEncoder(te_config)
        unet_config = dict(r["unet"], cross_attention_dim=te_config.hidden_size)
        if unet_config.get("class_embed_type") == "projection":
            unet_config["projection_class_embeddings_input_dim"] = te_config.hidden_size
        unet = UNet2DConditionModel(UNetConfig(**unet_config))
    eval_all = eval_batch(r, None, r["eval"]["n"])
    samples: Dict[str, torch.Tensor] = {}  # the images of the last evaluation

    def evaluate(step: int) -> Dict[str, Any]:
        run.charge_time()
        scores, samples["images"] = adherence(run, unet, text_encoder, tok, eval_all)
        return {"all": scores}

    d = r["diffusion"]
    b = r["base"]
    result = train_unet(unet, text_encoder, tok, run.products.latents("all"), b["steps"],
                        scheduler_config=r["scheduler"], snr_weighting=d["snr_weighting"],
                        snr_gamma=d["snr_gamma"], caption_dropout=d["caption_dropout"], train_text_encoder=True,
                        text_encoder_lr=b["text_encoder_lr"], evaluate=evaluate,
                        **train_options(run, "base", run.path("base")))
    save_samples(run.path("base", "samples.png"), samples.get("images"))
    return training_record(run, result, {"unet": count_parameters(unet),
                                         "text_encoder": count_parameters(text_encoder)})


def stage_expert(run: StageRun) -> Dict[str, Any]:
    r = run.recipe
    family = run.name.split("-")[1]
    tok = run.products.tokenizer()
    unet = load_unet(run.continue_from or run.path("base", "final"))
    text_encoder = load_text_encoder(run.path("base", "final"))
    n = r["eval"]["n"]
    eval_family = eval_batch(r, [family], n, seed_offset=1)
    eval_all = eval_batch(r, None, max(2, n // 2))
    samples: Dict[str, torch.Tensor] = {}  # the images of the last evaluation (its own family's)

    def evaluate(step: int) -> Dict[str, Any]:
        run.charge_time()
        scores_all, _ = adherence(run, unet, text_encoder, tok, eval_all)
        scores_family, samples["images"] = adherence(run, unet, text_encoder, tok, eval_family)
        return {"all": scores_all, "family": scores_family}

    d = r["diffusion"]
    result = train_unet(unet, text_encoder, tok, run.products.latents(family), r["expert"]["steps"],
                        scheduler_config=r["scheduler"], snr_weighting=d["snr_weighting"],
                        snr_gamma=d["snr_gamma"], caption_dropout=d["caption_dropout"], train_text_encoder=False,
                        evaluate=evaluate, **train_options(run, "expert", run.path(run.name)))
    save_samples(run.path(run.name, "samples.png"), samples.get("images"))
    return training_record(run, result, {"unet": count_parameters(unet)})


def stage_afa(run: StageRun) -> Dict[str, Any]:
    r = run.recipe
    products = run.products
    tok = products.tokenizer()
    text_encoder = load_text_encoder(run.path("base", "final"))
    ensemble = products.build_ensemble(products.load_experts()).to(run.device)
    earlier = run.continue_from
    signal = None
    if earlier:
        load_aggregators(ensemble, earlier)
    else:  # fresh aggregators are uniform: what routing could gain over them
        signal = routing_signal(ensemble, text_encoder, tok, {f: products.latents(f) for f in FAMILY_IDS},
                                list(FAMILY_IDS), r["scheduler"], r["afa"]["signal_n"])
        run.log("routing signal (own expert vs uniform ensemble loss): " + ", ".join(
            f"{f} {s['own']:.4f} vs {s['uniform']:.4f} (gain {s['gain']:.1%})" for f, s in signal.items()))
    n = r["eval"]["n"]
    eval_all = eval_batch(r, None, n, seed_offset=2)
    eval_pairs = cross_family_pairs(eval_batch(r, None, max(4, n // 2), two_object_prob=1.0, seed_offset=3))
    samples: Dict[str, torch.Tensor] = {}  # the images of the last evaluation (the pairs', when there are any)

    def evaluate(step: int) -> Dict[str, Any]:
        run.charge_time()
        scores, samples["images"] = adherence(run, ensemble, text_encoder, tok, eval_all, ensemble=True)
        out = {"all": scores}
        if len(eval_pairs):
            out["pairs"], samples["images"] = adherence(run, ensemble, text_encoder, tok, eval_pairs, ensemble=True)
        return out

    a = r["afa"]
    d = r["diffusion"]
    result = train_afa(ensemble, text_encoder, tok, products.afa_examples(), a["steps"],
                       scheduler_config=r["scheduler"], caption_dropout=a["caption_dropout"],
                       expert_dropout=a["expert_dropout"], expert_min_keep=a["expert_min_keep"],
                       snr_weighting=d["snr_weighting"], snr_gamma=d["snr_gamma"], expert_ids=list(FAMILY_IDS),
                       routing_loss=a["routing_loss"], routing_window=a["routing_window"],
                       routing_temperature=a["routing_temperature"], evaluate=evaluate,
                       **train_options(run, "afa", run.path("afa")))
    save_samples(run.path("afa", "samples.png"), samples.get("images"))
    record = training_record(run, result, {"aggregators": ensemble.count_parameters()})
    record["recipe"] = {k: a[k] for k in ("batch_size", "lr", "routing_loss", "routing_window", "routing_temperature")}
    if signal is not None:
        record["routing_signal"] = signal
    return record


def stage_export(run: StageRun) -> Dict[str, Any]:
    r = run.recipe
    out_dir = run.out_dir
    torch.set_grad_enabled(False)
    try:
        text_encoder = load_text_encoder(run.path("base", "final"))
        vae = load_vae(run.path("vae", "final"))
        experts = dict(zip(FAMILY_IDS, run.products.load_experts()))
        ensemble = run.products.build_ensemble(list(experts.values()))
        load_aggregators(ensemble, run.path("afa", "final"))
        package = dict(r["package"])
        package["experts"] = {f: {"title": EXPERT_TEXT[f][0], "description": EXPERT_TEXT[f][1]} for f in FAMILY_IDS}
        spec = EnsembleSpec(ensemble.eval(), list(FAMILY_IDS), subsets=True, title="Trio (AFA)",
                            description="curves, blocks and spikes fused per pixel by a trained SABW aggregator; "
                                        "any two of them also work")
        ex = r["export"]
        ensembles = {"trio": spec, FUSE_ID: fuse_spec(list(experts.values()))}  # all in unets/, one weights file
        result = save_package(out_dir, run.path("tokenizer"), text_encoder.eval(), vae.eval(), experts,
                              ensembles, r["scheduler"], package, fp16=ex["fp16"], check=ex["check"],
                              share_weights=True, log=run.log)
        classifier = clf.load_classifier(run.path("classifier", "classifier.pt"))
        blob = torch.load(run.path("classifier", "classifier.pt"))
        clf.export_classifier_onnx(classifier, os.path.join(out_dir, "eval", "classifier.onnx"),
                                   accuracy=blob.get("accuracy"), fp16=ex["fp16"])
        torch.manual_seed(r["seed"])
        write_reference(classifier, os.path.join(out_dir, "eval"), **r["reference"])
    finally:
        torch.set_grad_enabled(True)
    run.write_build_log()
    shutil.copyfile(run.path("build_log.md"), os.path.join(out_dir, "eval", "build_log.md"))
    sizes = {}
    for root, _, files in os.walk(out_dir):
        for f in files:
            sizes[os.path.relpath(os.path.join(root, f), out_dir)] = os.path.getsize(os.path.join(root, f))
    return {"done": True, "measured": {"package_mb": round(sum(sizes.values()) / 2**20, 2),
                                       "graphs": len(result.reports)},
            "files": sizes}


# by the part of a stage's name before "-" (the three expert stages share one function)
STAGE_FUNCTIONS: Dict[str, Callable[[StageRun], Dict[str, Any]]] = {
    "world": stage_world, "classifier": stage_classifier, "tokenizer": stage_tokenizer, "vae": stage_vae,
    "base": stage_base, "expert": stage_expert, "afa": stage_afa, "export": stage_export,
}
