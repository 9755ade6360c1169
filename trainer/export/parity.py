"""Parity of an exported graph with its PyTorch module: both run on the same feeds, onnxruntime-node
through trainer.export.ort_check."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from trainer.export import ort_check
from trainer.export.errors import ExportDriftError, ExportError

FP32_TOLERANCE = 1e-4

Check = Union[bool, str]  # True: must run in onnxruntime; "auto": when available; False: checker only


def add_graph_arguments(parser, what: str) -> None:
    """The export commands' shared options: --fp16 storage and the --check mode of the parity runs."""
    parser.add_argument("--fp16", action="store_true", help="store weights as float16 (compute stays float32)")
    parser.add_argument("--cuda-fp16", action="store_true",
                        help="also write float16-compute variants (model.fp16.onnx, for CUDA) of the graphs written "
                             "and name them in the manifest (trainer.export.fp16_compute)")
    parser.add_argument("--check", choices=("auto", "require", "off"), default="auto",
                        help=f"run {what} in onnxruntime-node against PyTorch (auto: when node is there)")


def check_from_arguments(args) -> Check:
    return {"auto": "auto", "require": True, "off": False}[args.check]


def check_parity(graph: str, path: str, module: nn.Module, feed_sets: Sequence[Mapping[str, Tensor]],
                 output_names: Sequence[str], tolerance: float = FP32_TOLERANCE,
                 check: Check = "auto") -> Tuple[Optional[Dict[str, float]], Optional[str]]:
    """Runs the graph in onnxruntime-node and `module` in PyTorch on each feed set.

    Returns ({output: max abs error}, None), or (None, reason) when onnxruntime is unavailable and
    check is "auto". Raises ExportDriftError past the tolerance, ExportError when ORT fails.
    """
    if not check:
        return None, "disabled"
    reason = ort_check.unavailable_reason()
    if reason is not None:
        if check == "auto":
            return None, reason
        raise ExportError(f"{graph}: cannot check {path} against PyTorch: {reason}")
    numpy_feeds = [{k: v.detach().cpu().numpy() for k, v in feeds.items()} for feeds in feed_sets]
    try:
        results = ort_check.run_onnx_many(path, numpy_feeds)
    except ort_check.OrtRunError as e:
        raise ExportError(f"{graph}: onnxruntime cannot run {path}: {e}") from None
    errors: Dict[str, float] = {}
    module = module.eval()
    for k, (feeds, got) in enumerate(zip(feed_sets, results)):
        with torch.no_grad():
            expected = module(*feeds.values())
        if isinstance(expected, Tensor):
            expected = (expected,)
        for name, want in zip(output_names, expected):
            if name not in got:
                raise ExportError(f"{graph}: {path} has no output {name!r} (it has {sorted(got)})")
            want = want.detach().float().cpu().numpy()
            have = got[name].astype(np.float32)
            if have.shape != want.shape:
                raise ExportDriftError(f"{graph}: output {name!r} of {path} has shape {list(have.shape)}, "
                                       f"PyTorch gives {list(want.shape)} (feed set {k})")
            if not np.all(np.isfinite(have)):
                raise ExportDriftError(f"{graph}: output {name!r} of {path} has non-finite values (feed set {k})")
            err = float(np.max(np.abs(have - want))) if want.size else 0.0
            errors[name] = max(errors.get(name, 0.0), err)
            if not err <= tolerance:
                raise ExportDriftError(
                    f"{graph}: onnxruntime output {name!r} of {path} differs from PyTorch by max abs error "
                    f"{err:.3g} > tolerance {tolerance:g} (feed set {k}, inputs "
                    + ", ".join(f"{n} {list(v.shape)}" for n, v in feeds.items()) + ")")
    return errors, None
