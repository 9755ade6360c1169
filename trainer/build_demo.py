"""Builds the demo model zoo from nothing, stage by stage: `python3 -m trainer.build_demo`.

Stages (in order; each needs the ones before it that it reads):
    world          rendered scenes: all shapes, each family alone, and two-object scenes (tensor files)
    classifier     the attribute classifier (scores everything after it)
    tokenizer      CLIP BPE trained on the captions
    vae            the VAE (f = 4 on a CPU, f = 2 on a GPU); its reconstructions are scored by the classifier; latent scale; latents
    base           text encoder + base U-Net on the whole world
    expert-curves, expert-blocks, expert-spikes    the base fine-tuned on one family each
    afa            the SABW aggregators of `trio` over the three experts (expert dropout)
    export         models/demo (trainer/export.py) + the classifier's ONNX for the evaluation

Every training stage has a time budget (trainer/demo_config.py), checkpoints every few minutes
and resumes where it stopped: run the command again and it continues with the unfinished stage.
A finished stage is never trained again unless `--extend STAGE=MIN` gives it more time (it goes
on from its checkpoint, or from its final weights after --unbundle; what depends on it is rebuilt).
State lives in trainer/runs/demo/ (state.json, one folder per stage, logs/<stage>.json and
build_log.md with losses, adherence measured by the classifier on sampled images, minutes and
the machine's load).

    python3 -m trainer.build_demo [--device cpu|cuda] [--stage NAME ...] [--smoke] [--redo]
                                  [--run-dir DIR] [--out DIR] [--time-scale X] [--threads N]
                                  [--skip NAME ...] [--bundle FILE.tar] [--unbundle FILE.tar]
                                  [--extend STAGE=MIN ...]

A bundle is a tar of the finished stages' products (weights in float16, tokenizer, logs, state),
without data, optimizer states or checkpoints: what a GPU host sends back, or what is committed so
that a new machine can go on (`--unbundle FILE --stage export` packages it). Missing world data
and latents are regenerated (deterministically) when a later stage needs them.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import datetime
import json
import math
import shutil
import tarfile
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from trainer import classifier as clf
from trainer import demo_config, shapes
from trainer.afa import AFAEnsemble, contribution_map
from trainer.bpe import CLIPTokenizer, train_bpe
from trainer.checkpoint_io import load_safetensors, load_safetensors_metadata, save_safetensors
from trainer.checkpointing import (latest_checkpoint, load_aggregators, load_text_encoder, load_unet, load_vae,
                                  save_vae)
from trainer.data import write_png
from trainer.eval_reference import write_reference
from trainer.routing_signal import routing_signal
from trainer.sampler import decode_latents, sample
from trainer.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.train import evaluating
from trainer.unet import UNet2DConditionModel, UNetConfig, count_parameters
from trainer.vae import AutoencoderKL, VAEConfig

FAMILIES = demo_config.FAMILY_IDS
EXPERT_STAGES = tuple(f"expert-{f}" for f in FAMILIES)
STAGES = ("world", "classifier", "tokenizer", "vae", "base") + EXPERT_STAGES + ("afa", "export")
DEPENDS = {
    "world": (),
    "classifier": (),
    "tokenizer": ("world",),
    "vae": ("world", "classifier"),
    "base": ("tokenizer", "vae"),
    **{s: ("base",) for s in EXPERT_STAGES},
    "afa": EXPERT_STAGES,
    "export": ("classifier", "afa"),
}
BUDGET_KEY = {"classifier": "classifier", "vae": "vae", "base": "base", "afa": "afa",
              **{s: "expert" for s in EXPERT_STAGES}}
WORLD_SETS = ("all",) + FAMILIES + ("pairs",)
CAPTION_SETS = ("all",) + FAMILIES  # the tokenizer's corpus (the pairs set only repeats its words)
BUNDLE_PATHS = ("state.json", "build_log.md", "build.log", "logs", "tokenizer", "classifier/classifier.pt",
                "world/preview.png", "vae/final", "base/final", "afa/final", "base/samples.png", "afa/samples.png") \
    + tuple(f"{s}/final" for s in EXPERT_STAGES) + tuple(f"{s}/samples.png" for s in EXPERT_STAGES)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_EVAL_SEED = 2**31 - 100


class TensorExamples:
    """(tensor, caption) pairs over one stacked tensor, as trainer.train's loops take them."""

    def __init__(self, tensors: torch.Tensor, captions: Sequence[str], transform: Optional[Callable] = None):
        if len(tensors) != len(captions):
            raise ValueError(f"{len(tensors)} tensors but {len(captions)} captions")
        self.tensors = tensors
        self.captions = list(captions)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        x = self.tensors[i]
        return (self.transform(x) if self.transform else x), self.captions[i]


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 [.., 3, H, W] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _flatten(prefix: str, d: Any, out: Dict[str, Any]) -> Dict[str, Any]:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = d
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


class DemoBuild:
    def __init__(self, recipe: Dict[str, Any], run_dir: str, out_dir: str, log: Callable[[str], None] = print):
        self.r = recipe
        self.device = torch.device(recipe["device"])
        self.cuda = self.device.type == "cuda"
        self.run_dir = os.path.abspath(run_dir)
        self.out_dir = os.path.abspath(out_dir)
        self._print = log
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        self.state_path = os.path.join(self.run_dir, "state.json")
        self.state: Dict[str, Any] = {"stages": {}}
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.state = json.load(f)
            previous = self.state.get("recipe", {})
            if previous and (previous.get("unet") != recipe["unet"] or previous.get("smoke") != recipe["smoke"]):
                self.log("warning: this run folder was started with another recipe (models differ); "
                         "use --redo or another --run-dir")
        self.state["recipe"] = recipe
        self._cache: Dict[str, Any] = {}
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    # -----------------------------------------------------------------------------------------
    # bookkeeping

    def log(self, text: str) -> None:
        self._print(text)
        with open(os.path.join(self.run_dir, "build.log"), "a") as f:
            f.write(text + "\n")

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def stage_state(self, name: str) -> Dict[str, Any]:
        return self.state["stages"].setdefault(name, {"status": "pending", "minutes": 0.0, "runs": []})

    def done(self, name: str) -> bool:
        return self.stage_state(name)["status"] == "done"

    def save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=2, default=float)
        os.replace(tmp, self.state_path)

    def budget_left(self, name: str) -> Optional[float]:
        key = BUDGET_KEY.get(name)
        if key is None:
            return None
        st = self.stage_state(name)
        total = float(st["extended_to"]) if "extended_to" in st else float(self.r[key]["minutes"])
        return max(0.0, total - float(st["minutes"]))

    @staticmethod
    def dependents(name: str) -> List[str]:
        """The stages that read `name`'s products, directly or through others (in build order)."""
        doomed = {name}
        for stage in STAGES:
            if any(d in doomed for d in DEPENDS[stage]):
                doomed.add(stage)
        return [s for s in STAGES if s in doomed and s != name]

    def _forget(self, stages: Sequence[str]) -> None:
        """Drops the stages' state and deletes their folders (checkpoints included, so nothing resumes)."""
        for stage in stages:
            self.state["stages"].pop(stage, None)
            folder = self.path(stage)
            if os.path.isdir(folder):
                shutil.rmtree(folder)
        self._cache.clear()
        self.save_state()

    def redo(self, name: str) -> None:
        """Forget a stage (and everything after it that depends on it) and delete its outputs."""
        self._forget([name] + self.dependents(name))

    def extend(self, name: str, minutes: float) -> None:
        """Gives a training stage `minutes` more: it goes on from its newest checkpoint, or from its
        final weights where there is none (after --unbundle on another machine). The stages that
        depend on it are forgotten, since they were trained on its old products."""
        if name not in BUDGET_KEY:
            raise ValueError(f"only training stages can be extended ({', '.join(BUDGET_KEY)}), got {name!r}")
        st = self.stage_state(name)
        if st["status"] == "pending":
            raise ValueError(f"stage {name!r} has not run yet: there is nothing to extend")
        st["status"] = "partial"
        st["extended_to"] = float(st["minutes"]) + float(minutes)
        self._forget(self.dependents(name))

    def continue_from(self, name: str) -> Optional[str]:
        """The final weights an extended stage starts from when it has no checkpoint to resume."""
        final = self.path(name, "final")
        st = self.stage_state(name)
        if "extended_to" in st and latest_checkpoint(self.path(name)) is None and os.path.isdir(final):
            self.log(f"{name}: no checkpoint here; going on from its final weights")
            return final
        return None

    def run(self, stages: Optional[Sequence[str]] = None) -> None:
        for name in stages or STAGES:
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
            if self.done(name):
                self.log(f"== {name}: done already")
                continue
            missing = [d for d in DEPENDS[name] if not self.done(d)]
            if missing:
                raise RuntimeError(f"stage {name!r} needs {', '.join(missing)} first")
            self.run_stage(name)
            if not self.done(name):
                self.log(f"== {name}: not finished (run again to resume); stopping here")
                return

    def run_stage(self, name: str) -> Dict[str, Any]:
        st = self.stage_state(name)
        budget = self.budget_left(name)
        self.log(f"== {name}: starting" + (f" ({budget:.2f} min of budget left)" if budget is not None else ""))
        load_before = os.getloadavg()
        started = time.monotonic()
        self._stage_started = started
        self._minutes_before = float(st["minutes"])
        method = getattr(self, "stage_" + name.split("-")[0])
        record = method(name.split("-")[1], budget) if name.startswith("expert-") else method(budget)
        minutes = (time.monotonic() - started) / 60
        st["minutes"] = self._minutes_before + minutes
        done = bool(record.pop("done"))
        st["status"] = "done" if done else "partial"
        record = {
            "stage": name, "finished": done, "minutes": round(minutes, 3), "minutes_total": round(st["minutes"], 3),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "device": str(self.device), "torch": torch.__version__, "when": datetime.datetime.now().isoformat(timespec="seconds"),
            **record,
        }
        st["runs"].append(record)
        self.save_state()
        with open(self.path("logs", f"{name}.json"), "w") as f:
            json.dump(st["runs"], f, indent=2, default=float)
        self.write_build_log()
        self.log(f"== {name}: {'done' if done else 'partial'} in {minutes:.2f} min")
        return record

    def _checkpoint_time(self, name: str) -> None:
        """Called at every checkpoint: counts the time spent so far, so a killed run is charged for it."""
        self.stage_state(name)["minutes"] = self._minutes_before + (time.monotonic() - self._stage_started) / 60
        self.save_state()

    def write_build_log(self) -> None:
        lines = ["# Demo build log", "",
                 f"Recipe: device {self.r['device']}, smoke {self.r['smoke']}, time scale {self.r['time_scale']}.",
                 "", "| stage | status | device | minutes | steps | loss (last) | measured | load (1/5/15 min) |",
                 "|---|---|---|---|---|---|---|---|"]
        for name in STAGES:
            st = self.state["stages"].get(name)
            if not st or not st["runs"]:
                continue
            last = st["runs"][-1]
            measured = _flatten("", last.get("measured", {}), {})
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in measured.items())
            signal = next((r["routing_signal"] for r in st["runs"] if r.get("routing_signal")), None)
            if signal:  # measured once, before the aggregators' first step
                shown += "; routing gain " + ", ".join(f"{f} {_fmt(v['gain'])}" for f, v in signal.items())
            recipe = last.get("recipe") or {}
            if recipe.get("routing_loss"):
                shown += (f"; routing loss {_fmt(recipe['routing_loss'])} (window {_fmt(recipe['routing_window'])}, "
                          f"temperature {_fmt(recipe['routing_temperature'])})")
            devices = "+".join(dict.fromkeys(str(r.get("device", "")) for r in st["runs"]))
            lines.append(f"| {name} | {st['status']} | {devices} | {st['minutes']:.2f} | {last.get('steps', '')} | "
                         f"{_fmt(last.get('loss_last', ''))} | {shown} | "
                         f"{'/'.join(str(x) for x in last['load_before'])} → {'/'.join(str(x) for x in last['load_after'])} |")
        with open(self.path("build_log.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    # -----------------------------------------------------------------------------------------
    # shared pieces

    def world(self, name: str) -> shapes.ShapesBatch:
        key = f"world:{name}"
        if key not in self._cache:
            path = self.path("world", f"{name}.pt")
            if not os.path.exists(path):
                self.log(f"world data {name} is missing: rendering it again")
                self.stage_world(None)
            self._cache[key] = shapes.load_dataset(path)
        return self._cache[key]

    def classifier(self) -> clf.AttributeClassifier:
        if "classifier" not in self._cache:
            self._cache["classifier"] = clf.load_classifier(self.path("classifier", "classifier.pt"), self.device)
        return self._cache["classifier"]

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_dir(self.path("tokenizer"))

    def vae(self) -> AutoencoderKL:
        if "vae" not in self._cache:
            self._cache["vae"] = load_vae(self.path("vae", "final"), self.device)
        return self._cache["vae"]

    def latents(self, name: str) -> TensorExamples:
        key = f"latents:{name}"
        if key not in self._cache:
            path = self.path("latents", f"{name}.pt")
            if not os.path.exists(path):
                self.log(f"latents {name} are missing: encoding the world data again")
                self.encode_latents(self.vae())
            blob = torch.load(path)
            self._cache[key] = TensorExamples(blob["latents"].to(self.device).float(), blob["captions"])
        return self._cache[key]

    def train_options(self, section: str, out_dir: str, minutes: Optional[float]) -> Dict[str, Any]:
        s = self.r[section]
        opts = {
            "batch_size": s["batch_size"], "lr": s["lr"], "warmup_steps": s.get("warmup_steps", 0),
            "grad_clip": s.get("grad_clip"), "ema_decay": s.get("ema_decay"), "seed": self.r["seed"],
            "device": str(self.device), "out_dir": out_dir, "checkpoint_minutes": self.r["checkpoint_minutes"],
            "max_minutes": minutes, "log_every": 100 if self.cuda else 20, "amp_bf16": self.cuda,
        }
        if self.r["smoke"]:
            opts["log_every"] = 1
        return opts

    def eval_batch(self, families: Optional[Sequence[str]], n: int, two_object_prob: float = 0.3,
                   seed_offset: int = 0) -> shapes.ShapesBatch:
        e = self.r["eval"]
        return shapes.sample_batch(n, e["seed"] + seed_offset, families=families, two_object_prob=two_object_prob,
                                   omit_prob=self.r["world"]["omit_prob"])

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, text_encoder: CLIPTextEncoder, tokenizer: CLIPTokenizer,
                 captions: Sequence[str], seed: int, ensemble: bool = False):
        """Sampled images (uint8 [B,3,64,64]) for captions, and the AFA contributions [B,N,h,w] (or None)."""
        dev = self.device
        e = self.r["eval"]
        vae = self.vae()
        hidden, pooled = (t.float() for t in text_encoder(tokenizer(list(captions)).to(dev)))
        uncond, uncond_pooled = (t.float() for t in text_encoder(tokenizer([""]).to(dev)))
        unet = model.unets[0] if ensemble else model
        side = shapes.IMAGE_SIZE // vae.config.downsample_factor
        batch = len(captions)
        # the sampler runs the guided batch as [uncond; cond]: pooled text must follow the same order
        guided_pooled = torch.cat([uncond_pooled.expand(batch, -1), pooled])

        def class_labels(rows: int):
            if unet.class_embedding is None:
                return None
            return guided_pooled if rows == 2 * batch else pooled

        if ensemble:
            n = model.num_experts
            hidden = hidden[None].expand(n, -1, -1, -1)
            uncond = uncond[None].expand(n, -1, -1, -1)

            def denoiser(x, t, text):
                out, weights = model(x.to(dev), t.to(dev), text, class_labels=class_labels(x.shape[0]))
                return out.float().cpu(), contribution_map([w.float() for w in weights], x.shape[-2:]).cpu()
        else:
            def denoiser(x, t, text):
                return model(x.to(dev), t.to(dev), text, None, class_labels(x.shape[0])).float().cpu()

        result = sample(denoiser, hidden, uncond, latent_shape=[len(captions), unet.config.in_channels, side, side],
                        seed=seed, steps=e["steps"], guidance=e["guidance"], scheduler="ddim",
                        scheduler_config=self.r["scheduler"])
        images = decode_latents(lambda z: vae.decode(z.to(dev)).float().cpu(), result.latents,
                                float(vae.config.scaling_factor))
        return images.permute(0, 3, 1, 2).contiguous(), result.contributions

    def adherence(self, model, text_encoder, tokenizer, batch: shapes.ShapesBatch, ensemble: bool = False,
                  seed: int = 0) -> Dict[str, Any]:
        with evaluating(model, text_encoder):
            images, contributions = self.generate(model, text_encoder, tokenizer, batch.captions, seed, ensemble)
        classifier = self.classifier()
        pred = clf.predict(classifier, images)
        scores = clf.adherence(pred, batch)
        rendered = clf.predict(classifier, batch.images)["features"].numpy()
        scores["frechet"] = clf.frechet_distance(pred["features"].numpy(), rendered)
        out = {k: round(v, 4) for k, v in scores.items()}
        if contributions is not None:
            out["routing"] = routing_share(contributions, batch)
        self._last_images = images
        return out

    # -----------------------------------------------------------------------------------------
    # bundles

    def write_bundle(self, path: str) -> List[str]:
        """Writes the finished products (BUNDLE_PATHS that exist) to a tar, weights in float16."""
        added: List[str] = []
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(path, "w") as tar:
            for rel in BUNDLE_PATHS:
                full = self.path(rel)
                files = [full] if os.path.isfile(full) else [
                    os.path.join(root, f) for root, _, names in os.walk(full) for f in sorted(names)]
                for file in files:
                    arcname = os.path.relpath(file, self.run_dir)
                    converted = _convert_weights(file, os.path.join(tmp, "w"), torch.float16)
                    tar.add(converted or file, arcname=arcname)
                    added.append(arcname)
        return added

    def read_bundle(self, path: str) -> List[str]:
        """Unpacks a bundle into the run folder (weights back to float32) and reloads its state."""
        names: List[str] = []
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name.startswith("/") or ".." in member.name.split("/"):
                    continue
                tar.extract(member, tmp)
                source = os.path.join(tmp, member.name)
                target = self.path(member.name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                converted = _convert_weights(source, os.path.join(tmp, "w"), torch.float32)
                shutil.copyfile(converted or source, target)
                names.append(member.name)
        with open(self.state_path) as f:
            state = json.load(f)
        state["recipe"] = self.r
        self.state = state
        self._cache.clear()
        self.save_state()
        return names

    # -----------------------------------------------------------------------------------------
    # stages

    def stage_world(self, _budget) -> Dict[str, Any]:
        w = self.r["world"]
        os.makedirs(self.path("world"), exist_ok=True)
        counts = {}
        captions: List[str] = []
        for i, name in enumerate(WORLD_SETS):
            n = {"all": w["n_all"], "pairs": w["n_pairs"]}.get(name, w["n_family"])
            families = None if name in ("all", "pairs") else [name]
            two_object_prob = 1.0 if name == "pairs" else w["two_object_prob"]
            seed = self.r["seed"] * 1_000_000 + (i + 1) * 10_000
            batch = shapes.build_dataset(self.path("world", f"{name}.pt"), n, seed, families, two_object_prob,
                                         w["omit_prob"], device=self.device if self.cuda else None)
            counts[name] = len(batch)
            if name in CAPTION_SETS:
                captions += batch.captions
            if name == "all":
                preview = batch.images[:32].permute(0, 2, 3, 1).numpy()
                rows = [np.concatenate(list(preview[r * 8:(r + 1) * 8]), axis=1) for r in range(len(preview) // 8)]
                if rows:
                    write_png(self.path("world", "preview.png"), np.concatenate(rows, axis=0))
        with open(self.path("world", "captions.txt"), "w") as f:
            f.write("\n".join(captions) + "\n")
        two = float((self.world("all").num_objects == 2).float().mean())
        return {"done": True, "measured": {"scenes": counts, "two_object_share": round(two, 3),
                                           "distinct_captions": len(set(captions))}}

    def stage_classifier(self, budget: float) -> Dict[str, Any]:
        c = self.r["classifier"]
        os.makedirs(self.path("classifier"), exist_ok=True)
        torch.manual_seed(self.r["seed"])
        model = clf.AttributeClassifier(clf.ClassifierConfig(**c["config"]))
        result = clf.train_classifier(
            model, steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"], seed=self.r["seed"], device=self.device,
            two_object_prob=c["two_object_prob"], max_minutes=budget,
            checkpoint_path=self.path("classifier", "train_state.pt"),
            checkpoint_every_s=60 * self.r["checkpoint_minutes"], eval_n=c["eval_n"], log=self.log,
            use_autocast=self.cuda)
        clf.save_classifier(model, self.path("classifier", "classifier.pt"), {"accuracy": result.accuracy})
        self._cache.pop("classifier", None)
        done = result.steps >= c["steps"] or self._spent(budget)
        return {"done": done, "steps": result.steps, "parameters": count_parameters(model),
                "loss_last": float(np.mean(result.losses[-50:])) if result.losses else None,
                "measured": {"accuracy_on_renders": {k: round(v, 4) for k, v in result.accuracy.items()}}}

    def _spent(self, budget: Optional[float]) -> bool:
        """Whether this call used (nearly) all of the stage's remaining budget."""
        if budget is None:
            return False
        return (time.monotonic() - self._stage_started) / 60 >= budget - 0.05

    def stage_tokenizer(self, _budget) -> Dict[str, Any]:
        if not os.path.exists(self.path("world", "captions.txt")):
            self.log("world captions are missing: rendering the world again")
            self.stage_world(None)
        with open(self.path("world", "captions.txt")) as f:
            captions = [line.rstrip("\n") for line in f if line.strip()]
        vocab, merges = train_bpe(captions, self.r["tokenizer"]["vocab_size"], self.path("tokenizer"))
        tok = self.tokenizer()
        lengths = [len(tok.encode(c)) for c in captions[:2000]]
        words = sorted({w for c in captions for w in c.replace(",", " ,").split()})
        split_words = [w for w in words if len(tok.encode(w)) > 1]
        return {"done": True, "measured": {"vocab": len(vocab), "merges": len(merges),
                                           "max_tokens": max(lengths), "words_not_one_token": len(split_words)}}

    def stage_vae(self, budget: float) -> Dict[str, Any]:
        from trainer.train import train_vae

        v = self.r["vae"]
        torch.manual_seed(self.r["seed"])
        earlier = self.continue_from("vae")
        vae = load_vae(earlier, self.device) if earlier else AutoencoderKL(VAEConfig(**v["config"]))
        world = self.world("all")
        images = world.images.to(self.device) if self.cuda else world.images
        data = TensorExamples(images, world.captions, to_signed)
        held_out = shapes.sample_batch(v["eval_n"], VAE_EVAL_SEED, two_object_prob=0.3)

        def evaluate(step: int) -> Dict[str, Any]:
            self._checkpoint_time("vae")
            return self.vae_reconstruction(vae, held_out)

        opts = self.train_options("vae", self.path("vae"), budget)
        opts.pop("ema_decay", None)
        result = train_vae(vae, data, v["steps"], kl_weight=v["kl_weight"], evaluate=evaluate, **opts)
        done = result.completed or self._spent(budget)
        record = {"done": done, "steps": result.step, "parameters": count_parameters(vae),
                  "loss_last": float(np.mean(result.losses[-50:])) if result.losses else None}
        measured = dict(result.evaluations[-1][1]) if result.evaluations else {}
        if done:
            self._cache.pop("vae", None)
            final = load_vae(self.path("vae", "final"), self.device)
            final.config.scaling_factor = self.latent_scale(final, world, v["scale_samples"])
            save_vae(final, self.path("vae", "final", "vae"))
            self._cache["vae"] = final
            measured["scaling_factor"] = round(final.config.scaling_factor, 5)
            self.encode_latents(final)
        record["measured"] = measured
        return record

    @torch.no_grad()
    def vae_reconstruction(self, vae: AutoencoderKL, batch: shapes.ShapesBatch) -> Dict[str, Any]:
        """The classifier's accuracy on VAE reconstructions of renders: the cap on what any model
        trained on these latents can draw."""
        x = to_signed(batch.images).to(self.device)
        mean, _ = vae.encode(x)
        recon = vae.decode(mean).float()
        mse = float(torch.mean((recon.clamp(-1, 1) - x) ** 2))
        images = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        rebuilt = shapes.ShapesBatch(images=images, captions=batch.captions,
                                     **{k: getattr(batch, k) for k in shapes.LABEL_FIELDS})
        acc = clf.evaluate(self.classifier(), rebuilt)
        return {"recon_mse": round(mse, 5), **{f"recon_{k}": round(a, 4) for k, a in acc.items()}}

    @torch.no_grad()
    def latent_scale(self, vae: AutoencoderKL, world: shapes.ShapesBatch, n: int) -> float:
        """1 / std of the latents (as SD's 0.18215 was found), so diffusion sees unit-variance data."""
        x = to_signed(world.images[:n]).to(self.device)
        means = torch.cat([vae.encode(x[i:i + 512])[0].float() for i in range(0, len(x), 512)])
        return float(1.0 / means.std())

    @torch.no_grad()
    def encode_latents(self, vae: AutoencoderKL) -> None:
        os.makedirs(self.path("latents"), exist_ok=True)
        scale = float(vae.config.scaling_factor)
        for name in WORLD_SETS:
            done = self.path("latents", f"{name}.pt")
            if os.path.exists(done) and os.path.getmtime(done) > os.path.getmtime(self.path("vae", "final")):
                continue  # encoded by this VAE already (e.g. before an interruption)
            world = self.world(name)
            torch.save({"latents": self.encode_images(vae, world.images).half(), "captions": world.captions,
                        "scaling_factor": scale}, self.path("latents", f"{name}.pt"))

    @torch.no_grad()
    def encode_images(self, vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] images → scaled latents (the posterior means, float32 on the CPU), 512 at a time."""
        scale = float(vae.config.scaling_factor)
        return torch.cat([(vae.encode(to_signed(images[i:i + 512]).to(self.device))[0].float() * scale).cpu()
                          for i in range(0, len(images), 512)])

    def stage_base(self, budget: float) -> Dict[str, Any]:
        from trainer.train import train_unet

        tok = self.tokenizer()
        torch.manual_seed(self.r["seed"])
        earlier = self.continue_from("base")
        if earlier:
            unet, text_encoder = load_unet(earlier), load_text_encoder(earlier)
        else:
            te_config = TextEncoderConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.eos_token_id, **self.r["text_encoder"])
            text_encoder = CLIPTextEncoder(te_config)
            unet_config = dict(self.r["unet"], cross_attention_dim=te_config.hidden_size)
            if unet_config.get("class_embed_type") == "projection":
                unet_config["projection_class_embeddings_input_dim"] = te_config.hidden_size
            unet = UNet2DConditionModel(UNetConfig(**unet_config))
        eval_all = self.eval_batch(None, self.r["eval"]["n"])

        def evaluate(step: int) -> Dict[str, Any]:
            self._checkpoint_time("base")
            return {"all": self.adherence(unet, text_encoder, tok, eval_all)}

        d = self.r["diffusion"]
        b = self.r["base"]
        result = train_unet(unet, text_encoder, tok, self.latents("all"), b["steps"],
                            scheduler_config=self.r["scheduler"], snr_weighting=d["snr_weighting"],
                            snr_gamma=d["snr_gamma"], caption_dropout=d["caption_dropout"], train_text_encoder=True,
                            text_encoder_lr=b["text_encoder_lr"], evaluate=evaluate,
                            **self.train_options("base", self.path("base"), budget))
        self._save_samples("base")
        return self._training_record(result, budget, {"unet": count_parameters(unet),
                                                      "text_encoder": count_parameters(text_encoder)})

    def _training_record(self, result, budget: float, parameters: Dict[str, int]) -> Dict[str, Any]:
        return {"done": result.completed or self._spent(budget), "steps": result.step, "parameters": parameters,
                "loss_last": float(np.mean(result.losses[-50:])) if result.losses else None,
                "loss_first": float(np.mean(result.losses[:50])) if result.losses else None,
                "measured": dict(result.evaluations[-1][1]) if result.evaluations else {},
                "evaluations": [{"step": s, **e} for s, e in result.evaluations]}

    def _save_samples(self, name: str) -> None:
        images = getattr(self, "_last_images", None)
        if images is None or len(images) == 0:
            return
        pixels = images[:16].permute(0, 2, 3, 1).numpy()
        per_row = min(8, len(pixels))
        rows = [np.concatenate(list(pixels[r * per_row:(r + 1) * per_row]), axis=1)
                for r in range(len(pixels) // per_row)]
        write_png(self.path(name, "samples.png"), np.concatenate(rows, axis=0))

    def stage_expert(self, family: str, budget: float) -> Dict[str, Any]:
        from trainer.train import train_unet

        name = f"expert-{family}"
        tok = self.tokenizer()
        unet = load_unet(self.continue_from(name) or self.path("base", "final"))
        text_encoder = load_text_encoder(self.path("base", "final"))
        n = self.r["eval"]["n"]
        eval_family = self.eval_batch([family], n, seed_offset=1)
        eval_all = self.eval_batch(None, max(2, n // 2))

        def evaluate(step: int) -> Dict[str, Any]:
            self._checkpoint_time(name)
            return {"all": self.adherence(unet, text_encoder, tok, eval_all),
                    "family": self.adherence(unet, text_encoder, tok, eval_family)}

        d = self.r["diffusion"]
        result = train_unet(unet, text_encoder, tok, self.latents(family), self.r["expert"]["steps"],
                            scheduler_config=self.r["scheduler"], snr_weighting=d["snr_weighting"],
                            snr_gamma=d["snr_gamma"], caption_dropout=d["caption_dropout"], train_text_encoder=False,
                            evaluate=evaluate, **self.train_options("expert", self.path(name), budget))
        self._save_samples(name)
        return self._training_record(result, budget, {"unet": count_parameters(unet)})

    def load_experts(self) -> List[UNet2DConditionModel]:
        return [load_unet(self.path(f"expert-{f}", "final")) for f in FAMILIES]

    def afa_examples(self) -> TensorExamples:
        """The aggregators' training scenes: the whole world plus the two-object set, since only scenes
        with objects of two families reward routing by place rather than by prompt."""
        sets = [self.latents("all"), self.latents("pairs")]
        return TensorExamples(torch.cat([s.tensors for s in sets]), [c for s in sets for c in s.captions])

    def build_ensemble(self, experts: Sequence[UNet2DConditionModel]) -> AFAEnsemble:
        a = self.r["afa"]
        torch.manual_seed(self.r["seed"])
        return AFAEnsemble(list(experts), hidden=a["hidden"], depth=a["depth"], heads=a["heads"], head_dim=a["head_dim"])

    def stage_afa(self, budget: float) -> Dict[str, Any]:
        from trainer.train import train_afa

        tok = self.tokenizer()
        text_encoder = load_text_encoder(self.path("base", "final"))
        ensemble = self.build_ensemble(self.load_experts()).to(self.device)
        earlier = self.continue_from("afa")
        signal = None
        if earlier:
            load_aggregators(ensemble, earlier)
        else:  # fresh aggregators are uniform: what routing could gain over them
            signal = routing_signal(ensemble, text_encoder, tok, {f: self.latents(f) for f in FAMILIES},
                                    list(FAMILIES), self.r["scheduler"], self.r["afa"]["signal_n"])
            self.log("routing signal (own expert vs uniform ensemble loss): " + ", ".join(
                f"{f} {s['own']:.4f} vs {s['uniform']:.4f} (gain {s['gain']:.1%})" for f, s in signal.items()))
        n = self.r["eval"]["n"]
        eval_all = self.eval_batch(None, n, seed_offset=2)
        eval_pairs = cross_family_pairs(self.eval_batch(None, max(4, n // 2), two_object_prob=1.0, seed_offset=3))

        def evaluate(step: int) -> Dict[str, Any]:
            self._checkpoint_time("afa")
            out = {"all": self.adherence(ensemble, text_encoder, tok, eval_all, ensemble=True)}
            if len(eval_pairs):
                out["pairs"] = self.adherence(ensemble, text_encoder, tok, eval_pairs, ensemble=True)
            return out

        a = self.r["afa"]
        d = self.r["diffusion"]
        result = train_afa(ensemble, text_encoder, tok, self.afa_examples(), a["steps"],
                           scheduler_config=self.r["scheduler"], caption_dropout=a["caption_dropout"],
                           expert_dropout=a["expert_dropout"], expert_min_keep=a["expert_min_keep"],
                           snr_weighting=d["snr_weighting"], snr_gamma=d["snr_gamma"], expert_ids=list(FAMILIES),
                           routing_loss=a["routing_loss"], routing_window=a["routing_window"],
                           routing_temperature=a["routing_temperature"], evaluate=evaluate,
                           **self.train_options("afa", self.path("afa"), budget))
        self._save_samples("afa")
        record = self._training_record(result, budget, {"aggregators": ensemble.count_parameters()})
        record["recipe"] = {k: a[k] for k in ("batch_size", "lr", "routing_loss", "routing_window", "routing_temperature")}
        if signal is not None:
            record["routing_signal"] = signal
        return record

    def stage_export(self, _budget) -> Dict[str, Any]:
        from trainer.export import EnsembleSpec, save_package

        torch.set_grad_enabled(False)
        try:
            text_encoder = load_text_encoder(self.path("base", "final"))
            vae = load_vae(self.path("vae", "final"))
            experts = dict(zip(FAMILIES, self.load_experts()))
            ensemble = self.build_ensemble(list(experts.values()))
            load_aggregators(ensemble, self.path("afa", "final"))
            package = dict(self.r["package"])
            package["experts"] = {f: {"title": demo_config.EXPERT_TEXT[f][0], "description": demo_config.EXPERT_TEXT[f][1]}
                                  for f in FAMILIES}
            spec = EnsembleSpec(ensemble.eval(), list(FAMILIES), subsets=True, title="Trio (AFA)",
                                description="curves, blocks and spikes fused per pixel by a trained SABW aggregator; "
                                            "any two of them also work")
            ex = self.r["export"]
            result = save_package(self.out_dir, self.path("tokenizer"), text_encoder.eval(), vae.eval(), experts,
                                  {"trio": spec}, self.r["scheduler"], package, fp16=ex["fp16"], check=ex["check"],
                                  log=self.log)
            classifier = clf.load_classifier(self.path("classifier", "classifier.pt"))
            blob = torch.load(self.path("classifier", "classifier.pt"))
            clf.export_classifier_onnx(classifier, os.path.join(self.out_dir, "eval", "classifier.onnx"),
                                       accuracy=blob.get("accuracy"), fp16=ex["fp16"])
            torch.manual_seed(self.r["seed"])
            write_reference(classifier, os.path.join(self.out_dir, "eval"), **self.r["reference"])
        finally:
            torch.set_grad_enabled(True)
        self.write_build_log()
        shutil.copyfile(self.path("build_log.md"), os.path.join(self.out_dir, "eval", "build_log.md"))
        sizes = {}
        for root, _, files in os.walk(self.out_dir):
            for f in files:
                sizes[os.path.relpath(os.path.join(root, f), self.out_dir)] = os.path.getsize(os.path.join(root, f))
        return {"done": True, "measured": {"package_mb": round(sum(sizes.values()) / 2**20, 2),
                                           "graphs": len(result.reports)},
                "files": sizes}


def _convert_weights(path: str, tmp: str, dtype: torch.dtype) -> Optional[str]:
    """A copy of a weight file (.safetensors, or the classifier's .pt) with floating tensors in
    `dtype`, written to `tmp`; None for other files."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if path.endswith(".safetensors"):
        tensors = {k: cast(v) for k, v in load_safetensors(path).items()}
        save_safetensors(tensors, tmp, load_safetensors_metadata(path))
        return tmp
    if os.path.basename(path) == "classifier.pt":
        blob = torch.load(path)
        blob["state_dict"] = {k: cast(v) for k, v in blob["state_dict"].items()}
        torch.save(blob, tmp)
        return tmp
    return None


def cross_family_pairs(batch: shapes.ShapesBatch) -> shapes.ShapesBatch:
    """The two-object scenes of a batch whose objects come from different families."""
    family_of_shape = torch.tensor([FAMILIES.index(shapes.family_of(s)) for s in shapes.SHAPES])
    pair = batch.num_objects == 2
    left = family_of_shape[batch.shape[:, 0].clamp(min=0)]
    right = family_of_shape[batch.shape[:, 1].clamp(min=0)]
    keep = (pair & (left != right)).nonzero().squeeze(1)
    return batch.select(keep)


def routing_share(contributions: torch.Tensor, batch: shapes.ShapesBatch) -> Optional[float]:
    """Mean weight that the expert of each object's family carries in that object's half, over the
    cross-family two-object scenes of the batch (None when there are none)."""
    family_of_shape = torch.tensor([FAMILIES.index(shapes.family_of(s)) for s in shapes.SHAPES])
    shares = []
    mid = contributions.shape[-1] // 2
    for b in range(len(batch)):
        if int(batch.num_objects[b]) != 2:
            continue
        fam = [int(family_of_shape[int(batch.shape[b, k])]) for k in range(2)]
        if fam[0] == fam[1]:
            continue
        stated_pos = bool(batch.stated[b, 0, shapes.ATTRIBUTES.index("position")])
        if not stated_pos:
            continue  # without stated positions the model may place either object on either side
        shares.append(float(contributions[b, fam[0], :, :mid].mean()))
        shares.append(float(contributions[b, fam[1], :, mid:].mean()))
    return round(float(np.mean(shares)), 4) if shares else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the demo model zoo (models/demo) stage by stage.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    parser.add_argument("--skip", action="append", choices=STAGES, default=[], help="leave this stage out (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps per stage (pipeline check)")
    parser.add_argument("--redo", action="store_true", help="forget the --stage stages (and what depends on them) first")
    parser.add_argument("--run-dir", help="state folder (default trainer/runs/demo, or demo-smoke with --smoke)")
    parser.add_argument("--out", help="package folder (default models/demo; with --smoke <run-dir>/package)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every stage's time budget")
    parser.add_argument("--minutes", action="append", default=[], metavar="STAGE=MIN",
                        help="set one stage's total time budget (classifier, vae, base, expert, afa); repeatable")
    parser.add_argument("--extend", action="append", default=[], metavar="STAGE=MIN",
                        help="give a finished training stage MIN more minutes (it goes on from where it ended; "
                             "the stages after it are built again); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="override one recipe value, e.g. afa.routing_loss=0.05; repeatable")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--bundle", help="afterwards, write the finished products to this tar (float16 weights)")
    parser.add_argument("--unbundle", help="first, unpack a bundle into the run folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    recipe = demo_config.recipe(args.device, args.smoke, args.time_scale)
    for item in args.minutes:
        key, _, value = item.partition("=")
        if key not in ("classifier", "vae", "base", "expert", "afa") or not value:
            parser.error(f"--minutes takes STAGE=MIN with STAGE one of classifier, vae, base, expert, afa (got {item!r})")
        recipe[key]["minutes"] = float(value)
    for item in args.set:
        path, _, value = item.partition("=")
        section, _, key = path.partition(".")
        if not isinstance(recipe.get(section), dict) or key not in recipe[section] or not value:
            parser.error(f"--set takes SECTION.KEY=JSON for a key the recipe has (got {item!r})")
        try:
            recipe[section][key] = json.loads(value)
        except json.JSONDecodeError as err:
            parser.error(f"--set {item}: {value!r} is not JSON ({err})")
    run_dir = args.run_dir or os.path.join(REPO_ROOT, "trainer", "runs", "demo-smoke" if args.smoke else "demo")
    out = args.out or (os.path.join(run_dir, "package") if args.smoke else os.path.join(REPO_ROOT, "models", "demo"))
    build = DemoBuild(recipe, run_dir, out)
    if args.redo and not args.stage:
        parser.error("--redo needs --stage")
    if args.unbundle:  # before --redo, so that a bundled stage can be trained again
        build.log(f"unpacked {len(build.read_bundle(args.unbundle))} files from {args.unbundle}")
    if args.redo:
        for name in args.stage:
            build.redo(name)
    for item in args.extend:
        key, _, value = item.partition("=")
        try:
            build.extend(key, float(value))
        except ValueError as err:
            parser.error(f"--extend {item}: {err}")
        build.log(f"{key}: {float(value):g} more minutes; {', '.join(build.dependents(key))} will be built again")
    started = time.monotonic()
    try:
        build.run([s for s in (args.stage or STAGES) if s not in args.skip])
        build.log(f"build: {(time.monotonic() - started) / 60:.2f} min this run; log in {build.path('build_log.md')}")
    finally:
        if args.bundle:  # also after a failure: what is finished is kept
            build.log(f"bundled {len(build.write_bundle(args.bundle))} files into {args.bundle}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
