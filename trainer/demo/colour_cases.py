"""Test images for the eval's strict colour reading (src/eval/colour.ts), drawn by the world's own
renderer (shapes.render): every palette colour on every shape, size and background (one object, and
pairs left and right), and deliberately recoloured objects that must NOT read as their stated colour
(orange drawn for yellow, blue for purple, orange-red for red, a red circle with a purple-grey centre).

`python3 -m trainer.demo.colour_cases --out test/fixtures/colour` writes `cases.json` (one case per
image: caption, object count, the label each object must read as) and `renders.bin.gz` (uint8
[n, 64, 64, 3], row-major RGB, gzip). Deterministic: the same files on every run.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.demo import shapes

# Colours outside the palette, appended after it while drawing the recoloured cases.
ORANGE_RED = (232, 90, 30)  # sRGB halfway between the palette's red and orange
PURPLE_GREY = (120, 95, 125)  # the centre of red circles at guidance 3-5 (docs/results.md)
EXTRA = {"orange-red": ORANGE_RED, "purple-grey": PURPLE_GREY}
WORLD_SIZES = shapes.SIZES  # the world's sizes (the blotch sizes are appended while drawing)
BLOTCH_PX = {"blotch-small": 14, "blotch-large": 18}  # blotch diameters inside a 28 px circle (25%, 41% of it)


def _draw(background: int, objects: Sequence[Tuple[int, int, int, Tuple[int, int]]]) -> np.ndarray:
    """One image, [64, 64, 3] uint8: objects (colour index, shape index, size index, centre (x, y) in
    quarter pixels), painted in order. Colour indices past the palette are EXTRA's, size indices past
    SIZE_PX are BLOTCH_PX's."""
    k = len(objects)
    t = lambda a: torch.tensor([a], dtype=torch.long)  # noqa: E731
    image = shapes.render(
        torch.tensor([background]),
        t([o[0] for o in objects]), t([o[1] for o in objects]), t([o[2] for o in objects]),
        torch.tensor([[list(o[3]) for o in objects]], dtype=torch.long).reshape(1, k, 2),
    )
    return image[0].permute(1, 2, 0).numpy()


class _ExtendedWorld:
    """Temporarily appends EXTRA colours to the palette and BLOTCH_PX sizes to the sizes."""

    def __enter__(self):
        self.saved = (shapes.COLOUR_RGB, shapes.SIZE_PX, shapes.SIZES)
        shapes.COLOUR_RGB = tuple(shapes.COLOUR_RGB) + tuple(EXTRA.values())
        shapes.SIZE_PX = tuple(shapes.SIZE_PX) + tuple(BLOTCH_PX.values())
        shapes.SIZES = tuple(shapes.SIZES) + tuple(BLOTCH_PX)
        shapes.coverage_patches.cache_clear()
        return self

    def __exit__(self, *exc):
        shapes.COLOUR_RGB, shapes.SIZE_PX, shapes.SIZES = self.saved
        shapes.coverage_patches.cache_clear()
        return False


def _colour_id(name: str) -> int:
    return shapes.COLOURS.index(name) if name in shapes.COLOURS else len(shapes.COLOURS) + list(EXTRA).index(name)


def _centre(position: str, rng: np.random.RandomState) -> Tuple[int, int]:
    x, y = shapes.POSITION_XY[shapes.POSITIONS.index(position)]
    j = rng.randint(-shapes.JITTER_PX * shapes.SUBSAMPLES, shapes.JITTER_PX * shapes.SUBSAMPLES + 1, size=2)
    return (x * shapes.SUBSAMPLES + int(j[0]), y * shapes.SUBSAMPLES + int(j[1]))


def _obj(colour: Optional[str], shape: str, size: str, position: Optional[str]) -> dict:
    return {"colour": None if colour is None else shapes.COLOURS.index(colour), "shape": shapes.SHAPES.index(shape),
            "size": shapes.SIZES.index(size), "position": None if position is None else shapes.POSITIONS.index(position)}


def build_cases() -> Tuple[List[Dict], np.ndarray]:
    rng = np.random.RandomState(18)
    cases: List[Dict] = []
    images: List[np.ndarray] = []

    def add(caption_objects: List[dict], background: str, drawn: List[Tuple[str, str, str, Tuple[int, int]]],
            expect: List[str], kind: str, note: str = "") -> None:
        bg = shapes.BACKGROUNDS.index(background)
        objects = [(_colour_id(c), shapes.SHAPES.index(s) if s in shapes.SHAPES else shapes.SHAPES.index("circle"),
                    shapes.SIZES.index(z), xy)
                   for c, s, z, xy in drawn]
        images.append(_draw(bg, objects))
        cases.append({"caption": shapes.caption(caption_objects, bg), "objects": len(caption_objects),
                      "expect": expect, "kind": kind, **({"note": note} if note else {})})

    # every colour, shape, size and background, one object, positions in turn
    n = 0
    for shape in shapes.SHAPES:
        for size in WORLD_SIZES:
            for background in shapes.BACKGROUNDS:
                for colour in shapes.COLOURS:
                    position = shapes.POSITIONS[n % len(shapes.POSITIONS)]
                    n += 1
                    add([_obj(colour, shape, size, position)], background,
                        [(colour, shape, size, _centre(position, rng))], [colour], "clean")
    # pairs: every ordered pair of different colours on every background, shapes and sizes in turn
    n = 0
    for background in shapes.BACKGROUNDS:
        for left in shapes.COLOURS:
            for right in shapes.COLOURS:
                if left == right:
                    continue
                ls, rs = shapes.SHAPES[n % 6], shapes.SHAPES[(n * 5 + 3) % 6]
                lz, rz = WORLD_SIZES[n % 2], WORLD_SIZES[(n // 2) % 2]
                n += 1
                add([_obj(left, ls, lz, "left"), _obj(right, rs, rz, "right")], background,
                    [(left, ls, lz, _centre("left", rng)), (right, rs, rz, _centre("right", rng))],
                    [left, right], "clean")

    # recoloured: the colour stated is not the colour drawn
    swaps = (("yellow", "orange", "orange"), ("purple", "blue", "blue"), ("red", "orange-red", "unclear"))
    for stated, drawn, reads in swaps:
        for background in shapes.BACKGROUNDS:
            for shape in ("circle", "square", "star", "ring"):
                for size in WORLD_SIZES:
                    position = "center" if size == "large" else "left"
                    add([_obj(stated, shape, size, position)], background,
                        [(drawn, shape, size, _centre(position, rng))], [reads], "recoloured",
                        f"{drawn} drawn for {stated}")
    # the two-object cases: an orange square where a yellow one is stated, a blue circle where purple is
    for background in shapes.BACKGROUNDS:
        add([_obj("green", "circle", "large", "left"), _obj("yellow", "square", "large", "right")], background,
            [("green", "circle", "large", _centre("left", rng)), ("orange", "square", "large", _centre("right", rng))],
            ["green", "orange"], "recoloured", "orange square drawn for yellow")
        add([_obj("blue", "square", "large", "left"), _obj("purple", "circle", "large", "right")], background,
            [("blue", "square", "large", _centre("left", rng)), ("blue", "circle", "large", _centre("right", rng))],
            ["blue", "blue"], "recoloured", "blue circle drawn for purple")
    # red circles with a purple-grey blotch at the centre; on a gray background purple-grey is
    # background-coloured (ΔE < 25), so the blotch reads as a hole there: white and black only
    for background in ("white", "black"):
        for blotch in BLOTCH_PX:
            for position in ("center", "left", "top"):
                xy = _centre(position, rng)
                add([_obj("red", "circle", "large", position)], background,
                    [("red", "circle", "large", xy), ("purple-grey", "circle", blotch, xy)], ["mixed"], "recoloured",
                    f"red circle with a purple-grey centre ({BLOTCH_PX[blotch]} px of 28)")
    return cases, np.stack(images)


def write_cases(out_dir: str) -> int:
    with _ExtendedWorld():
        cases, images = build_cases()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(c) for c in cases) + "\n]\n")
    with open(os.path.join(out_dir, "renders.bin.gz"), "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return len(cases)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render the strict colour reading's test images.")
    parser.add_argument("--out", default="test/fixtures/colour")
    args = parser.parse_args(argv)
    n = write_cases(args.out)
    print(f"wrote {n} cases to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
