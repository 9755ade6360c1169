import numpy as np
import pytest
import torch

from trainer.demo import shapes
from trainer.demo.shapes import (BACKGROUND_RGB, COLOUR_RGB, COLOURS, POSITIONS, SHAPES, caption, parse_caption,
                            render, render_caption, sample_batch)


def _one(background, colour, shape, size, centre_xy, device=None):
    """Render one single-object scene with the centre given in pixels (multiples of 1/4)."""
    t = lambda v: torch.tensor([[v, -1]])  # noqa: E731
    centre = torch.tensor([[[int(centre_xy[0] * 4), int(centre_xy[1] * 4)], [0, 0]]])
    return render(torch.tensor([background]), t(colour), t(shape), t(size), centre)[0]


def _mask(image, rgb, tol=1):
    diff = (image.permute(1, 2, 0).int() - torch.tensor(rgb)).abs().max(-1).values
    return diff <= tol


def test_large_red_circle_on_the_left():
    red = COLOURS.index("red")
    img = _one(shapes.BACKGROUNDS.index("white"), red, SHAPES.index("circle"), 1, (16, 32))
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
    red_px = _mask(img, COLOUR_RGB[red])
    # pixel (row 32, col 16) and its neighbours are fully inside a 28 px circle centred at (16, 32)
    assert red_px[28:36, 12:20].all()
    assert red_px[32, 16 - 12] and red_px[32, 16 + 11]  # radius 14: still inside 12 px from the centre
    white = _mask(img, BACKGROUND_RGB[0], tol=0)
    assert white[:, 34:].all()  # far right half untouched
    assert white[0:3].all() and white[61:].all()  # top and bottom rows outside the radius
    # about π·14² pixels of coverage
    coverage = (255 - img[1].float()) / (255 - COLOUR_RGB[red][1])
    assert abs(coverage.sum().item() - np.pi * 14**2) < 6


def test_antialiased_edges_and_exact_colours():
    img = _one(2, COLOURS.index("blue"), SHAPES.index("circle"), 1, (32, 32))
    values = {tuple(v) for v in img.permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert tuple(BACKGROUND_RGB[2]) in values and tuple(COLOUR_RGB[4]) in values
    assert len(values) > 10  # blended edge pixels exist


@pytest.mark.parametrize("name,inside,outside", [
    # pixel (32 + dr, 32 + dc) covers offsets [dr, dr+1] × [dc, dc+1] from the centre of a large
    # shape drawn at (32, 32); y points down
    ("square", [(-14, -14), (13, 13), (0, 0)], [(-16, 0), (0, 15)]),
    ("diamond", [(0, 0), (0, -12), (-12, 0)], [(-12, -12), (11, 11)]),
    ("triangle", [(12, -12), (12, 12), (-10, 0)], [(-12, -8), (-12, 7), (14, 0)]),  # apex up
    ("ring", [(0, -13), (-13, 0), (12, 0)], [(0, 0), (-5, 4), (-16, 0)]),
    ("star", [(-9, 0), (0, 0), (-4, -1)], [(10, 0), (-12, -6), (14, 0)]),  # point up, notch down
])
def test_shape_geometry(name, inside, outside):
    img = _one(0, 0, SHAPES.index(name), 1, (32, 32))
    red = _mask(img, COLOUR_RGB[0], tol=2)
    white = _mask(img, BACKGROUND_RGB[0], tol=2)
    for dr, dc in inside:
        assert red[32 + dr, 32 + dc], f"{name}: expected the shape at offset {(dr, dc)}"
    for dr, dc in outside:
        assert white[32 + dr, 32 + dc], f"{name}: expected background at offset {(dr, dc)}"


def test_small_is_smaller_than_large_and_sizes_match_geometry():
    small = _one(1, 2, SHAPES.index("square"), 0, (32, 32))
    large = _mask(_one(1, 2, SHAPES.index("square"), 1, (32, 32)), COLOUR_RGB[2], 0).sum().item()
    assert _mask(small, COLOUR_RGB[2], 0).sum().item() == 14 * 14
    assert large == 28 * 28


def test_positions_and_jitter():
    batch = sample_batch(400, seed=1, two_object_prob=0.3)
    for b in range(len(batch)):
        for k in range(int(batch.num_objects[b])):
            base = torch.tensor(shapes.POSITION_XY[int(batch.position[b, k])], dtype=torch.float32)
            offset = batch.centre[b, k] - base
            assert offset.abs().max() <= 2.0
            assert torch.all((offset * 4) == (offset * 4).round())
    two = batch.num_objects == 2
    assert two.any() and (~two).any()
    assert (batch.position[two, 0] == POSITIONS.index("left")).all()
    assert (batch.position[two, 1] == POSITIONS.index("right")).all()
    assert (batch.colour[~two, 1] == -1).all() and (batch.stated[~two, 1] == False).all()  # noqa: E712


def test_object_colour_lands_at_its_centre():
    batch = sample_batch(64, seed=5, two_object_prob=0.5)
    checked = 0
    for b in range(len(batch)):
        for k in range(int(batch.num_objects[b])):
            if SHAPES[int(batch.shape[b, k])] == "ring":
                continue  # hollow
            x, y = batch.centre[b, k].tolist()
            pixel = batch.images[b, :, int(y), int(x)].int()
            expected = torch.tensor(COLOUR_RGB[int(batch.colour[b, k])])
            assert (pixel - expected).abs().max() <= 1, (batch.captions[b], k)
            checked += 1
    assert checked > 50


def test_deterministic_under_seed_and_seed_dependent():
    a = sample_batch(50, seed=7)
    b = sample_batch(50, seed=7)
    c = sample_batch(50, seed=8)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    for name in shapes.LABEL_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, c.images)


def test_families_restrict_shapes():
    batch = sample_batch(300, seed=2, families=["spikes"], two_object_prob=0.5)
    present = batch.shape[batch.shape >= 0]
    assert set(present.tolist()) == {SHAPES.index("triangle"), SHAPES.index("star")}
    with pytest.raises(ValueError):
        sample_batch(2, 0, families=["nope"])


_NAMES = {"colour": COLOURS, "shape": SHAPES, "size": shapes.SIZES, "position": POSITIONS}


def _states_exactly(obj, batch, b, k):
    """The caption object states exactly the attributes flagged in `stated`, with the right values."""
    for a, name in enumerate(shapes.ATTRIBUTES):
        if (obj[name] is not None) != bool(batch.stated[b, k, a]):
            return False
        if obj[name] is not None and obj[name] != _NAMES[name][int(getattr(batch, name)[b, k])]:
            return False
    return True


def test_captions_follow_the_grammar_and_state_exactly_the_stated_attributes():
    batch = sample_batch(300, seed=3, two_object_prob=0.4, omit_prob=0.3)
    reversed_pairs = 0
    for b, text in enumerate(batch.captions):
        parsed = parse_caption(text)
        n = int(batch.num_objects[b])
        objs = parsed["objects"]
        assert len(objs) == n
        bg = parsed["background"]
        assert (bg is not None) == bool(batch.background_stated[b])
        if bg is not None:
            assert bg == shapes.BACKGROUNDS[int(batch.background[b])]
        in_order = all(_states_exactly(o, batch, b, k) for k, o in enumerate(objs))
        if n == 2 and not in_order:
            # only a pair without positions may be listed right object first
            assert objs[0]["position"] is None
            assert all(_states_exactly(o, batch, b, 1 - k) for k, o in enumerate(objs)), text
            reversed_pairs += 1
        else:
            assert in_order, text
    assert reversed_pairs > 0
    stated = batch.stated[:, 0]
    assert stated[:, shapes.ATTRIBUTES.index("shape")].all()
    for a in ("colour", "size", "position"):
        share = stated[:, shapes.ATTRIBUTES.index(a)].float().mean().item()
        assert 0.55 < share < 0.85, (a, share)


def test_caption_text_and_articles():
    assert caption([{"colour": 0, "shape": 0, "size": None, "position": 0},
                    {"colour": 4, "shape": 2, "size": None, "position": 1}], 0) == \
        "a red circle on the left and a blue square on the right, white background"
    assert caption([{"colour": 1, "shape": 5, "size": None, "position": 4}], None) == "an orange star in the center"
    assert caption([{"colour": None, "shape": 3, "size": 1, "position": 2}], 2) == "a large diamond at the top, gray background"
    with pytest.raises(ValueError):
        parse_caption("an red circle")
    with pytest.raises(ValueError):
        parse_caption("a red hexagon")


def test_render_caption_satisfies_the_caption():
    batch = render_caption("a small green ring on the right and a large red star on the left, black background", seed=0)
    assert batch.num_objects.item() == 2 and batch.background.item() == 1
    assert SHAPES[int(batch.shape[0, 0])] == "star" and SHAPES[int(batch.shape[0, 1])] == "ring"
    assert batch.size[0].tolist() == [1, 0]
    img = batch.images[0]
    red = _mask(img, COLOUR_RGB[0], 1)
    green = _mask(img, COLOUR_RGB[3], 1)
    assert red[:, :32].sum() > 100 and red[:, 32:].sum() == 0
    assert green[:, 32:].sum() > 10 and green[:, :32].sum() == 0


def test_dataset_file_roundtrip(tmp_path):
    path = str(tmp_path / "world.pt")
    built = shapes.build_dataset(path, 20, seed=4, chunk=8)
    loaded = shapes.load_dataset(path)
    assert len(loaded) == 20 and loaded.captions == built.captions
    assert torch.equal(loaded.images, built.images)
    assert torch.equal(loaded.images[:8], sample_batch(8, 4).images)
