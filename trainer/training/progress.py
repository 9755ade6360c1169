"""Progress lines for training runs: step, running-mean loss, steps/s and ETA.

    step 120/1000  loss 0.1234  2.31 steps/s  ETA 6m21s  [recon 0.0100  kl 3.2]

The rate is measured over the steps of this run only (a resumed run does not count the steps it
loaded), over a sliding window so that it follows the current speed. With a time budget the ETA is
the smaller of "steps left at this rate" and "budget left".
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import Callable, Deque, Dict, Mapping, Optional, TextIO, Tuple


def format_duration(seconds: float) -> str:
    """12s, 6m21s, 1h02m, 3d04h."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_value(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}"
    return f"{value:.3e}"


class Progress:
    """Running statistics of a training run; `update` returns (and prints) a line every `every` steps.

    `clock` is injectable for tests; `stream=None` keeps lines to the caller.
    """

    def __init__(self, total_steps: int, start_step: int = 0, every: int = 10, window: int = 50,
                 budget_seconds: Optional[float] = None, stream: Optional[TextIO] = sys.stdout,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.every = max(1, int(every))
        self.budget_seconds = budget_seconds
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self._losses: Deque[float] = deque(maxlen=max(1, window))
        self._extras: Dict[str, Deque[float]] = {}
        self._window = max(1, window)
        self._times: Deque[Tuple[int, float]] = deque([(self.start_step, self.started)], maxlen=self._window + 1)
        self.step = self.start_step

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def record(self, step: int, loss: float, extras: Optional[Mapping[str, float]] = None) -> None:
        self.step = int(step)
        self._losses.append(float(loss))
        for key, value in (extras or {}).items():
            self._extras.setdefault(key, deque(maxlen=self._window)).append(float(value))
        self._times.append((self.step, self.clock()))

    @property
    def mean_loss(self) -> float:
        return sum(self._losses) / len(self._losses) if self._losses else float("nan")

    def mean_extras(self) -> Dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self._extras.items() if v}

    @property
    def steps_per_second(self) -> float:
        (first_step, first_time), (last_step, last_time) = self._times[0], self._times[-1]
        if last_step == first_step or last_time <= first_time:
            return float("nan")
        return (last_step - first_step) / (last_time - first_time)

    @property
    def seconds_per_step(self) -> float:
        rate = self.steps_per_second
        return 1.0 / rate if rate > 0 else float("nan")

    @property
    def eta_seconds(self) -> float:
        rate = self.steps_per_second
        eta = (self.total_steps - self.step) / rate if rate > 0 else float("nan")
        if self.budget_seconds is not None:
            budget_left = max(0.0, self.budget_seconds - self.elapsed)
            eta = budget_left if not math.isfinite(eta) else min(eta, budget_left)
        return eta

    def line(self) -> str:
        width = len(str(self.total_steps))
        parts = [f"step {self.step:>{width}}/{self.total_steps}",
                 f"loss {format_value(self.mean_loss)}"]
        rate = self.steps_per_second
        parts.append(f"{rate:.2f} steps/s" if math.isfinite(rate) else "? steps/s")
        parts.append(f"ETA {format_duration(self.eta_seconds)}")
        extras = self.mean_extras()
        if extras:
            parts.append(" ".join(f"{k} {format_value(v)}" for k, v in extras.items()))
        return "  ".join(parts)

    def update(self, step: int, loss: float, extras: Optional[Mapping[str, float]] = None,
               force: bool = False) -> Optional[str]:
        """Records a finished step; returns the progress line when one is due (every `every` steps,
        the first step of the run, the last step, or `force`)."""
        self.record(step, loss, extras)
        due = force or step % self.every == 0 or step == self.start_step + 1 or step >= self.total_steps
        if not due:
            return None
        text = self.line()
        self.emit(text)
        return text

    def emit(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)
