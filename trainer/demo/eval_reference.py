"""Reference feature statistics for the evaluation's Fréchet distance (`npm run eval`).

The eval (TypeScript, no Python at eval time) compares the attribute classifier's features of
generated images with those of rendered world images. This writes the rendered side once, next to
the classifier in the package: `<package>/eval/reference_features.json` with

- `sets.single` / `sets.pair`: mean and covariance of the features of rendered scenes as the eval's
  prompts describe them (every attribute stated; single objects uniform over the world, pairs of
  objects of different families at left and right), covariance as float32 little-endian base64;
- `floor`: the Fréchet distance of n other rendered scenes to those statistics, for several n
  (a distance measured on few images is biased upwards; this is what perfect images would score);
- `probe`: a few rendered images with their features and scenes, so the eval can check that the
  ONNX classifier it runs computes the same features as the PyTorch one used here, and reads the
  scenes back.

    python3 -m trainer.eval_reference --classifier trainer/runs/demo/classifier/classifier.pt --package models/demo
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import base64
import json
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from trainer.demo import classifier as clf
from trainer.demo import shapes

FORMAT = "shapes-classifier-reference-features"
REFERENCE_SEED = 2**31 - 5000
FLOOR_SEED = 2**31 - 9000
FLOOR_SIZES = (2, 6, 12, 18, 24, 36, 54, 72, 108, 144, 216)
FLOOR_DRAWS = 3
PROBE_COUNT = 4


def family_ids() -> torch.Tensor:
    families = list(shapes.FAMILIES)
    return torch.tensor([families.index(shapes.family_of(s)) for s in shapes.SHAPES])


def render_set(kind: str, n: int, seed: int) -> shapes.ShapesBatch:
    """n rendered scenes of one kind, every attribute stated: `single` objects anywhere, or `pair`s
    of objects from different families (left, right)."""
    if kind == "single":
        return shapes.sample_batch(n, seed, two_object_prob=0.0, omit_prob=0.0)
    if kind != "pair":
        raise ValueError(f"kind is 'single' or 'pair', not {kind!r}")
    fam = family_ids()
    parts: List[shapes.ShapesBatch] = []
    have, draw = 0, 0
    while have < n:
        batch = shapes.sample_batch(2 * (n - have) + 8, seed + draw, two_object_prob=1.0, omit_prob=0.0)
        keep = (fam[batch.shape[:, 0]] != fam[batch.shape[:, 1]]).nonzero().squeeze(1)[: n - have]
        parts.append(batch.select(keep))
        have += len(keep)
        draw += 1
    return shapes.concat(parts)


def scene_of(batch: shapes.ShapesBatch, i: int) -> Dict:
    """What scene i holds, by name: {"objects": [{shape, colour, size, position}], "background"}."""
    objects = []
    for k in range(int(batch.num_objects[i])):
        objects.append({"shape": shapes.SHAPES[int(batch.shape[i, k])], "colour": shapes.COLOURS[int(batch.colour[i, k])],
                        "size": shapes.SIZES[int(batch.size[i, k])], "position": shapes.POSITIONS[int(batch.position[i, k])]})
    return {"objects": objects, "background": shapes.BACKGROUNDS[int(batch.background[i])]}


def frechet_to_stats(features: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Fréchet distance between a feature set [N, D] and Gaussian statistics (mean, cov)."""
    a = np.asarray(features, dtype=np.float64)
    mu_a, cov_a = a.mean(0), np.cov(a, rowvar=False)
    w, v = np.linalg.eigh(cov)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root @ cov_a @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mean) ** 2).sum() + np.trace(cov_a) + np.trace(cov) - 2 * trace_sqrt)


def onnx_stores_fp16(path: str) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def as_exported(model: clf.AttributeClassifier, onnx_path: Optional[str]) -> clf.AttributeClassifier:
    """The classifier with the precision of its exported graph (float16-stored weights are rounded)."""
    if onnx_path and os.path.exists(onnx_path) and onnx_stores_fp16(onnx_path):
        from trainer.export.fp16 import round_weights_fp16

        return round_weights_fp16(model).eval()
    return model


def _b64_f32(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def reference_features(model: clf.AttributeClassifier, n_single: int = 4000, n_pair: int = 2000,
                       floor_sizes: Sequence[int] = FLOOR_SIZES, weights: str = "float32") -> Dict:
    sets, floor = {}, {}
    probe_images, probe_features, probe_scenes = [], [], []
    for kind, n in (("single", n_single), ("pair", n_pair)):
        batch = render_set(kind, n, REFERENCE_SEED + (0 if kind == "single" else 100_000))
        features = clf.predict(model, batch.images)["features"].numpy().astype(np.float64)
        mean, cov = features.mean(0), np.cov(features, rowvar=False)
        sets[kind] = {"n": len(batch), "mean": [round(float(x), 7) for x in mean], "cov_f32": _b64_f32(cov)}
        sizes = [s for s in floor_sizes if s >= 2]
        draws = render_set(kind, max(sizes) * FLOOR_DRAWS, FLOOR_SEED + (0 if kind == "single" else 100_000))
        draw_features = clf.predict(model, draws.images)["features"].numpy()
        distances = []
        for size in sizes:
            values = [frechet_to_stats(draw_features[d * size:(d + 1) * size], mean, cov) for d in range(FLOOR_DRAWS)]
            distances.append(round(float(np.mean(values)), 5))
        floor[kind] = {"n": sizes, "frechet": distances}
        k = PROBE_COUNT // 2
        probe_images.append(batch.images[:k])
        probe_features += features[:k].tolist()
        probe_scenes += [scene_of(batch, i) for i in range(k)]
    images = torch.cat(probe_images).permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as the engine's RgbImage
    return {
        "format": FORMAT,
        "format_version": 1,
        "generator": "python3 -m trainer.eval_reference",
        "classifier": {"file": "classifier.onnx", "weights": weights, "feature_dim": int(features.shape[1])},
        "sets": sets,
        "floor": floor,
        "probe": {"count": len(images), "width": shapes.IMAGE_SIZE, "height": shapes.IMAGE_SIZE,
                  "images_rgb_base64": base64.b64encode(images.astype(np.uint8).tobytes()).decode("ascii"),
                  "features": [[round(float(x), 6) for x in row] for row in probe_features],
                  "scenes": probe_scenes},
    }


def write_reference(model: clf.AttributeClassifier, eval_dir: str, n_single: int = 4000, n_pair: int = 2000) -> str:
    """Writes `<eval_dir>/reference_features.json` for the classifier exported to `<eval_dir>/classifier.onnx`."""
    onnx_path = os.path.join(eval_dir, "classifier.onnx")
    exported = as_exported(model.to("cpu").eval(), onnx_path)
    weights = "float16" if exported is not model else "float32"
    data = reference_features(exported, n_single, n_pair, weights=weights)
    os.makedirs(eval_dir, exist_ok=True)
    path = os.path.join(eval_dir, "reference_features.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write <package>/eval/reference_features.json for npm run eval.")
    parser.add_argument("--classifier", required=True, help="the classifier checkpoint (classifier.pt)")
    parser.add_argument("--package", required=True, help="the model package folder (its eval/ gets the file)")
    parser.add_argument("--n-single", type=int, default=4000)
    parser.add_argument("--n-pair", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    path = write_reference(clf.load_classifier(args.classifier), os.path.join(args.package, "eval"),
                           args.n_single, args.n_pair)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
