"""The IDX file format of MNIST and Fashion-MNIST, and turning an IDX pair into a PNG tree.

An IDX file is a 4-byte magic number `00 00 TT NN` (TT: element type, 0x08 = uint8; NN: number of
dimensions), NN big-endian uint32 sizes, then the elements in row-major order. The files are usually
gzip-compressed; `read_idx` recognizes gzip by its magic bytes, whatever the file is called.
It decompresses no more than the header declares (at most MAX_IDX_BYTES) plus one byte to refuse
trailing data, so a gzip bomb costs at most that much memory.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from cnnkit.datasets.layout import write_tree
from cnnkit.errors import DataError

FASHION_MNIST_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

_GZIP_MAGIC = b"\x1f\x8b"
_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_CHUNK = 16 << 20
# The most element bytes a header may declare. The header decides how much is decompressed, so without
# a bound a small gzip file can expand to gigabytes; EMNIST ByClass, the largest IDX set in use, has
# 547 MB of training images.
MAX_IDX_BYTES = 1 << 30


def _read_upto(stream: BinaryIO, n: int) -> bytearray:
    # In chunks, so a header that claims terabytes fails on the missing data instead of on allocation.
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of uint8 elements, gzip-compressed or not.

    Args:
        path: the file.

    Returns:
        A writable uint8 array with the file's dimensions, e.g. (N, 28, 28) for images, (N,) for labels.

    Raises:
        DataError: the file is unreadable, not IDX, not uint8, truncated, or has trailing data.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        if not compressed:
            try:
                return _parse(path, f)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            return _parse(path, gzip.GzipFile(fileobj=f, mode="rb"))  # type: ignore[arg-type]
        except (OSError, EOFError, zlib.error) as e:
            # gzip reports a cut-off stream as EOFError and a damaged one as BadGzipFile / zlib.error.
            raise DataError(f"{path}: corrupt or truncated gzip data ({e}); download the file again") from None


def _parse(path: str, stream: BinaryIO) -> np.ndarray:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic {magic.hex() or 'none'}); expected 0000 08 NN")
    dtype, ndim = magic[2], magic[3]
    if dtype != 0x08:
        name = _TYPES.get(dtype, "unknown type")
        raise DataError(f"{path}: IDX elements are {name} (0x{dtype:02x}); only uint8 (0x08) is supported")
    head = stream.read(4 * ndim)
    if len(head) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; download the file again")
    dims = struct.unpack(f">{ndim}I", head)
    count = math.prod(dims)
    if count > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: the IDX header declares shape {dims}, {count:,} bytes, over the "
            f"{MAX_IDX_BYTES >> 20:,} MB cnnkit reads; not an image set cnnkit can train on"
        )
    data = _read_upto(stream, count)
    if len(data) < count:
        raise DataError(
            f"{path}: truncated: {len(data):,} of {count:,} bytes for shape {dims}; download the file again"
        )
    if stream.read(1):
        raise DataError(f"{path}: trailing data after {count:,} bytes for shape {dims}; not a valid IDX file")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def idx_to_tree(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    out: str,
    split: str,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> int:
    """Convert an IDX image/label pair (MNIST, Fashion-MNIST, ...) to `out/<split>/<class>/<index>.png`.

    Args:
        images_path: IDX file of uint8 images (N, H, W).
        labels_path: IDX file of uint8 labels (N,).
        out: the dataset folder.
        split: the split to write, e.g. "training" or "testing".
        class_names: a folder name per label value; default "0", "1", ... up to the largest label.
        overwrite: replace an existing `out/<split>`.

    Returns:
        The number of images written.

    Raises:
        DataError: the files are unusable or do not match, or `out/<split>` exists (see `write_tree`).
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}; is it a labels file?")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}; is it an images file?")
    if len(images) != len(labels):
        raise DataError(
            f"{len(images):,} images in {images_path} but {len(labels):,} labels in {labels_path}; "
            "pass the labels file that goes with the images"
        )
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    elif len(labels) and int(labels.max()) >= len(class_names):
        raise DataError(
            f"{labels_path}: label {int(labels.max())} but only {len(class_names)} class names; "
            "give one name per label value"
        )
    return write_tree(out, split, images, labels, class_names, progress_desc=f"writing {split}", overwrite=overwrite)
