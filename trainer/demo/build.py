"""Builds the demo model zoo from nothing, stage by stage: `python3 -m trainer.build_demo`.

This module keeps the build's state and decides what runs when; the stages themselves are in
trainer.demo.stages, what they read back from the run folder in trainer.demo.products.

Stages (in order; each needs the ones before it that it reads):
    world          rendered scenes: all shapes, each family alone, and two-object scenes (tensor files)
    classifier     the attribute classifier (scores everything after it)
    tokenizer      CLIP BPE trained on the captions
    vae            the VAE (f = 4 on a CPU, f = 2 on a GPU); its reconstructions are scored by the classifier; latent scale; latents
    base           text encoder + base U-Net on the whole world
    expert-curves, expert-blocks, expert-spikes    the base fine-tuned on one family each
    afa            the SABW aggregators of `trio` over the three experts (expert dropout)
    export         models/demo (trainer/export/) + the classifier's ONNX for the evaluation

Every training stage has a time budget (trainer/demo/recipe.py), checkpoints every few minutes
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
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from trainer import REPO_ROOT
from trainer.demo import bundle
from trainer.demo import recipe as demo_recipe
from trainer.demo.products import RunProducts
from trainer.demo.recipe import FAMILY_IDS
from trainer.demo.stages import STAGE_FUNCTIONS, StageRun
from trainer.io.training_checkpoints import latest_checkpoint

EXPERT_STAGES = tuple(f"expert-{f}" for f in FAMILY_IDS)
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
    """A build in a run folder: its state (state.json), logs, and which stage runs next."""

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
        self.products = RunProducts(recipe, self.run_dir, self.device, self.log)
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
        self.products.clear()
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
        minutes_before = float(st["minutes"])

        def charge_time() -> None:
            """Counts the time spent so far, so that a killed run is charged for it."""
            self.stage_state(name)["minutes"] = minutes_before + (time.monotonic() - started) / 60
            self.save_state()

        run = StageRun(name=name, recipe=self.r, products=self.products, out_dir=self.out_dir, budget=budget,
                       continue_from=self.continue_from(name) if name in BUDGET_KEY else None,
                       charge_time=charge_time, write_build_log=self.write_build_log, log=self.log, started=started)
        record = STAGE_FUNCTIONS[name.split("-")[0]](run)
        minutes = (time.monotonic() - started) / 60
        st["minutes"] = minutes_before + minutes
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
    # bundles

    def write_bundle(self, path: str) -> List[str]:
        """Writes the finished products to a tar (trainer.demo.bundle), weights in float16."""
        return bundle.write_bundle(self.run_dir, path)

    def read_bundle(self, path: str) -> List[str]:
        """Unpacks a bundle into the run folder (weights back to float32) and reloads its state."""
        names = bundle.read_bundle(self.run_dir, path)
        with open(self.state_path) as f:
            state = json.load(f)
        state["recipe"] = self.r
        self.state = state
        self.products.clear()
        self.save_state()
        return names


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
    recipe = demo_recipe.recipe(args.device, args.smoke, args.time_scale)
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
