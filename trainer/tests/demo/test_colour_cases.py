"""The strict colour reading's test images (test/fixtures/colour) are what trainer.demo.colour_cases draws,
and drawing them leaves the world's palette and sizes as they were."""
import gzip
import os

import numpy as np

from trainer.demo import colour_cases, shapes

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "test", "fixtures", "colour")


def test_fixture_is_up_to_date(tmp_path):
    n = colour_cases.write_cases(str(tmp_path))
    for name in ("cases.json", "renders.bin.gz"):
        with open(tmp_path / name, "rb") as new, open(os.path.join(FIXTURE, name), "rb") as old:
            assert new.read() == old.read(), f"{name} differs: run python3 -m trainer.demo.colour_cases"
    assert n == 396
    assert shapes.COLOUR_RGB[0] == (220, 40, 40) and len(shapes.COLOUR_RGB) == 6 and len(shapes.SIZES) == 2


def test_recoloured_pixels_are_drawn_as_stated():
    with colour_cases._ExtendedWorld():
        cases, images = colour_cases.build_cases()
    assert len(shapes.SIZE_PX) == 2 and len(shapes.SIZES) == 2  # restored
    assert images.shape == (len(cases), 64, 64, 3) and images.dtype == np.uint8
    colours = {tuple(int(v) for v in c) for c in images.reshape(-1, 3)}
    assert colour_cases.ORANGE_RED in colours and colour_cases.PURPLE_GREY in colours
    blotch = [i for i, c in enumerate(cases) if c.get("note", "").startswith("red circle with a purple-grey")]
    assert blotch and all((images[i] == np.array(colour_cases.PURPLE_GREY)).all(-1).sum() >= 100 for i in blotch)
    with gzip.open(os.path.join(FIXTURE, "renders.bin.gz")) as f:
        assert len(f.read()) == images.size
