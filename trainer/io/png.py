"""PNG files without an image library: an 8-bit writer, and a small decoder (8-bit and 16-bit,
grey/RGB/palette/alpha, non-interlaced) used when Pillow is not installed."""
from __future__ import annotations

import struct
import zlib

import numpy as np


def write_png(path: str, pixels: np.ndarray) -> None:
    """Writes uint8 pixels [H,W] (grey), [H,W,3] (RGB) or [H,W,4] (RGBA) as an 8-bit PNG."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                + chunk(b"IEND", b""))


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _unfilter(data: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    pos = 0
    for y in range(height):
        kind = data[pos]
        line = np.frombuffer(data, dtype=np.uint8, count=stride, offset=pos + 1).astype(np.int32)
        pos += stride + 1
        if kind == 0:
            row = line
        elif kind == 2:
            row = (line + prev) & 0xFF
        else:
            row = line.copy()
            for x in range(stride):
                left = row[x - bpp] if x >= bpp else 0
                if kind == 1:
                    row[x] = (row[x] + left) & 0xFF
                elif kind == 3:
                    row[x] = (row[x] + ((left + prev[x]) >> 1)) & 0xFF
                elif kind == 4:
                    up = prev[x]
                    up_left = prev[x - bpp] if x >= bpp else 0
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                    row[x] = (row[x] + pred) & 0xFF
                else:
                    raise ValueError(f"bad PNG filter type {kind} in row {y}")
        out[y] = row
        prev = row
    return out


def read_png_minimal(path: str) -> np.ndarray:
    """uint8 RGB [H,W,3] from a non-interlaced PNG, without Pillow (alpha is dropped; 1/2/4-bit grey and
    palette images are supported too)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, palette, header = 8, [], None, None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path}: PNG without IHDR")
    width, height, depth, color_type, _, _, interlace = header
    channels = _PNG_CHANNELS.get(color_type)
    low_depth_ok = depth in (1, 2, 4) and color_type in (0, 3)
    if interlace or channels is None or not (depth in (8, 16) or low_depth_ok):
        raise ValueError(f"{path}: PNG with bit depth {depth}, colour type {color_type}, interlace {interlace} "
                         "needs Pillow (python3-pil)")
    bits_per_pixel = channels * depth
    stride = (width * bits_per_pixel + 7) // 8
    rows = _unfilter(zlib.decompress(b"".join(idat)), height, stride, max(1, bits_per_pixel // 8))
    if depth == 16:
        rows = rows.reshape(height, width * channels, 2)[:, :, 0]  # most significant byte
    elif depth < 8:
        bits = np.unpackbits(rows, axis=1)[:, : width * depth].reshape(height, width, depth)
        rows = (bits * (1 << np.arange(depth - 1, -1, -1, dtype=np.uint8))).sum(2).astype(np.uint8)
        if color_type == 0:
            rows = rows * np.uint8(255 // ((1 << depth) - 1))
    pixels = rows.reshape(height, width, channels)
    if color_type == 3:
        if palette is None:
            raise ValueError(f"{path}: palette PNG without PLTE")
        return palette[pixels[:, :, 0]]
    if channels in (1, 2):
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def read_png(path: str) -> np.ndarray:
    """uint8 RGB [H,W,3]: Pillow when installed, else the minimal decoder."""
    try:
        from PIL import Image
    except ImportError:
        return read_png_minimal(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
