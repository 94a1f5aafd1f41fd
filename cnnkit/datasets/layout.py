"""The on-disk layout of an image-classification dataset, and writing one from arrays.

A dataset is a folder of PNGs with one subfolder per class, either split

    DATA/training/<class>/*.png
    DATA/testing/<class>/*.png      (optional)

or not split at all (`DATA/<class>/*.png`). `find_splits` reads either; `write_tree` writes one split
from uint8 arrays with a small PNG encoder of its own (numpy + zlib, no Pillow), fast enough that
converting the 60,000 Fashion-MNIST training images takes a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnkit.console import Progress
from cnnkit.errors import DataError
from cnnkit.images import PNG_SIGNATURE
from cnnkit.listing import is_image_name

SAMPLE_DIR = "data/mnist-sample"
MNIST_DIR = "data/mnist_png"

TRAIN_SPLIT = "training"
TEST_SPLIT = "testing"

_LAYOUT = (
    "expected DATA/training/<class>/*.png (and optionally DATA/testing/<class>/*.png), "
    "or DATA/<class>/*.png; `cnnkit data sample` writes an example"
)
_PROGRESS_MIN = 2000  # below this a tree is written in well under a second: no bar
_ZLIB_LEVEL = 6  # zlib's default: ~6% smaller than level 1 on MNIST digits, ~20% slower to write
_IDAT_CRC = zlib.crc32(b"IDAT")
# Exclusive create: the folder is our fresh temporary one, so an existing name is a bug, not data.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


# --------------------------------------------------------------------------------------------
# PNG encoding


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


class _GrayPngEncoder:
    """Encodes many 8-bit grayscale images of one size; the fixed header and trailer are built once."""

    def __init__(self, height: int, width: int):
        # IHDR: width, height, bit depth 8, color type 0 (gray), compression 0, filter 0, no interlace.
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        self.head = PNG_SIGNATURE + _chunk(b"IHDR", ihdr)
        self.tail = _chunk(b"IEND", b"")

    def rows(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W) -> (n, H, 1 + W): each row prefixed by filter type 0 ("None")."""
        raw = np.empty((images.shape[0], images.shape[1], images.shape[2] + 1), dtype=np.uint8)
        raw[:, :, 0] = 0
        raw[:, :, 1:] = images
        return raw

    def encode_rows(self, raw: np.ndarray) -> bytes:
        """One image's filter-prefixed rows (H, 1 + W), C-contiguous, -> the PNG file."""
        z = zlib.compress(raw, _ZLIB_LEVEL)
        crc = zlib.crc32(z, _IDAT_CRC)
        return b"".join((self.head, struct.pack(">I", len(z)), b"IDAT", z, struct.pack(">I", crc), self.tail))


def encode_png(img: np.ndarray) -> bytes:
    """Encode one 8-bit grayscale image as PNG bytes.

    Args:
        img: uint8 array of shape (H, W), H and W at least 1.

    Returns:
        A complete PNG file (one IDAT chunk, no filtering), which any decoder reads back to `img`.
    """
    if img.dtype != np.uint8 or img.ndim != 2 or 0 in img.shape:
        raise ValueError(f"encode_png takes a non-empty uint8 (H, W) array, not {img.dtype} {img.shape}")
    enc = _GrayPngEncoder(*img.shape)
    return enc.encode_rows(enc.rows(img[None])[0])


# --------------------------------------------------------------------------------------------
# Writing a split


def make_temp_dir(parent: str, name: str) -> str:
    """A new hidden folder in `parent`, to be renamed to `name` once complete.

    Unlike `tempfile.mkdtemp` (always mode 0700), it gets the umask's permissions, so the finished
    folder is as readable as one made by `mkdir`.
    """
    for _ in range(100):
        path = os.path.join(parent, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder in {parent}")  # pragma: no cover


def _check_folder_name(name: str, what: str) -> None:
    # A hidden name would be skipped by `list_images`, so such a class would silently vanish.
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise DataError(f"{what} {name!r} cannot be a folder name; use letters, digits, '_' or '-'")


def write_tree(
    out: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    progress_desc: str | None = None,
    overwrite: bool = False,
    ids: np.ndarray | None = None,
) -> int:
    """Write one split as `out/<split>/<class_name>/<index>.png`.

    The file name is the image's position in `images` (or its entry in `ids`), zero-padded to 5
    digits (more for numbers past 99,999), so the same arrays always give the same tree. Every class in
    `class_names` gets a folder, even one without images. The tree is written into a hidden temporary
    folder inside `out` and renamed into place at the end: a crash leaves no half-written split.

    Args:
        out: the dataset folder (created if missing).
        split: the split's folder name, e.g. "training" or "testing".
        images: uint8 (N, H, W).
        labels: integers (N,), each an index into `class_names`.
        class_names: one folder name per class.
        progress_desc: label of a progress bar on stderr, shown for large trees; None for no bar.
        overwrite: replace an existing `out/<split>` instead of refusing.
        ids: distinct non-negative integers (N,) to name the files by instead of positions, e.g. the
            images' indices in a larger array they were taken from.

    Returns:
        The number of images written.

    Raises:
        DataError: `out/<split>` exists (and not `overwrite`), or the arrays or names are unusable.
    """
    images, labels, ids = _checked_arrays(split, images, labels, class_names, ids)

    target = os.path.join(out, split)
    _refuse_existing(target, overwrite)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the folder ({e.strerror or e})") from None

    tmp = make_temp_dir(out, split)
    try:
        _write_files(tmp, images, labels, ids, class_names, progress_desc)
        _refuse_existing(target, overwrite)  # again: another process may have written it meanwhile
        _install(tmp, target, out, split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(images)


def _install(tmp: str, target: str, out: str, split: str) -> None:
    """Rename the finished `tmp` onto `target`, moving an existing split aside first and removing it after."""
    if os.path.isdir(target):
        old = tempfile.mkdtemp(prefix=f".{split}.", suffix=".old", dir=out)
        os.replace(target, os.path.join(old, split))
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _checked_arrays(
    split: str, images: Any, labels: Any, class_names: Sequence[str], ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`write_tree`'s arguments as arrays, or DataError saying which one cannot be written as a tree."""
    _check_folder_name(split, "split")
    for name in class_names:
        _check_folder_name(name, "class name")
    if len(set(class_names)) != len(class_names):
        raise DataError(f"class names must be unique, got {list(class_names)}")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or 0 in images.shape[1:]:
        raise DataError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{len(images)} images but labels {labels.dtype} {labels.shape}; give one integer label per image"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"labels range {labels.min()}..{labels.max()} but there are {len(class_names)} class names; "
            "give one name per label value"
        )
    if ids is None:
        ids = np.arange(len(images))
    ids = np.asarray(ids)
    if ids.shape != labels.shape or not np.issubdtype(ids.dtype, np.integer) or (len(ids) and ids.min() < 0):
        raise DataError(f"ids must be non-negative integers, one per image; got {ids.dtype} {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise DataError("ids must be distinct: two images would get the same file name")
    return images, labels, ids


def _refuse_existing(target: str, overwrite: bool) -> None:
    if os.path.lexists(target) and not os.path.isdir(target):
        raise DataError(f"{target} exists and is not a folder; remove it or pass another --out")
    if os.path.isdir(target) and not overwrite:
        raise DataError(f"{target} exists already; pass another --out or remove it")


def _write_files(
    root: str,
    images: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    class_names: Sequence[str],
    progress_desc: str | None,
) -> None:
    dirs = [os.path.join(root, name) for name in class_names]
    for d in dirs:
        os.mkdir(d)
    n = len(images)
    names = [f"{i:05d}.png" for i in ids.tolist()]
    width = max(map(len, names), default=0)
    # Pad to one width, so that sorting the names sorts the numbers.
    names = [name.rjust(width, "0") for name in names]
    labels = labels.tolist()
    enc = _GrayPngEncoder(images.shape[1], images.shape[2])
    show = progress_desc is not None and n >= _PROGRESS_MIN
    # Rows are filter-prefixed a block at a time: one numpy copy per block instead of one per image,
    # with memory bounded whatever N is.
    block = max(1, min(4096, (64 << 20) // (images.shape[1] * images.shape[2])))
    with Progress(n, progress_desc or "", unit="img") if show else contextlib.nullcontext() as bar:
        for start in range(0, n, block):
            raw = enc.rows(images[start : start + block])
            for j in range(len(raw)):
                i = start + j
                # os.open/os.write: a third faster than open() for files this small.
                fd = os.open(os.path.join(dirs[labels[i]], names[i]), _CREATE, 0o666)
                try:
                    data = enc.encode_rows(raw[j])
                    if os.write(fd, data) != len(data):
                        raise OSError(f"short write to {names[i]} (disk full?)")
                finally:
                    os.close(fd)
            if bar is not None:
                bar.update(len(raw))


# --------------------------------------------------------------------------------------------
# Reading the layout


@dataclass(frozen=True)
class Splits:
    """Where a dataset's splits live.

    Attributes:
        train: the folder holding the training class subfolders.
        test: the folder holding the test class subfolders, or None when the data is not split.
    """

    train: str
    test: str | None


def _class_dirs(folder: str) -> list[str]:
    # Same rules as `list_images`: hidden entries and symlinked folders are not class folders.
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))


def _has_image(folder: str) -> bool:
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif is_image_name(e.name):
                    return True
    return False


def _check_split(folder: str, what: str) -> list[str]:
    classes = _class_dirs(folder)
    if not classes:
        raise DataError(f"{folder}: {what} has no class subfolders; {_LAYOUT}")
    if not any(_has_image(os.path.join(folder, c)) for c in classes):
        raise DataError(f"{folder}: no image files in its class subfolders {classes[:5]}; {_LAYOUT}")
    return classes


def find_splits(data: str) -> Splits:
    """Find the training (and test) folders of a dataset.

    Args:
        data: a folder holding `training/` (and optionally `testing/`), each with one subfolder per
            class, or holding the class subfolders directly (then there is no test split).

    Returns:
        The split folders (paths that start with `data`).

    Raises:
        DataError: the folder is missing, has no class subfolders or no images, has `testing/`
            without `training/`, or its test split has classes that training lacks.
    """
    if not os.path.exists(data):
        raise DataError(f"{data}: no such folder; {_LAYOUT}")
    if not os.path.isdir(data):
        raise DataError(f"{data}: not a folder; {_LAYOUT}")
    train, test = os.path.join(data, TRAIN_SPLIT), os.path.join(data, TEST_SPLIT)
    try:
        if not os.path.isdir(train):
            if os.path.isdir(test):
                raise DataError(f"{data}: has {TEST_SPLIT}/ but no {TRAIN_SPLIT}/; {_LAYOUT}")
            _check_split(data, "the data folder")
            return Splits(train=data, test=None)
        train_classes = _check_split(train, f"{TRAIN_SPLIT}/")
        if not os.path.isdir(test):
            return Splits(train=train, test=None)
        extra = sorted(set(_check_split(test, f"{TEST_SPLIT}/")) - set(train_classes))
        if extra:
            raise DataError(
                f"{test}: classes {extra[:5]} are not in {TRAIN_SPLIT}/; give both splits the same class folders"
            )
        return Splits(train=train, test=test)
    except PermissionError as e:
        raise DataError(f"{e.filename}: cannot read the folder ({e.strerror})") from None
