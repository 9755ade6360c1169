"""The training loop every objective runs: AdamW with warm-up, gradient clipping, EMA, checkpoints
(resume), a time budget, progress lines and evaluations.

Every random draw of a step (caption alternatives, caption dropout, VAE posterior noise, diffusion
noise, timesteps, expert masks) comes from one CPU generator seeded with `seed`, and the batch of
step s is a function of (seed, s); the generator is checkpointed, so k steps + resume to 2k equals
2k straight, bit for bit on the CPU. On CUDA (checked on an H200, torch 2.11) plain runs differ
from each other in the last bits (atomic adds in backward kernels, ~1e-5 after a few steps);
`deterministic` selects deterministic kernels for runs that must match exactly.

evaluate(step) -> dict | None, when given, runs at every checkpoint (checkpoint_every,
checkpoint_minutes, a budget stop; also without out_dir) and at the end, with the EMA weights
applied and the trained modules in eval mode; what it returns goes to metrics.jsonl and
TrainResult.evaluations. Training state is untouched by it: it may use torch's global RNG freely.

Outputs in out_dir: checkpoints/step-XXXXXXXX/ (see trainer.io.training_checkpoints), metrics.jsonl
(one JSON object per progress line and per evaluation), run_config.json, and final/ with unet/,
text_encoder/, vae/, afa/, scheduler/, tokenizer/ as trained (EMA weights when EMA is on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.io.training_checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.training.data import Example, StepBatches
from trainer.training.objectives import Objective
from trainer.training.options import Evaluate, TrainOptions, TrainResult, resolve_device
from trainer.training.progress import Progress


# ---------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of named parameters, kept in float32."""

    def __init__(self, named_parameters: Mapping[str, nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.parameters = dict(named_parameters)
        self.shadow = {k: p.detach().float().clone() for k, p in self.parameters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, p in self.parameters.items():
            self.shadow[key].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    def state_dict(self) -> Dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        for key in self.shadow:
            self.shadow[key] = state[key].to(self.shadow[key].device, torch.float32).clone()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration of the block."""
        backup = {k: p.detach().clone() for k, p in self.parameters.items()}
        with torch.no_grad():
            for key, p in self.parameters.items():
                p.copy_(self.shadow[key].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for key, p in self.parameters.items():
                    p.copy_(backup[key])


# ---------------------------------------------------------------------------------------------
# eval mode


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """The modules in eval mode for the duration of the block, then back in the mode each had."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


# ---------------------------------------------------------------------------------------------
# the loop


def _make_deterministic(device: torch.device) -> None:
    """Process-wide: cuBLAS workspace config, deterministic cuDNN and deterministic scatter/index kernels.
    Without it CUDA runs differ in the last bits (atomic adds), so a resumed run only approximates."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _autocast(options: TrainOptions, device: torch.device):
    if options.amp_bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_RESUME_NEUTRAL = {"steps", "out_dir", "resume", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
                   "max_minutes", "log_every", "quiet", "device", "compile", "amp_bf16", "deterministic"}


def _warn_changed_options(saved: Mapping[str, Any], options: TrainOptions) -> None:
    current = dataclasses.asdict(options)
    changed = [f"{k}: {saved[k]!r} → {v!r}" for k, v in current.items()
               if k in saved and k not in _RESUME_NEUTRAL and saved[k] != (list(v) if isinstance(v, tuple) else v)]
    if changed:
        warnings.warn("resuming with changed options (the result will differ from an uninterrupted run): "
                      + "; ".join(changed))


class _MetricsLog:
    def __init__(self, out_dir: Optional[str]):
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_training(objective: Objective, data: Sequence[Example], options: TrainOptions,
                 evaluate: Optional[Evaluate] = None, config: Optional[Mapping[str, Any]] = None) -> TrainResult:
    """The shared loop: AdamW, warm-up, clipping, EMA, checkpoints, budget, progress, evaluation."""
    with torch.enable_grad():  # whatever grad mode the caller left behind
        return _run_training(objective, data, options, evaluate, config)


def _run_training(objective: Objective, data: Sequence[Example], options: TrainOptions,
                  evaluate: Optional[Evaluate], config: Optional[Mapping[str, Any]]) -> TrainResult:
    device = resolve_device(options.device)
    if options.deterministic:
        _make_deterministic(device)
    out_dir = options.out_dir
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(options.seed)
    groups = objective.param_groups(options.lr)
    for group in groups:
        group["base_lr"] = group["lr"]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=options.adam_betas, eps=options.adam_eps,
                                  weight_decay=options.weight_decay)
    ema = EMA(objective.named_trainable(), options.ema_decay) if options.ema_decay else None
    run_config = {**dict(config or {}), "options": dataclasses.asdict(options)}
    say = (lambda text: None) if options.quiet else (lambda text: print(text, flush=True))

    start_step = 0
    checkpoint: Optional[str] = None
    if out_dir and options.resume:
        path = options.resume if isinstance(options.resume, str) else latest_checkpoint(out_dir)
        if path:
            loaded = load_checkpoint(path, objective.modules, optimizer, generator)
            start_step, checkpoint = loaded.step, path
            _warn_changed_options(loaded.config.get("options", {}), options)
            if ema is not None:
                if loaded.ema_state is None:
                    warnings.warn(f"{path} has no EMA weights; the EMA starts from the resumed weights")
                    ema = EMA(objective.named_trainable(), options.ema_decay)
                else:
                    ema.load_state_dict(loaded.ema_state)
            say(f"resumed from {path} at step {start_step}")
    if out_dir:
        with open(os.path.join(out_dir, "run_config.json"), "w") as f:
            json.dump(json.loads(json.dumps(run_config, default=repr)), f, indent=2)
            f.write("\n")

    batches = StepBatches(data, options.batch_size, options.seed)
    budget = options.max_minutes * 60 if options.max_minutes is not None else None
    progress = Progress(options.steps, start_step, every=options.log_every, budget_seconds=budget,
                        stream=None if options.quiet else sys.stdout)
    metrics = _MetricsLog(out_dir)
    result = TrainResult(step=start_step, start_step=start_step, completed=start_step >= options.steps,
                         stopped_by_budget=False, losses=[], checkpoint=checkpoint, final_dir=None)

    def save(step: int) -> None:
        result.checkpoint = save_checkpoint(out_dir, step, objective.modules, optimizer, generator,
                                            ema.state_dict() if ema else None, run_config, options.keep_checkpoints)

    def run_evaluation(step: int) -> None:
        if evaluate is None:
            return
        objective.set_training(False)
        try:
            with ema.applied() if ema else contextlib.nullcontext():
                outcome = evaluate(step)
        finally:
            objective.set_training(True)
        outcome = dict(outcome or {})
        result.evaluations.append((step, outcome))
        metrics.write({"step": step, "eval": outcome})
        if outcome:
            say(f"eval @ {step}: " + "  ".join(f"{k} {v}" for k, v in outcome.items()))

    step = start_step
    last_save = time.monotonic()
    last_saved_step = start_step if checkpoint else None
    objective.set_training(True)
    try:
        while step < options.steps:
            step_started = time.monotonic()
            x, captions = batches(step, generator)
            factor = min(1.0, (step + 1) / options.warmup_steps) if options.warmup_steps else 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with _autocast(options, device):
                loss, extras = objective.loss(x, captions, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                extras["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
            optimizer.step()
            step += 1
            if ema is not None:
                ema.update(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {step}")
            result.losses.append(value)
            result.step = step
            line = progress.update(step, value, extras)
            if line is not None:
                metrics.write({"step": step, "loss": progress.mean_loss, "steps_per_s": progress.steps_per_second,
                               "eta_s": progress.eta_seconds, "lr": optimizer.param_groups[0]["lr"],
                               "elapsed_s": progress.elapsed, **progress.mean_extras()})
            step_time = time.monotonic() - step_started
            out_of_time = budget is not None and progress.elapsed + step_time > budget and step < options.steps
            due = step < options.steps and (
                bool(options.checkpoint_every and step % options.checkpoint_every == 0)
                or bool(options.checkpoint_minutes and time.monotonic() - last_save >= options.checkpoint_minutes * 60))
            if due or out_of_time:  # evaluations follow the checkpoint schedule, also without out_dir
                if out_dir:
                    save(step)
                    last_saved_step = step
                last_save = time.monotonic()
                run_evaluation(step)
            if out_of_time:
                result.stopped_by_budget = True
                say(f"time budget of {options.max_minutes} min reached at step {step}; stopping")
                break
    except KeyboardInterrupt:
        if out_dir and step > start_step and last_saved_step != step:
            save(step)
            say(f"interrupted: saved {result.checkpoint}")
        raise

    result.completed = step >= options.steps
    if result.completed:
        if out_dir and last_saved_step != step:
            save(step)
        if not result.evaluations or result.evaluations[-1][0] != step:
            run_evaluation(step)
    if out_dir:
        final = os.path.join(out_dir, "final")
        objective.set_training(False)
        with ema.applied() if ema else contextlib.nullcontext():
            objective.export(final)
        with open(os.path.join(final, "training.json"), "w") as f:
            json.dump({"step": step, "completed": result.completed, "steps": options.steps,
                       "ema": bool(ema), "checkpoint": result.checkpoint}, f, indent=2)
            f.write("\n")
        result.final_dir = final
    return result
