"""Attribute classifier for the shapes world: scores generated images for the demo's evaluation.

A small CNN maps a 64×64 image to a feature map [C, 8, 8] and reads it three ways:
- the whole map: background, object count (1 or 2), and for single-object scenes the object's
  colour, shape, size and position (left/right/top/bottom/center);
- the left and the right half of the map, through one shared head: colour, shape and size of the
  object in that half, so that two-object scenes are scored per half (object i of a pair is
  checked where the caption put it);
- `features`: the penultimate layer of the whole-image branch, for a Fréchet distance between
  generated and rendered images (an FID analogue).

Input: `image` float32 [B, 3, 64, 64], RGB in [0, 1]. The ONNX graph has one output per head
(logits) plus `features`; `classifier.json` next to it names the classes of every head.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.demo import shapes
from trainer.export.onnx_io import onnx_export_kwargs

WHOLE_HEADS = {
    "background": shapes.BACKGROUNDS,
    "count": ("one", "two"),
    "colour": shapes.COLOURS,
    "shape": shapes.SHAPES,
    "size": shapes.SIZES,
    "position": shapes.POSITIONS,
}
HALF_HEADS = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "size": shapes.SIZES}
HALVES = ("left", "right")
OUTPUT_NAMES = tuple(WHOLE_HEADS) + tuple(f"{h}_{a}" for h in HALVES for a in HALF_HEADS) + ("features",)


@dataclass
class ClassifierConfig:
    widths: Sequence[int] = field(default_factory=lambda: (24, 48, 96, 128))
    squeeze_channels: int = 16
    feature_dim: int = 256

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 4:
            raise ValueError("widths: one per resolution 64, 32, 16, 8")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """forward(image [B,3,64,64] in [0,1]) -> dict of logits per head and `features` [B, feature_dim]."""

    def __init__(self, config: Optional[ClassifierConfig] = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        w0, w1, w2, w3 = config.widths
        self.backbone = nn.Sequential(
            _conv(3, w0), _conv(w0, w0),
            _conv(w0, w1, 2), _conv(w1, w1),
            _conv(w1, w2, 2), _conv(w2, w2),
            _conv(w2, w3, 2), _conv(w3, w3),
        )
        grid = shapes.IMAGE_SIZE // 8
        # a 1×1 squeeze keeps the flattening linears small; flattening (not pooling) keeps where things are
        self.squeeze = nn.Sequential(nn.Conv2d(w3, config.squeeze_channels, 1), nn.ReLU(inplace=True))
        c = config.squeeze_channels
        self.whole_trunk = nn.Sequential(nn.Flatten(), nn.Linear(c * grid * grid, config.feature_dim), nn.ReLU(inplace=True))
        self.half_trunk = nn.Sequential(nn.Flatten(), nn.Linear(c * grid * (grid // 2), config.feature_dim),
                                        nn.ReLU(inplace=True))
        self.whole_heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, len(v)) for k, v in WHOLE_HEADS.items()})
        self.half_heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, len(v)) for k, v in HALF_HEADS.items()})

    def forward(self, image: Tensor) -> Dict[str, Tensor]:
        fmap = self.squeeze(self.backbone(image * 2 - 1))
        features = self.whole_trunk(fmap)
        out = {k: head(features) for k, head in self.whole_heads.items()}
        mid = fmap.shape[-1] // 2
        for name, part in zip(HALVES, (fmap[..., :mid], fmap[..., mid:])):
            half_features = self.half_trunk(part)
            for k, head in self.half_heads.items():
                out[f"{name}_{k}"] = head(half_features)
        out["features"] = features
        return out


class _OnnxOutputs(nn.Module):
    def __init__(self, model: AttributeClassifier):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor):
        out = self.model(image)
        return tuple(out[name] for name in OUTPUT_NAMES)


# ---------------------------------------------------------------------------------------------
# Training

def images_to_input(images: Tensor) -> Tensor:
    """uint8 [B,3,H,W] (or float in [0,1]) -> float32 in [0,1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mild corruptions so that the classifier also reads generated (slightly blurry, noisy) images:
    per-image Gaussian noise up to σ = 0.06, a 3×3 blur on a third of the images, ±4% contrast."""
    b = x.shape[0]
    dev = x.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=generator.device).to(dev)  # noqa: E731
    blur = rand(b) < 1 / 3
    if bool(blur.any()):
        kernel = torch.tensor([1.0, 2.0, 1.0], device=dev)
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        x = torch.where(blur[:, None, None, None], blurred, x)
    contrast = 1 + (rand(b, 1, 1, 1) - 0.5) * 0.08
    x = (x - 0.5) * contrast + 0.5
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(dev)
    x = x + noise * rand(b, 1, 1, 1) * 0.06
    return x.clamp(0, 1)


def classifier_loss(out: Dict[str, Tensor], batch: shapes.ShapesBatch) -> Tensor:
    dev = out["background"].device
    single = (batch.num_objects == 1).to(dev)
    pair = ~single
    loss = F.cross_entropy(out["background"], batch.background.to(dev))
    loss = loss + F.cross_entropy(out["count"], (batch.num_objects - 1).to(dev))
    if bool(single.any()):
        for k in ("colour", "shape", "size", "position"):
            loss = loss + F.cross_entropy(out[k][single], getattr(batch, k)[:, 0].to(dev)[single])
    if bool(pair.any()):
        for slot, half in enumerate(HALVES):
            for k in HALF_HEADS:
                loss = loss + F.cross_entropy(out[f"{half}_{k}"][pair], getattr(batch, k)[:, slot].to(dev)[pair])
    return loss


@dataclass
class ClassifierTrainResult:
    steps: int
    seconds: float
    losses: List[float]
    accuracy: Dict[str, float]


def save_classifier(model: AttributeClassifier, path: str, extra: Optional[dict] = None) -> None:
    tmp = path + ".tmp"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), **(extra or {})}, tmp)
    os.replace(tmp, path)


def load_classifier(path: str, device: Optional[str | torch.device] = None) -> AttributeClassifier:
    blob = torch.load(path, map_location="cpu")
    model = AttributeClassifier(ClassifierConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device or "cpu").eval()


def train_classifier(
    model: AttributeClassifier,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    two_object_prob: float = 0.4,
    max_minutes: Optional[float] = None,
    checkpoint_path: Optional[str] = None,
    checkpoint_every_s: float = 180.0,
    eval_n: int = 1000,
    log: Optional[Callable[[str], None]] = None,
    use_autocast: bool = False,
) -> ClassifierTrainResult:
    """Trains on freshly rendered scenes (batch of step s drawn with seed `seed + 1 + s`), resuming
    from `checkpoint_path` when it exists; AdamW with a cosine decay over `steps`. Stops after
    `steps` or `max_minutes`; then measures accuracy on `eval_n` held-out renders (seed `held_out_seed(seed)`)."""
    device = torch.device(device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    start_step = 0
    if checkpoint_path and os.path.exists(checkpoint_path):
        blob = torch.load(checkpoint_path, map_location="cpu")
        model.load_state_dict(blob["state_dict"])
        if "optimizer" in blob:
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
        start_step = int(blob.get("step", 0))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.monotonic()
    last_save = t0
    losses: List[float] = []
    step = start_step
    model.train()
    while step < steps:
        if max_minutes is not None and time.monotonic() - t0 > max_minutes * 60:
            break
        batch = shapes.sample_batch(batch_size, seed + 1 + step, two_object_prob=two_object_prob, device=device)
        generator.manual_seed(seed * 1_000_003 + step)
        x = augment(images_to_input(batch.images), generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = model(x)
        loss = classifier_loss({k: v.float() for k, v in out.items()}, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        if log and (step % 100 == 0 or step == steps):
            log(f"classifier step {step}/{steps} loss {np.mean(losses[-100:]):.4f}")
        if checkpoint_path and time.monotonic() - last_save > checkpoint_every_s:
            _save_training_state(model, opt, sched, step, checkpoint_path)
            last_save = time.monotonic()
    if checkpoint_path:
        _save_training_state(model, opt, sched, step, checkpoint_path)
    model.eval()
    held_out = shapes.sample_batch(eval_n, held_out_seed(seed), two_object_prob=0.5, device=device)
    accuracy = evaluate(model, held_out)
    return ClassifierTrainResult(steps=step, seconds=time.monotonic() - t0, losses=losses, accuracy=accuracy)


def held_out_seed(seed: int) -> int:
    """A scene seed that training with `seed` never draws (it uses seed + 1 + step)."""
    return 2**31 - 1 - seed


def _save_training_state(model, opt, sched, step: int, path: str) -> None:
    save_classifier(model, path, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step})


# ---------------------------------------------------------------------------------------------
# Prediction and scoring

@torch.no_grad()
def predict(model: AttributeClassifier, images: Tensor, batch_size: int = 512) -> Dict[str, Tensor]:
    """Class ids per head (int64 [B]) and `features` [B, feature_dim] for uint8 or [0,1] images."""
    model.eval()
    dev = next(model.parameters()).device
    parts: Dict[str, List[Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        out = model(images_to_input(images[start:start + batch_size]).to(dev))
        for k, v in out.items():
            parts.setdefault(k, []).append((v.float() if k == "features" else v.argmax(-1)).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def evaluate(model: AttributeClassifier, batch: shapes.ShapesBatch) -> Dict[str, float]:
    """Accuracy per head on rendered scenes with known labels: whole-image heads on single-object
    scenes (background and count on all), half heads on the halves of two-object scenes."""
    pred = predict(model, batch.images)
    single = batch.num_objects == 1
    pair = ~single
    acc: Dict[str, float] = {
        "background": _mean(pred["background"] == batch.background),
        "count": _mean(pred["count"] == batch.num_objects - 1),
    }
    for k in ("colour", "shape", "size", "position"):
        acc[k] = _mean((pred[k] == getattr(batch, k)[:, 0])[single])
    for slot, half in enumerate(HALVES):
        for k in HALF_HEADS:
            acc[f"{half}_{k}"] = _mean((pred[f"{half}_{k}"] == getattr(batch, k)[:, slot])[pair])
    acc["min"] = min(acc.values())
    return acc


def _mean(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


ADHERENCE_ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def adherence(pred: Dict[str, Tensor], batch: shapes.ShapesBatch) -> Dict[str, float]:
    """How well images follow their captions: for each attribute, the share of stated instances the
    classifier reads back, and `full` = share of images with every stated attribute right.

    Single-object images use the whole-image heads. A pair is read per half (slot 0 = left): its
    colour/shape/size are checked in their half; its position counts as right when the count head
    sees two objects and both halves hold their object's stated colour and shape (a swapped pair
    fails). A pair whose caption states no positions is scored in whichever order fits better.
    Also `single_full` and `pair_full` for the two kinds of scene.
    """
    n = len(batch)
    correct = {a: torch.zeros(n) for a in ADHERENCE_ATTRIBUTES}
    stated = {a: torch.zeros(n) for a in ADHERENCE_ATTRIBUTES}
    stated["background"] = batch.background_stated.float()
    correct["background"] = (pred["background"] == batch.background).float() * stated["background"]
    a_index = {a: shapes.ATTRIBUTES.index(a) for a in shapes.ATTRIBUTES}
    single = batch.num_objects == 1
    for a in ("colour", "shape", "size", "position"):
        st = batch.stated[:, 0, a_index[a]] & single
        stated[a] += st.float()
        correct[a] += ((pred[a] == getattr(batch, a)[:, 0]) & st).float()

    pair_idx = (~single).nonzero().squeeze(1)
    if len(pair_idx):
        readings = [_read_pair(pred, batch, pair_idx, order) for order in ((0, 1), (1, 0))]
        # the swapped reading counts only where the caption leaves positions open and it fits better
        positions_open = ~batch.stated[pair_idx, 0, a_index["position"]]
        use_swapped = positions_open & (readings[1]["wrong"] < readings[0]["wrong"])
        for a in ("colour", "shape", "size"):
            correct[a][pair_idx] += torch.where(use_swapped, readings[1][a], readings[0][a])
            stated[a][pair_idx] += batch.stated[pair_idx, :, a_index[a]].float().sum(1)
        placed = torch.where(use_swapped, readings[1]["placed"], readings[0]["placed"])
        pos_stated = ~positions_open
        stated["position"][pair_idx] += pos_stated.float()
        correct["position"][pair_idx] += (placed & pos_stated).float()

    result: Dict[str, float] = {}
    all_right = torch.ones(n, dtype=torch.bool)
    for a in ADHERENCE_ATTRIBUTES:
        total = float(stated[a].sum())
        result[a] = float(correct[a].sum()) / total if total else float("nan")
        all_right &= correct[a] == stated[a]
    count_right = pred["count"] == (batch.num_objects - 1)
    all_right &= count_right
    result["count"] = _mean(count_right)
    result["full"] = _mean(all_right)
    result["single_full"] = _mean(all_right[single])
    result["pair_full"] = _mean(all_right[~single])
    return result


def _read_pair(pred: Dict[str, Tensor], batch: shapes.ShapesBatch, idx: Tensor, order) -> Dict[str, Tensor]:
    """Per pair: stated colour/shape/size read back correctly when object `order[0]` is expected in
    the left half and `order[1]` in the right; `placed` (both objects seen where expected) and
    `wrong` (number of misses)."""
    out: Dict[str, Tensor] = {a: torch.zeros(len(idx)) for a in HALF_HEADS}
    placed = pred["count"][idx] == 1
    wrong = torch.zeros(len(idx))
    for half, slot in zip(HALVES, order):
        for a in HALF_HEADS:
            st = batch.stated[idx, slot, shapes.ATTRIBUTES.index(a)]
            ok = pred[f"{half}_{a}"][idx] == getattr(batch, a)[idx, slot]
            out[a] += (ok & st).float()
            wrong += (~ok & st).float()
            if a in ("colour", "shape"):
                placed &= ok | ~st
    out["placed"] = placed
    out["wrong"] = wrong + (~placed).float()
    return out


# ---------------------------------------------------------------------------------------------
# Fréchet distance between feature sets (FID analogue)

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|μa - μb|² + Tr(Σa + Σb - 2 (Σa Σb)^½) between two feature sets [N, D] (float64).
    Tr((Σa Σb)^½) = Σ √λ(Σa^½ Σb Σa^½), which keeps everything symmetric (no scipy needed)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# Export

def export_classifier_onnx(model: AttributeClassifier, path: str, accuracy: Optional[Dict[str, float]] = None,
                           fp16: bool = False, opset: int = 17) -> str:
    """Writes `path` (ONNX, batch dynamic; with fp16 the weights are stored as float16 and cast
    inside the graph, inputs and outputs stay float32) and `classifier.json` beside it; returns
    the json's path."""
    model = model.to("cpu").eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    example = torch.zeros(1, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    # the wrapper must be in eval mode too: the exporter restores the top module's mode on every child
    wrapper = _OnnxOutputs(model).eval()
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (example,), path,
            input_names=["image"], output_names=list(OUTPUT_NAMES),
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
            opset_version=opset, do_constant_folding=True, **onnx_export_kwargs(),
        )
    if fp16:
        import onnx

        from trainer.export.fp16 import store_weights_fp16

        onnx.save_model(store_weights_fp16(onnx.load(path)), path)
    meta = {
        "input": {"name": "image", "shape": [None, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE],
                  "dtype": "float32", "range": [0, 1], "layout": "RGB, channels first"},
        "heads": {
            **{k: list(v) for k, v in WHOLE_HEADS.items()},
            **{f"{h}_{k}": list(v) for h in HALVES for k, v in HALF_HEADS.items()},
        },
        "features": {"name": "features", "dim": model.config.feature_dim},
        "usage": ("Single-object images: background, count, colour, shape, size, position. Two-object "
                  "images (left/right): background, count, and left_*/right_* for the object in each half."),
        "config": model.config.to_dict(),
        "accuracy_on_renders": accuracy or {},
    }
    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "classifier.json")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta_path
