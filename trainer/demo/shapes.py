"""The shapes world of the demo models: 64×64 RGB scenes of one or two coloured shapes, with captions.

The world: three backgrounds, six colours, six shapes in three families, two sizes, five
positions with ±2 px jitter, captions in a fixed grammar where any attribute may be left out (it was
then drawn at random). Everything is deterministic under a seed.

Drawing is anti-aliased by evaluating each shape at 4×4 sub-samples per pixel and averaging. Jitter
is drawn in quarter pixels, so an object's sub-sample grid only ever takes 4×4 phases: every
(shape, size, phase) coverage patch is rendered once (numpy) and scenes are composited from those
patches with torch (on any device), which makes batches of tens of thousands of images cheap.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

IMAGE_SIZE = 64

BACKGROUNDS = ("white", "black", "gray")
BACKGROUND_RGB = ((255, 255, 255), (0, 0, 0), (128, 128, 128))
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
COLOUR_RGB = ((220, 40, 40), (245, 140, 20), (240, 220, 40), (40, 170, 60), (40, 80, 220), (140, 60, 200))
SHAPES = ("circle", "ring", "square", "diamond", "triangle", "star")
SIZES = ("small", "large")
SIZE_PX = (14, 28)
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_XY = ((16, 32), (48, 32), (32, 16), (32, 48), (32, 32))  # (x, y) of the centre, pixels
POSITION_PHRASES = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
FAMILIES: Dict[str, tuple] = {"curves": ("circle", "ring"), "blocks": ("square", "diamond"), "spikes": ("triangle", "star")}

JITTER_PX = 2
SUBSAMPLES = 4  # per pixel and axis
PATCH = 32  # coverage patch side in pixels (holds a large shape at any sub-pixel phase)
ATTRIBUTES = ("colour", "shape", "size", "position")  # per object, in the order of `stated[..., k]`
MAX_OBJECTS = 2
LEFT, RIGHT = POSITIONS.index("left"), POSITIONS.index("right")


def family_of(shape: str) -> str:
    for family, shapes in FAMILIES.items():
        if shape in shapes:
            return family
    raise ValueError(f"unknown shape {shape!r}")


def family_shape_ids(families: Optional[Sequence[str]]) -> List[int]:
    """Shape indices of the given families (all shapes for None)."""
    if families is None:
        return list(range(len(SHAPES)))
    ids: List[int] = []
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r} (expected one of {tuple(FAMILIES)})")
        ids += [SHAPES.index(s) for s in FAMILIES[family]]
    return sorted(set(ids))


# ---------------------------------------------------------------------------------------------
# Geometry: inside tests on sub-sample coordinates relative to the shape's centre (y points down).

def _inside(shape: str, x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    half = s / 2
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "ring":
        inner = half - half / 4  # stroke is a quarter of the radius
        r2 = x * x + y * y
        return (r2 <= half * half) & (r2 >= inner * inner)
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= half
    if shape == "triangle":
        # base s at y = +s/2, apex at y = -s/2: half-width grows linearly from 0 to s/2
        return (y <= half) & (np.abs(x) <= (y + half) / 2)
    if shape == "star":
        return _inside_star(x, y, outer=half, inner=0.4 * half)
    raise ValueError(f"unknown shape {shape!r}")


def _inside_star(x: np.ndarray, y: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Five-pointed star, first point straight up: fold the angle into the sector between an outer
    vertex (angle 0) and the next inner vertex (36°), then test against that edge."""
    rho = np.hypot(x, y)
    angle_from_up = np.arctan2(x, -y)  # 0 pointing up, clockwise positive
    sector = 2 * math.pi / 5
    a = np.mod(angle_from_up, sector)
    a = np.minimum(a, sector - a)
    px, py = rho * np.cos(a), rho * np.sin(a)
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    # origin side of the edge A→B is the inside
    cross_p = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    cross_o = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return cross_p * cross_o >= 0


@lru_cache(maxsize=None)
def coverage_patches() -> torch.Tensor:
    """float32 [shapes, sizes, 4, 4, PATCH, PATCH]: anti-aliased coverage of each shape whose centre
    lies at patch coordinate (PATCH/2 + px/4, PATCH/2 + py/4) for sub-pixel phases px, py."""
    n = PATCH * SUBSAMPLES
    sub = (np.arange(n) + 0.5) / SUBSAMPLES  # sub-sample coordinates in patch pixels
    out = np.zeros((len(SHAPES), len(SIZES), SUBSAMPLES, SUBSAMPLES, PATCH, PATCH), dtype=np.float32)
    for si, shape in enumerate(SHAPES):
        for zi, size in enumerate(SIZE_PX):
            for py in range(SUBSAMPLES):
                y = sub - (PATCH / 2 + py / SUBSAMPLES)
                for px in range(SUBSAMPLES):
                    x = sub - (PATCH / 2 + px / SUBSAMPLES)
                    inside = _inside(shape, x[None, :], y[:, None], float(size)).astype(np.float32)
                    out[si, zi, py, px] = inside.reshape(PATCH, SUBSAMPLES, PATCH, SUBSAMPLES).mean(axis=(1, 3))
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Scenes

@dataclass
class ShapesBatch:
    """A batch of scenes. Object slot 0 is the only object, or the left one of two; slot 1 the right
    one (absent: -1 in every label). `stated[b, k, a]` says whether attribute ATTRIBUTES[a] of object
    k appears in the caption; `centre` is the drawn centre (x, y) in pixels after jitter."""

    images: torch.Tensor  # uint8 [n, 3, 64, 64]
    captions: List[str]
    background: torch.Tensor  # int64 [n]
    background_stated: torch.Tensor  # bool [n]
    num_objects: torch.Tensor  # int64 [n], 1 or 2
    colour: torch.Tensor  # int64 [n, 2]
    shape: torch.Tensor  # int64 [n, 2]
    size: torch.Tensor  # int64 [n, 2]
    position: torch.Tensor  # int64 [n, 2]
    stated: torch.Tensor  # bool [n, 2, 4]
    centre: torch.Tensor  # float32 [n, 2, 2]

    def __len__(self) -> int:
        return len(self.captions)

    def labels(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in LABEL_FIELDS}

    def to_dict(self) -> dict:
        return {"images": self.images, "captions": list(self.captions), **self.labels()}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapesBatch":
        return cls(images=d["images"], captions=list(d["captions"]), **{k: d[k] for k in LABEL_FIELDS})

    def select(self, index) -> "ShapesBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        captions = [self.captions[int(i)] for i in index]
        fields = {k: getattr(self, k)[index.to(getattr(self, k).device)] for k in LABEL_FIELDS}
        return ShapesBatch(images=self.images[index.to(self.images.device)], captions=captions, **fields)


LABEL_FIELDS = ("background", "background_stated", "num_objects", "colour", "shape", "size", "position",
                "stated", "centre")


def render(background: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, size: torch.Tensor,
           centre_quarters: torch.Tensor, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Draw scenes: uint8 [n, 3, 64, 64].

    background [n]; colour, shape, size [n, K] (-1 = no object in that slot); centre_quarters
    int64 [n, K, 2]: object centres (x, y) in quarter pixels. Objects are painted in slot order.
    """
    device = torch.device(device) if device is not None else background.device
    n = background.shape[0]
    side = IMAGE_SIZE
    bg = torch.tensor(BACKGROUND_RGB, dtype=torch.float32, device=device)[background.to(device)]
    image = bg[:, :, None, None].expand(n, 3, side, side).contiguous()
    patches = coverage_patches().to(device)
    palette = torch.tensor(COLOUR_RGB, dtype=torch.float32, device=device)
    offsets = torch.arange(PATCH, device=device) - PATCH // 2
    dump = side * side  # scatter target for patch pixels that fall outside the image
    for k in range(colour.shape[1]):
        present = colour[:, k].to(device) >= 0
        if not bool(present.any()):
            continue
        cq = centre_quarters[:, k].to(device)
        phase = torch.remainder(cq, SUBSAMPLES)
        whole = torch.div(cq, SUBSAMPLES, rounding_mode="floor")
        alpha_patch = patches[shape[:, k].to(device).clamp(min=0), size[:, k].to(device).clamp(min=0),
                              phase[:, 1], phase[:, 0]]
        alpha_patch = alpha_patch * present[:, None, None]
        # patch pixel (r, c) is image pixel (whole_y - PATCH/2 + r, whole_x - PATCH/2 + c)
        y = whole[:, 1, None] + offsets[None, :]
        x = whole[:, 0, None] + offsets[None, :]
        inside = ((y >= 0) & (y < side))[:, :, None] & ((x >= 0) & (x < side))[:, None, :]
        flat = torch.where(inside, y[:, :, None] * side + x[:, None, :], torch.full_like(inside, dump, dtype=torch.long))
        alpha = torch.zeros(n, dump + 1, device=device)
        alpha.scatter_(1, flat.reshape(n, -1), alpha_patch.reshape(n, -1))
        alpha = alpha[:, :dump].reshape(n, 1, side, side)
        rgb = palette[colour[:, k].to(device).clamp(min=0)][:, :, None, None]
        image.lerp_(rgb.expand_as(image), alpha.expand_as(image))
    return image.round().clamp(0, 255).to(torch.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(colour: Optional[int], shape: int, size: Optional[int], position: Optional[int]) -> str:
    """`a|an [small|large] [colour] <shape> [position phrase]` (None leaves an attribute out)."""
    words = []
    if size is not None:
        words.append(SIZES[size])
    if colour is not None:
        words.append(COLOURS[colour])
    words.append(SHAPES[shape])
    phrase = _article(words[0]) + " " + " ".join(words)
    if position is not None:
        phrase += " " + POSITION_PHRASES[position]
    return phrase


def caption(objects: Sequence[dict], background: Optional[int]) -> str:
    """Objects joined by " and ", then `, <background> background`. Each object is a dict with
    colour/shape/size/position indices (None = left out)."""
    text = " and ".join(object_phrase(o.get("colour"), o["shape"], o.get("size"), o.get("position")) for o in objects)
    if background is not None:
        text += f", {BACKGROUNDS[background]} background"
    return text


_OBJECT_RE = re.compile(
    r"^an? (?:(?P<size>" + "|".join(SIZES) + r") )?(?:(?P<colour>" + "|".join(COLOURS) + r") )?"
    r"(?P<shape>" + "|".join(SHAPES) + r")(?: (?P<position>" + "|".join(POSITION_PHRASES) + r"))?$"
)


def parse_caption(text: str) -> dict:
    """The attributes a caption states: {'objects': [{'colour','shape','size','position'}], 'background'},
    names or None for left-out attributes. Raises ValueError on text outside the grammar."""
    body, background = text.strip(), None
    match = re.search(r", (\w+) background$", body)
    if match:
        if match.group(1) not in BACKGROUNDS:
            raise ValueError(f"unknown background in {text!r}")
        background = match.group(1)
        body = body[: match.start()]
    objects = []
    for part in body.split(" and "):
        m = _OBJECT_RE.match(part)
        if not m:
            raise ValueError(f"not a shapes-world object phrase: {part!r}")
        if _article(part.split(" ")[1]) != part.split(" ")[0]:
            raise ValueError(f"wrong article in {part!r}")
        pos = m.group("position")
        objects.append({
            "colour": m.group("colour"),
            "shape": m.group("shape"),
            "size": m.group("size"),
            "position": POSITIONS[POSITION_PHRASES.index(pos)] if pos else None,
        })
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"expected one or two objects in {text!r}")
    return {"objects": objects, "background": background}


def sample_batch(n: int, seed: int, families: Optional[Sequence[str]] = None, two_object_prob: float = 0.3,
                 omit_prob: float = 0.2, device: Optional[torch.device | str] = None) -> ShapesBatch:
    """n random scenes with captions, deterministic under `seed` (the same on every device).

    Shapes come from `families` (all for None). A scene has two objects (left and right, listed left
    first when positions are stated, in random order otherwise) with probability two_object_prob.
    Each of size, colour, position (for both objects of a pair at once) and background is left out of
    the caption with probability omit_prob; the shape is always stated.
    """
    rng = np.random.RandomState(seed)
    shape_ids = np.array(family_shape_ids(families))
    two = rng.random_sample(n) < two_object_prob
    background = rng.randint(len(BACKGROUNDS), size=n)
    colour = rng.randint(len(COLOURS), size=(n, MAX_OBJECTS))
    shape = shape_ids[rng.randint(len(shape_ids), size=(n, MAX_OBJECTS))]
    size = rng.randint(len(SIZES), size=(n, MAX_OBJECTS))
    position = rng.randint(len(POSITIONS), size=(n, MAX_OBJECTS))
    position[two, 0], position[two, 1] = LEFT, RIGHT
    jitter = rng.randint(-JITTER_PX * SUBSAMPLES, JITTER_PX * SUBSAMPLES + 1, size=(n, MAX_OBJECTS, 2))
    stated = rng.random_sample((n, MAX_OBJECTS, len(ATTRIBUTES))) >= omit_prob
    stated[:, :, ATTRIBUTES.index("shape")] = True
    stated[:, 1, ATTRIBUTES.index("position")] = stated[:, 0, ATTRIBUTES.index("position")]
    background_stated = rng.random_sample(n) >= omit_prob
    swap_order = rng.random_sample(n) < 0.5

    single = ~two
    for label in (colour, shape, size, position):
        label[single, 1] = -1
    stated[single, 1] = False
    centre_q = np.array(POSITION_XY)[np.maximum(position, 0)] * SUBSAMPLES + jitter
    centre_q[single, 1] = 0

    captions = []
    for b in range(n):
        objects = []
        for k in range(2 if two[b] else 1):
            objects.append({
                name: (int(label[b, k]) if stated[b, k, a] else None)
                for a, (name, label) in enumerate(zip(ATTRIBUTES, (colour, shape, size, position)))
            })
        if two[b] and not stated[b, 0, ATTRIBUTES.index("position")] and swap_order[b]:
            objects.reverse()
        captions.append(caption(objects, int(background[b]) if background_stated[b] else None))

    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()  # noqa: E731
    images = render(as_long(background), as_long(colour), as_long(shape), as_long(size), as_long(centre_q), device)
    return ShapesBatch(
        images=images,
        captions=captions,
        background=as_long(background),
        background_stated=torch.from_numpy(background_stated),
        num_objects=torch.from_numpy(np.where(two, 2, 1)).long(),
        colour=as_long(colour),
        shape=as_long(shape),
        size=as_long(size),
        position=as_long(position),
        stated=torch.from_numpy(stated),
        centre=torch.from_numpy(centre_q.astype(np.float32) / SUBSAMPLES),
    )


def render_caption(text: str, seed: int, device: Optional[torch.device | str] = None) -> ShapesBatch:
    """One scene that satisfies a caption: stated attributes as given, the rest drawn from `seed`.
    A two-object caption without positions places its first object on the left."""
    parsed = parse_caption(text)
    rng = np.random.RandomState(seed)
    objs = parsed["objects"]
    two = len(objs) == 2
    if two and objs[0]["position"] == "right":
        objs = objs[::-1]
    k_count = len(objs)
    labels = {name: np.full((1, MAX_OBJECTS), -1) for name in ATTRIBUTES}
    stated = np.zeros((1, MAX_OBJECTS, len(ATTRIBUTES)), dtype=bool)
    choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    for k, obj in enumerate(objs):
        for a, name in enumerate(ATTRIBUTES):
            value = obj[name]
            stated[0, k, a] = value is not None
            if value is None:
                value_id = rng.randint(len(choices[name]))
            else:
                value_id = choices[name].index(value)
            labels[name][0, k] = value_id
        if two:
            labels["position"][0, k] = LEFT if k == 0 else RIGHT
    background = BACKGROUNDS.index(parsed["background"]) if parsed["background"] else rng.randint(len(BACKGROUNDS))
    jitter = rng.randint(-JITTER_PX * SUBSAMPLES, JITTER_PX * SUBSAMPLES + 1, size=(1, MAX_OBJECTS, 2))
    centre_q = np.array(POSITION_XY)[np.maximum(labels["position"], 0)] * SUBSAMPLES + jitter
    centre_q[0, k_count:] = 0
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()  # noqa: E731
    bg = torch.tensor([background])
    images = render(bg, t(labels["colour"]), t(labels["shape"]), t(labels["size"]), t(centre_q), device)
    return ShapesBatch(
        images=images, captions=[text], background=bg,
        background_stated=torch.tensor([parsed["background"] is not None]),
        num_objects=torch.tensor([k_count]), colour=t(labels["colour"]), shape=t(labels["shape"]),
        size=t(labels["size"]), position=t(labels["position"]), stated=torch.from_numpy(stated),
        centre=torch.from_numpy(centre_q.astype(np.float32) / SUBSAMPLES),
    )


def build_dataset(path: str, n: int, seed: int, families: Optional[Sequence[str]] = None,
                  two_object_prob: float = 0.3, omit_prob: float = 0.2, chunk: int = 8192,
                  device: Optional[torch.device | str] = None) -> ShapesBatch:
    """Generate n scenes (in chunks with seeds seed, seed+1, …; drawn on `device`) and torch.save
    them to `path`; returns them on the CPU."""
    parts = []
    for i, start in enumerate(range(0, n, chunk)):
        part = sample_batch(min(chunk, n - start), seed + i, families, two_object_prob, omit_prob, device)
        part.images = part.images.cpu()
        parts.append(part)
    batch = concat(parts)
    torch.save(batch.to_dict(), path)
    return batch


def load_dataset(path: str) -> ShapesBatch:
    return ShapesBatch.from_dict(torch.load(path))


def concat(parts: Sequence[ShapesBatch]) -> ShapesBatch:
    captions: List[str] = []
    for p in parts:
        captions += p.captions
    fields = {k: torch.cat([getattr(p, k) for p in parts]) for k in LABEL_FIELDS}
    return ShapesBatch(images=torch.cat([p.images for p in parts]), captions=captions, **fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render a shapes-world dataset to a torch tensor file.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="*", choices=sorted(FAMILIES), default=None)
    parser.add_argument("--two-object-prob", type=float, default=0.3)
    parser.add_argument("--omit-prob", type=float, default=0.2)
    args = parser.parse_args(argv)
    batch = build_dataset(args.out, args.n, args.seed, args.families, args.two_object_prob, args.omit_prob)
    print(f"wrote {args.out}: {len(batch)} scenes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
