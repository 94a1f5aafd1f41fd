"""The bundled sample: 5,000 real MNIST digits (500 per class) that ship inside the package.

It lets every command run offline, in seconds: `write_sample` writes it as PNG trees with a fixed
400 / 100 per-class training / testing split. Credits and license: `assets/NOTICE.md`.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources

import numpy as np

from cnnkit.console import log
from cnnkit.datasets.idx import read_idx
from cnnkit.datasets.layout import SAMPLE_DIR, TEST_SPLIT, TRAIN_SPLIT, Splits, make_temp_dir, write_tree
from cnnkit.errors import DataError

IMAGES_ASSET = "mnist-5k-images-idx3-ubyte.gz"
LABELS_ASSET = "mnist-5k-labels-idx1-ubyte.gz"
CLASS_NAMES = tuple(str(d) for d in range(10))
TEST_PER_CLASS = 100  # of the 500 per class; the other 400 are for training
SPLIT_SEED = 20240501


def sample_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits, read from the package's assets (works from an installed wheel or a zip).

    Returns:
        (images uint8 (5000, 28, 28), labels uint8 (5000,)), in the original order.
    """
    assets = resources.files("cnnkit.datasets") / "assets"
    arrays = []
    for name in (IMAGES_ASSET, LABELS_ASSET):
        with resources.as_file(assets / name) as path:
            arrays.append(read_idx(path))
    images, labels = arrays
    if images.shape != (5000, 28, 28) or labels.shape != (5000,):
        raise DataError(f"the bundled sample is damaged: {images.shape} / {labels.shape}; reinstall cnnkit")
    return images, labels


def split_sample(labels: np.ndarray, test_per_class: int = TEST_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic training / testing split, the same per class, on every machine.

    For each class, its indices are ordered by keys drawn from a PCG64 bit generator seeded with
    `(SPLIT_SEED, class)`; the first `test_per_class` go to testing, the rest to training. Raw PCG64
    output is used (not `Generator.permutation`) because NumPy keeps bit-generator streams stable
    across versions but not the algorithms of `Generator` methods, and a split that changed with a
    NumPy upgrade would silently mix test images into training.

    Args:
        labels: integer labels (N,).
        test_per_class: how many of each class go to testing (all of a class with fewer go there).

    Returns:
        (train_idx, test_idx): sorted int64 indices into `labels`, disjoint, together all of them.
    """
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keys = np.random.PCG64([SPLIT_SEED, int(c)]).random_raw(len(idx))
        order = idx[np.argsort(keys, kind="stable")]
        test.append(order[:test_per_class])
        train.append(order[test_per_class:])
    return _sorted_concat(train), _sorted_concat(test)


def _sorted_concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def write_sample(out: str = SAMPLE_DIR, overwrite: bool = False) -> Splits:
    """Write the bundled digits as `out/training/<digit>/*.png` (4,000) and `out/testing/<digit>/*.png` (1,000).

    File names are the digits' positions in the bundled arrays. When `out` does not exist, the whole
    sample is written next to it and renamed into place, so it appears complete or not at all.

    Args:
        out: the dataset folder.
        overwrite: replace existing `training/` and `testing/` folders.

    Returns:
        The split folders.

    Raises:
        DataError: a split exists already and not `overwrite`.
    """
    images, labels = sample_arrays()
    train_idx, test_idx = split_sample(labels)
    if not overwrite:  # check both before writing either
        for split in (TRAIN_SPLIT, TEST_SPLIT):
            if os.path.lexists(os.path.join(out, split)):
                raise DataError(f"{os.path.join(out, split)} exists already; pass another --out or remove it")

    def write(root: str) -> None:
        # Files are named by their index in the bundled arrays, so a name means the same digit in
        # both splits and on every machine.
        for split, idx in ((TRAIN_SPLIT, train_idx), (TEST_SPLIT, test_idx)):
            write_tree(root, split, images[idx], labels[idx], CLASS_NAMES, ids=idx, overwrite=overwrite)

    if os.path.exists(out):
        write(out)
    else:
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        tmp = make_temp_dir(parent, os.path.basename(os.path.abspath(out)))
        try:
            write(tmp)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Splits(train=os.path.join(out, TRAIN_SPLIT), test=os.path.join(out, TEST_SPLIT))


def ensure_sample(out: str = SAMPLE_DIR) -> str:
    """The bundled sample's folder, written first if it is not there (one line on stderr says where).

    Args:
        out: the sample's folder.

    Returns:
        `out`, holding `training/` and `testing/` with the sample's 4,000 / 1,000 digits.

    Raises:
        DataError: `out` exists but is not a complete sample (e.g. `testing/` is missing, or files
            were removed); the message says to remove it.
    """
    train, test = os.path.join(out, TRAIN_SPLIT), os.path.join(out, TEST_SPLIT)
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        write_sample(out)
        log(f"wrote the bundled MNIST sample (4,000 training / 1,000 testing digits) to {out}")
        return out
    expected = {TRAIN_SPLIT: 500 - TEST_PER_CLASS, TEST_SPLIT: TEST_PER_CLASS}
    for split, folder in ((TRAIN_SPLIT, train), (TEST_SPLIT, test)):
        for digit in CLASS_NAMES:
            # Counting 20 folders costs milliseconds and catches a sample cut short or edited by hand.
            d = os.path.join(folder, digit)
            n = sum(1 for name in os.listdir(d) if name.endswith(".png")) if os.path.isdir(d) else 0
            if n != expected[split]:
                raise DataError(
                    f"{out} is not a complete sample ({d}: {n} PNGs, expected {expected[split]}); "
                    f"remove {out} and run again to rewrite it"
                )
    return out
