import numpy as np
import pytest

from trainer.io.png import read_png, read_png_minimal, write_png


def test_png_writer_and_minimal_decoder(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    write_png(str(tmp_path / "a.png"), pixels)
    assert np.array_equal(read_png_minimal(str(tmp_path / "a.png")), pixels)
    assert np.array_equal(read_png(str(tmp_path / "a.png")), pixels)
    grey = rng.integers(0, 256, size=(5, 6), dtype=np.uint8)
    write_png(str(tmp_path / "g.png"), grey)
    assert np.array_equal(read_png_minimal(str(tmp_path / "g.png")), np.repeat(grey[:, :, None], 3, 2))


def png_with_every_filter(path, pixels):
    """An RGB PNG whose rows cycle through filter types 0-4 (None, Sub, Up, Average, Paeth)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3).astype(int)
    raw = bytearray()
    for y in range(height):
        kind = y % 5
        line, prev = rows[y], rows[y - 1] if y else np.zeros(width * 3, int)
        raw.append(kind)
        for x in range(width * 3):
            a = line[x - 3] if x >= 3 else 0
            b = prev[x]
            c = prev[x - 3] if x >= 3 else 0
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
            predictor = [0, a, b, (a + b) // 2, paeth][kind]
            raw.append((line[x] - predictor) % 256)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


def test_minimal_decoder_undoes_every_filter_type(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(10, 6, 3), dtype=np.uint8)
    png_with_every_filter(str(tmp_path / "f.png"), pixels)
    assert np.array_equal(read_png_minimal(str(tmp_path / "f.png")), pixels)


def test_minimal_decoder_matches_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    x = np.arange(24 * 20 * 3).reshape(24, 20, 3)
    pixels = ((x * 7 + (x // 60) ** 2) % 256).astype(np.uint8)  # smooth-ish: Pillow picks varied filters
    for mode, array in (("RGB", pixels), ("RGBA", np.dstack([pixels, pixels[:, :, :1]])), ("L", pixels[:, :, 0])):
        path = str(tmp_path / f"{mode}.png")
        Image.fromarray(array, mode).save(path, optimize=True)
        expected = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(read_png_minimal(path), expected), mode
    for colours in (2, 4, 16, 200):  # 1-, 2-, 4- and 8-bit palettes
        path = str(tmp_path / f"P{colours}.png")
        Image.fromarray(pixels).quantize(colours).save(path, bits=max(1, (colours - 1).bit_length()))
        assert np.array_equal(read_png_minimal(path), np.asarray(Image.open(path).convert("RGB"))), colours
    path = str(tmp_path / "bw.png")
    Image.fromarray(pixels[:, :, 0] > 100).save(path)  # 1-bit grey
    assert np.array_equal(read_png_minimal(path), np.asarray(Image.open(path).convert("RGB")))
