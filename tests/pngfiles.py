"""PNG files of every kind for the tests: a small encoder for any color type, bit depth and Adam7
interlacing (Pillow cannot write interlaced, 2-bit or 16-bit color PNGs), and the expected model
input computed independently of cnnkit's decoder."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # color type -> samples per pixel
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _scanlines(samples: np.ndarray, depth: int) -> bytes:
    """(h, w, c) sample values -> filter-type-0 scanlines."""
    rows = []
    for row in samples:
        flat = row.reshape(-1)
        if depth == 16:
            line = flat.astype(">u2").tobytes()
        elif depth == 8:
            line = flat.astype(np.uint8).tobytes()
        else:  # pack `depth`-bit samples, most significant first
            bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :].reshape(-1)
            line = np.packbits(bits).tobytes()
        rows.append(b"\x00" + line)
    return b"".join(rows)


def encode(
    samples: np.ndarray,
    depth: int,
    color: int,
    interlace: bool = False,
    palette: np.ndarray | None = None,
    trns: bytes | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A PNG of `samples` ((h, w) or (h, w, channels) integers below 2**depth)."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples[:, :, None]
    h, w, c = samples.shape
    assert c == CHANNELS[color] and depth in DEPTHS[color]
    if interlace:
        raw = b"".join(
            _scanlines(samples[y0::dy, x0::dx], depth) for x0, y0, dx, dy in ADAM7 if samples[y0::dy, x0::dx].size
        )
    else:
        raw = _scanlines(samples, depth)
    out = SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, int(interlace)))
    for kind, data in extra:
        out += chunk(kind, data)
    if palette is not None:
        out += chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def random_png(
    rng: np.random.Generator, h: int, w: int, color: int, depth: int, interlace: bool = False
) -> tuple[bytes, np.ndarray]:
    """(PNG bytes, the uint8 gray image cnnkit's documented policy makes of it)."""
    samples = rng.integers(0, 2**depth, (h, w, CHANNELS[color]))
    palette = rng.integers(0, 256, (2**depth, 3)) if color == 3 else None
    return encode(samples, depth, color, interlace, palette=palette), expected_gray(samples, depth, color, palette)


def expected_gray(samples: np.ndarray, depth: int, color: int, palette: np.ndarray | None = None) -> np.ndarray:
    """The policy, written out: low-depth gray scaled to 8 bits, 16-bit -> high byte, palette looked
    up, alpha dropped, color -> (299 R + 587 G + 114 B) / 1000 rounded."""
    s = np.asarray(samples, dtype=np.int64)
    if s.ndim == 2:
        s = s[:, :, None]
    if color == 3:
        rgb = np.asarray(palette, dtype=np.int64)[s[:, :, 0]]
    elif depth == 16:
        rgb = s >> 8
    elif depth < 8:
        rgb = s * 255 // (2**depth - 1)
    else:
        rgb = s
    if color in (0, 4):
        return rgb[:, :, 0].astype(np.uint8)
    lum = (rgb[:, :, 0] * 299 + rgb[:, :, 1] * 587 + rgb[:, :, 2] * 114 + 500) // 1000
    return lum.astype(np.uint8)


def pillow_png(arr: np.ndarray, mode: str | None = None, **save: object) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr)
    if mode is not None and mode != im.mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, data length) of every chunk of a well-formed PNG."""
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def fix_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC (to get corrupt *content* past the CRC check, into libspng)."""
    out = bytearray(data)
    pos = 8
    while pos + 12 <= len(out):
        length = struct.unpack(">I", out[pos : pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4 : end])))
        pos = end + 4
    return bytes(out)
