"""Finding, decoding and batching PNG images. Torch-free: shared by training and inference.

One function, `decode_image`, turns PNG bytes into the model's input (uint8, H x W grayscale);
training and `cnnkit infer` both go through it, so what the model saw in training is what it sees
in production.

Conversion policy for valid PNGs that are not already 8-bit grayscale of the model's size:
  - color (RGB, palette) -> luminance L = (299 R + 587 G + 114 B) / 1000, rounded (as Pillow's "L");
  - an alpha channel is dropped (the color values are kept as they are);
  - 16-bit samples -> 8-bit by v * 255 / 65535, rounded;
  - another size -> resized to the model's size with Pillow's bilinear filter.
Each such image is counted as "converted". Files that are not decodable PNGs raise `ImageError`
with a one-line reason; a header that declares more than `MAX_PIXELS` pixels is refused before
anything is allocated (decompression bombs).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from cnnkit.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 1 << 26  # 67M pixels: far above any real input of a small CNN, far below a bomb
MAX_FILE_BYTES = 256 << 20


class ImageError(DataError):
    """One image that cannot be used; the message is the one-line reason."""


def is_png_name(name: str) -> bool:
    return name[-4:].lower() == ".png"


def png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the IHDR chunk, validated before any pixel is decoded."""
    if len(data) == 0:
        raise ImageError("empty file")
    if data[:8] != PNG_SIGNATURE:
        raise ImageError("not a PNG (bad signature)")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError("truncated PNG (no IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise ImageError(f"invalid PNG size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise ImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS:,})")
    return height, width


def _to_gray8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if arr.ndim == 3:
        c = arr.shape[2]
        if c in (1, 2):  # gray or gray + alpha
            arr = arr[:, :, 0]
        else:  # RGB or RGBA
            rgb = arr[:, :, :3].astype(np.uint32)
            arr = ((rgb[:, :, 0] * 299 + rgb[:, :, 1] * 587 + rgb[:, :, 2] * 114 + 500) // 1000).astype(np.uint8)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _decode_pixels(data: bytes) -> np.ndarray:
    try:
        import pyspng
    except ImportError:  # pragma: no cover - exercised on platforms without pyspng wheels
        return _decode_pillow(data)
    try:
        return pyspng.load(data)
    except Exception as e:  # libspng reports every format error as RuntimeError
        msg = str(e).strip() or type(e).__name__
        if "palette" in msg or "unsupported" in msg.lower():
            return _decode_pillow(data)
        raise ImageError(f"corrupt PNG: {msg}") from None


def _decode_pillow(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("P", "1", "LA", "PA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
            if im.mode.startswith("I;16") or im.mode == "I":
                return np.asarray(im, dtype=np.uint16)
            return np.asarray(im)
    except Exception as e:
        raise ImageError(f"corrupt PNG: {e}") from None


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img, mode="L").resize((width, height), Image.BILINEAR))


def decode_image(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Decode PNG bytes to the model's input.

    Args:
        data: the file's bytes.
        size: (height, width) the model takes.

    Returns:
        (uint8 array of shape `size`, whether the image had to be converted).

    Raises:
        ImageError: the bytes are not a usable PNG (the message is the reason).
    """
    png_size(data)
    arr = _decode_pixels(data)
    if arr.ndim == 2 and arr.dtype == np.uint8 and arr.shape == size:
        return arr, False
    arr = _to_gray8(arr)
    if arr.shape != size:
        arr = _resize(arr, *size)
    return arr, True


_READ_CHUNK = 1 << 16  # below malloc's mmap threshold: a small image costs one read + one EOF read
_O_RDONLY = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_bytes(path: str) -> bytes:
    """The file's bytes, refusing files over MAX_FILE_BYTES; OS errors become ImageError.

    Plain `os.read` with a small first request: `open(path, "rb").read(MAX_FILE_BYTES + 1)` allocates
    the whole 256 MB limit on every call, which made reading a 28 x 28 PNG cost 34 us instead of 4 us.
    """
    try:
        fd = os.open(path, _O_RDONLY)
        try:
            parts = [os.read(fd, _READ_CHUNK)]
            total = len(parts[0])
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


def read_image(path: str, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Read and decode one file (see `decode_image`); OS errors become ImageError."""
    return decode_image(_read_bytes(path), size)


# --------------------------------------------------------------------------------------------
# Listing


@dataclass
class Listing:
    """The PNG files under a folder, in a deterministic order.

    Attributes:
        root: the folder.
        files: paths relative to root, sorted; "/"-separated.
        skipped: (relative path, reason) for entries that looked like images but cannot be read.
    """

    root: str
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_pngs(root: str) -> Listing:
    """Walk `root` recursively for `*.png` files (any case).

    Symlinks to files are followed; symlinked folders are not entered (no cycles). Hidden files and
    folders (names starting with ".") are skipped silently, as `ls` does. A dangling symlink or a
    folder named like a PNG is reported in `skipped`, never fatal.
    """
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel) if rel else root)
        except OSError as e:
            skipped.append((rel, f"unreadable folder: {e.strerror}"))
            continue
        with it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                path = f"{rel}/{name}" if rel else name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if is_png_name(name):
                            skipped.append((path, "a folder named like a PNG (its contents are still read)"))
                        stack.append(path)
                        continue
                    if not is_png_name(name):
                        continue
                    if entry.is_file(follow_symlinks=True):
                        files.append(path)
                    elif entry.is_symlink() and not os.path.exists(entry.path):
                        skipped.append((path, "dangling symlink"))
                    else:
                        skipped.append((path, "not a regular file"))
                except OSError as e:
                    skipped.append((path, f"unreadable: {e.strerror}"))
    files.sort()
    return Listing(root=root, files=files, skipped=skipped)


def class_of(rel: str) -> str | None:
    """The class a file belongs to by its folder: the first path component, if any."""
    head, sep, _ = rel.partition("/")
    return head if sep else None


# --------------------------------------------------------------------------------------------
# Batched decoding in worker processes


@dataclass
class DecodedBatch:
    """One batch of decoded images.

    Attributes:
        start: position (in the list given to `decode_batches`) of the batch's first file.
        images: uint8 (n, H, W), the files that decoded, in order.
        positions: int64 (n,), each image's position in the list.
        failures: (position, reason) for files that did not decode.
        converted: how many images were converted by the policy above.
    """

    start: int
    images: np.ndarray
    positions: np.ndarray
    failures: list[tuple[int, str]]
    converted: int


def _decode_chunk(root: str, files: Sequence[str], start: int, size: tuple[int, int]) -> DecodedBatch:
    # The hot loop of `cnnkit infer` (~25 us per 28 x 28 image: ~12 us of it is libspng + zlib).
    out = np.empty((len(files), *size), dtype=np.uint8)
    ok = np.empty(len(files), dtype=np.int64)
    failures: list[tuple[int, str]] = []
    n = converted = 0
    prefix = os.path.join(root, "")
    for i, rel in enumerate(files):
        try:
            out[n], conv = decode_image(_read_bytes(prefix + rel), size)
        except ImageError as e:
            failures.append((start + i, str(e)))
            continue
        ok[n] = start + i
        converted += conv
        n += 1
    if n < len(files):  # copy, so that pickling the batch does not drag the unused rows along
        return DecodedBatch(start, out[:n].copy(), ok[:n].copy(), failures, converted)
    return DecodedBatch(start, out, ok, failures, converted)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def decode_batches(
    root: str,
    files: Sequence[str],
    size: tuple[int, int],
    batch_size: int,
    workers: int | None = None,
    min_files_for_workers: int = 2048,
) -> Iterator[DecodedBatch]:
    """Decode `files` (relative to `root`) in batches, in order, in worker processes.

    At most `2 * workers` batches are in flight, so memory stays bounded whatever the number of
    files. With `workers=0`, or when there are fewer than `min_files_for_workers` files (too few to
    pay for starting processes), the batches are decoded in this process. The answer never depends
    on `workers` or `batch_size`.

    Call this *before* creating an onnxruntime session: worker processes are forked on the first
    `next()`, and forking a process whose thread pools are running is unsafe.
    """
    if batch_size < 1:
        raise DataError("batch size must be at least 1")
    workers = default_workers() if workers is None else workers
    chunks = [(s, files[s : s + batch_size]) for s in range(0, len(files), batch_size)]
    if workers <= 0 or len(files) < min_files_for_workers or len(chunks) < 2:
        for s, chunk in chunks:
            yield _decode_chunk(root, chunk, s, size)
        return

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
        pending = []
        it = iter(chunks)
        try:
            for s, chunk in it:
                pending.append(pool.submit(_decode_chunk, root, chunk, s, size))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                batch = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(_decode_chunk, root, nxt[1], nxt[0], size))
                yield batch
        finally:
            for f in pending:
                f.cancel()
