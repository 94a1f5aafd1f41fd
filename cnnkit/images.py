"""Decoding one image into the model's input. Torch-free: shared by training and inference.

(Finding the files is `cnnkit.listing`'s job; decoding many in worker processes, `cnnkit.batches`.)

One function, `decode_image`, turns an image file's bytes into the model's input, uint8 (C, H, W)
with C = 1 (grayscale, color "L") or 3 (color "RGB"), as the model's record says
(`ModelMeta.input_shape`, `color`, `resize`). Training and `cnnkit infer` both go through it, and it
goes through `convert_pixels` for every decoded image, so what the model saw in training is what it
sees in production.

Conversion policy (`convert_pixels`), for images that are not already the model's mode and size:
  - to grayscale: luminance L = (299 R + 587 G + 114 B) / 1000, rounded (gray stays exactly gray);
  - to RGB: a grayscale image is repeated in the three channels;
  - another size -> stretched to the model's (H, W) with Pillow's bilinear filter (`RESIZE_RULE`:
    antialiased when shrinking; the aspect ratio is not kept, as torchvision's `Resize((H, W))`).
Each such image is counted as "converted". PNG specifics (libspng does the per-pixel work):
  - 1-, 2- and 4-bit gray -> 8-bit by scaling (a 1-bit 1 becomes 255);
  - everything else (RGB, palette, gray + alpha, RGBA, 16-bit) is expanded by libspng to 8-bit RGB:
    the palette looked up, 16-bit samples reduced to their high byte (v >> 8), an alpha channel or a
    tRNS transparency entry dropped (the color values are kept as they are);
  - interlaced (Adam7) images decode like any other.
Other formats (JPEG, WebP, BMP, TIFF, GIF), told by their bytes, not their names, are decoded by
`cnnkit.formats.decode_other` (EXIF orientation applied, CMYK and 16-bit converted) and then go
through the same `convert_pixels`.

Integrity policy ("never a silent wrong answer"): pyspng runs libspng with every checksum turned
off, so a flipped bit in a stored IDAT block decodes to wrong pixels without a word. `decode_image`
therefore walks the chunks itself first and refuses, with a one-line reason (`ImageError`): an empty
file, a chunk that runs past the end of the file or a missing IEND
("truncated"), any chunk whose CRC does not match ("bad CRC", critical and ancillary chunks alike),
an IDAT stream that ends before the last row (libspng: "IDAT stream too short"; never zero-filled),
and a header that declares more than `MAX_PIXELS` pixels ("too large", before anything is
allocated: decompression bombs). Bytes after the IEND chunk are ignored, as every PNG reader does.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable

import numpy as np

from cnnkit.errors import ImageError
from cnnkit.formats import MAX_PIXELS, decode_other
from cnnkit.formats import probe as probe_other

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FILE_BYTES = 256 << 20
_IHDR_HEAD = b"\x00\x00\x00\x0dIHDR"  # length 13, type IHDR: always bytes 8..16 of a PNG
_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole IEND chunk, CRC included
_CHUNK_HEAD = struct.Struct(">I4s")
_U32 = struct.Struct(">I")
_IHDR = struct.Struct(">IIBBBBB")
# PNG color types and the bit depths each allows: 0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA.
_GRAY, _RGB, _GRAY_ALPHA = 0, 2, 4
_COLOR_TYPES = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_HEADERS: dict[bytes, tuple[int, int, int, int]] = {}  # see `_ihdr`


def _not_png(data: bytes) -> ImageError:
    """The reason for bytes that start like a PNG signature but stop inside it (other bytes are not
    sent here: `decode_image` hands them to `cnnkit.formats`)."""
    if len(data) == 0:
        return ImageError("empty file")
    return ImageError(f"truncated PNG ({len(data)} bytes, ends inside the signature)")


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


def _ihdr(data: bytes) -> tuple[int, int, int, int]:
    """(height, width, bit depth, color type) from the IHDR chunk, checked before any pixel is decoded."""
    # A folder's images mostly share one header (signature + IHDR chunk, CRC included): a header
    # checked once is looked up by its 33 bytes (0.1 us instead of 0.9 us).
    known = _HEADERS.get(data[:33])
    if known is not None:
        return known
    if data[:8] != PNG_SIGNATURE:
        raise _not_png(data)
    if data[8:16] != _IHDR_HEAD:
        raise ImageError("truncated PNG (no IHDR chunk)" if len(data) < 16 else "corrupt PNG (no IHDR chunk first)")
    if len(data) < 33:
        raise ImageError("truncated PNG (file ends inside the IHDR chunk)")
    if zlib.crc32(data[12:29]) != _U32.unpack_from(data, 29)[0]:
        raise ImageError("bad CRC in IHDR chunk (corrupt header)")
    width, height, depth, color, _, _, _ = _IHDR.unpack_from(data, 16)  # interlacing: libspng's business
    if width == 0 or height == 0:
        raise ImageError(f"invalid PNG size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise ImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS:,})")
    if depth not in _COLOR_TYPES.get(color, ()):
        raise ImageError(f"corrupt PNG: invalid color type {color} with bit depth {depth}")
    if len(_HEADERS) >= 64:
        _HEADERS.clear()
    _HEADERS[data[:33]] = (height, width, depth, color)
    return height, width, depth, color


def probe(data: bytes) -> tuple[int, int, int]:
    """(height, width, channels: 1 for grayscale, 3 for color) from the header, no pixel decoded.

    `data` may be the file's first bytes only (33 for a PNG). Gray with or without alpha is 1
    channel; RGB, RGBA and palette images are 3. Other formats: `cnnkit.formats.probe`.
    """
    if data[:8] != PNG_SIGNATURE and not PNG_SIGNATURE.startswith(data[:8]):
        return probe_other(data)
    height, width, _, color = _ihdr(data)
    return height, width, 1 if color in (_GRAY, _GRAY_ALPHA) else 3


def _check_chunks(data: bytes) -> None:
    """Every chunk after IHDR is complete and has a matching CRC, up to an IEND chunk.

    ~1 us for a 28 x 28 image (IHDR, IDAT, IEND): the IEND chunk is compared as 12 fixed bytes, so
    the loop runs once per chunk in between.
    """
    n = len(data)
    tail = n - 12 if data[-12:] == _IEND_CHUNK else -1
    pos = 33
    while pos != tail:
        if pos + 12 > n:
            where = "no IEND chunk" if pos == n else "file ends inside a chunk header"
            raise ImageError(f"truncated PNG ({where})")
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        end = pos + 8 + length
        if end + 4 > n:
            raise ImageError(f"truncated PNG (the {_chunk_name(kind)} chunk runs past the end of the file)")
        if zlib.crc32(data[pos + 4 : end]) != _U32.unpack_from(data, end)[0]:
            raise ImageError(f"bad CRC in {_chunk_name(kind)} chunk (corrupt data)")
        if kind == b"IEND":
            return  # bytes after IEND are ignored
        pos = end + 4


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8, L = (299 R + 587 G + 114 B) / 1000 rounded; in row blocks of
    ~1M pixels so that a large image needs ~16 MB of temporaries, not 12 bytes per pixel."""
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    step = max(1, (1 << 20) // rgb.shape[1])
    for r in range(0, rgb.shape[0], step):
        block = rgb[r : r + step].astype(np.uint32)
        lum = block[:, :, 0] * 299 + block[:, :, 1] * 587 + block[:, :, 2] * 114 + 500
        out[r : r + step] = lum // 1000
    return out


_SPNG: tuple | None = None  # see `_spng`


def _spng() -> tuple[Callable[[bytes], np.ndarray], Callable[[bytes], np.ndarray]] | None:
    """(gray, RGB) decoders from pyspng, resolved once; None without pyspng."""
    global _SPNG
    if _SPNG is None:
        try:
            import pyspng
        except ImportError:  # pragma: no cover - exercised on platforms without pyspng wheels
            _SPNG = ()
            return None
        c = getattr(getattr(pyspng, "lib", None), "c", None)
        if c is not None and hasattr(c, "spng_decode_image_bytes") and hasattr(c, "SPNG_FMT_G8"):
            # The binding pyspng.load wraps, called with the format chosen from the IHDR: 0.5 us less
            # per image than pyspng.load's per-call format table.
            dec, g8, rgb8 = c.spng_decode_image_bytes, c.SPNG_FMT_G8, c.SPNG_FMT_RGB8
            _SPNG = (lambda data: dec(data, g8)[:, :, 0], lambda data: dec(data, rgb8))
        else:  # pragma: no cover - another pyspng layout
            _SPNG = (pyspng.load, lambda data: pyspng.load(data, "RGB"))
    return _SPNG or None


def _decode_pixels(data: bytes, gray: bool) -> np.ndarray:
    """uint8 (H, W) gray when `gray` (8-bit or less gray PNGs), else uint8 (H, W, 3) RGB."""
    decoders = _SPNG or _spng()
    if decoders is None:  # pragma: no cover - exercised on platforms without pyspng wheels
        return _decode_pillow(data, gray)
    try:
        return decoders[0](data) if gray else decoders[1](data)
    except Exception as e:  # libspng reports every format error as RuntimeError
        msg = str(e).strip() or type(e).__name__
        raise ImageError(f"corrupt PNG: {msg.split(': ', 1)[-1] if msg.startswith('pyspng') else msg}") from None


def _decode_pillow(data: bytes, gray: bool) -> np.ndarray:  # pragma: no cover - without pyspng only
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I"):  # 16-bit gray: the high byte, as libspng does
                return (np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)
            return np.asarray(im.convert("L" if gray else "RGB"))
    except Exception as e:
        raise ImageError(f"corrupt PNG: {e}") from None


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def convert_pixels(pixels: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """Decoded pixels -> the model's input: the one preprocessing step of training and inference.

    Args:
        pixels: uint8 (H, W) grayscale or (H, W, 3) RGB, any size.
        shape: (C, H, W) the model takes; C = 1 (grayscale) or 3 (RGB).

    Returns:
        (uint8 (C, H, W), whether anything was converted: mode or size; the rules are in the module
        docstring).

    Raises:
        ImageError: an image without pixels (a zero side).
    """
    channels, height, width = shape
    if pixels.size == 0:
        raise ImageError(f"empty image: {'x'.join(map(str, pixels.shape))} pixels")
    converted = False
    if channels == 1 and pixels.ndim == 3:
        pixels, converted = _luminance(pixels), True
    if pixels.shape[:2] != (height, width):
        pixels, converted = _resize(pixels, height, width), True
    if channels == 1:
        return pixels[None], converted
    if pixels.ndim == 2:
        return np.broadcast_to(pixels, (3, height, width)), True
    return pixels.transpose(2, 0, 1), converted


def decode_image(data: bytes, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """Decode an image file's bytes to the model's input (the policies are in the module docstring).

    Args:
        data: the file's bytes.
        shape: (C, H, W) the model takes (`ModelMeta.input_shape`).

    Returns:
        (uint8 array of `shape`, whether the image had to be converted). The array may be a read-only
        view: copy it before writing to it.

    Raises:
        ImageError: the bytes are not a usable image (the message is the reason).
    """
    if data[:8] != PNG_SIGNATURE and not PNG_SIGNATURE.startswith(data[:8]):  # JPEG, WebP, ... by content
        return convert_pixels(decode_other(data), shape)
    _, _, depth, color = _ihdr(data)
    _check_chunks(data)
    gray = color == _GRAY and depth <= 8
    arr = _decode_pixels(data, gray)
    if gray and depth == 8 and shape[0] == 1 and arr.shape == shape[1:]:
        return arr[None], False  # the common case, first: 8-bit gray of the model's size
    arr, converted = convert_pixels(arr, shape)
    return arr, converted or depth != 8 or color not in (_GRAY, _RGB)  # 16-bit, palette, alpha: converted too


HEAD_BYTES = 1 << 18  # a JPEG's EXIF segment (at most 64 KB) and frame header fit
_READ_CHUNK = 1 << 16  # below malloc's mmap threshold: a small image costs one read + one EOF read
# O_NONBLOCK: a FIFO that replaced a listed file reads as empty instead of blocking the run forever.
_O_RDONLY = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def read_bytes(path: str) -> bytes:
    """The file's bytes, refusing files over MAX_FILE_BYTES; OS errors become ImageError.

    Plain `os.read` with a small first request: `open(path, "rb").read(MAX_FILE_BYTES + 1)` allocates
    the whole 256 MB limit on every call, which made reading a 28 x 28 PNG cost 34 us instead of 4 us.
    """
    try:
        fd = os.open(path, _O_RDONLY)
        try:
            parts = [os.read(fd, _READ_CHUNK)]
            total = len(parts[0])
            if total == _READ_CHUNK and os.fstat(fd).st_size > MAX_FILE_BYTES:  # refuse before reading it
                raise ImageError(f"too large: file over {MAX_FILE_BYTES >> 20} MB")
            # The empty read that proves the end costs ~0.3 us; requests double for large files.
            while total and (chunk := os.read(fd, min(max(total, _READ_CHUNK), MAX_FILE_BYTES + 1 - total))):
                parts.append(chunk)
                total += len(chunk)
                if total > MAX_FILE_BYTES:
                    raise ImageError(f"too large: file over {MAX_FILE_BYTES >> 20} MB")
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_head(path: str, n: int = HEAD_BYTES) -> bytes:
    """The first `n` bytes of a file, for `probe` (a header, with the EXIF block that may precede a
    JPEG's frame header); OS errors become ImageError."""
    try:
        fd = os.open(path, _O_RDONLY)
        try:
            return os.read(fd, n)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}") from None


def read_image(path: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """Read and decode one file (see `decode_image`); OS errors become ImageError."""
    return decode_image(read_bytes(path), shape)
