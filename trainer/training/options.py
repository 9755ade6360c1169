"""Training options shared by every loop, and what a run returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

Evaluate = Callable[[int], Optional[Mapping[str, Any]]]


@dataclass
class TrainOptions:
    """Options shared by all loops. Defaults are the AFA reference recipe (AdamW 1e-4, wd 0.01,
    constant rate, no clipping)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0                   # linear warm-up, then constant
    grad_clip: Optional[float] = None       # max global grad norm
    ema_decay: Optional[float] = None       # e.g. 0.999; effective decay min(decay, (1+s)/(10+s))
    seed: int = 0
    device: str = "cpu"
    out_dir: Optional[str] = None           # None: nothing is written, nothing resumed
    resume: Union[bool, str] = True         # True: newest checkpoint in out_dir; str: that checkpoint
    checkpoint_every: Optional[int] = None  # steps
    checkpoint_minutes: Optional[float] = None
    keep_checkpoints: Optional[int] = 3     # None/0: keep all
    max_minutes: Optional[float] = None     # budget for this call's loop; stops with a checkpoint
    log_every: int = 10
    quiet: bool = False
    amp_bf16: bool = False                  # CUDA only: autocast forward passes to bfloat16
    compile: bool = False                   # torch.compile the trained network's forward (torch ≥ 2)
    deterministic: bool = False             # CUDA: deterministic kernels (CPU runs are deterministic anyway)

    @classmethod
    def build(cls, options: Union["TrainOptions", Mapping[str, Any], None] = None, **overrides) -> "TrainOptions":
        base = options if isinstance(options, TrainOptions) else cls(**dict(options or {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
        built = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None or k in (
            "grad_clip", "ema_decay", "out_dir", "checkpoint_every", "checkpoint_minutes", "max_minutes")})
        built.adam_betas = tuple(built.adam_betas)
        if built.steps < 0 or built.batch_size < 1:
            raise ValueError("steps must be ≥ 0 and batch_size ≥ 1")
        return built


@dataclass
class TrainResult:
    step: int                      # the step reached (counting resumed steps)
    start_step: int                # where this call started (0, or the resumed checkpoint's step)
    completed: bool                # step == options.steps
    stopped_by_budget: bool
    losses: List[float]            # the loss of every step of this call
    checkpoint: Optional[str]      # the last checkpoint written
    final_dir: Optional[str]
    evaluations: List[Tuple[int, Dict[str, Any]]] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return device
