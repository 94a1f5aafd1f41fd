"""Loading an image tree into memory as uint8 arrays, with the same decoder `cnnkit infer` uses.

The input shape a run trains on is `cnnkit.batches.input_shape` (shared with `cnnkit.export.export_module`,
which probes a folder the same way), imported here under its old name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from cnnkit.batches import class_names, decode_batches, input_shape
from cnnkit.console import Progress, log, printable
from cnnkit.errors import DataError
from cnnkit.listing import class_of, describe_ignored, list_pngs

SKIPPED_PRINTED = 5  # files named in the warning; all are counted
SKIPPED_KEPT = 1000  # files listed in metrics.json and `cnnkit train --json`


@dataclass
class LoadedSplit:
    """A split in memory.

    Attributes:
        folder: where it came from.
        images: uint8 (N, C, H, W).
        labels: int64 (N,), indices into `classes`.
        classes: class names (folder names), in label order.
        paths: file paths relative to `folder`, in the same order as `images`.
        skipped: (path relative to `folder`, reason) of the files of these classes that could not be
            used: named like a PNG but a dangling symlink, symlink loop, FIFO, device or unreadable
            (never opened), or a PNG that did not decode; sorted. With `shard`, this rank's share.
        ignored: entries of `folder` left out on purpose, by kind (`cnnkit.listing.Listing.ignored`:
            non-image files, hidden entries, symlinked folders), nonzero counts only.
    """

    folder: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    n_converted: int = 0  # images converted to the run's color mode or size (`cnnkit.images.convert_pixels`)


def _decode_all(
    folder: str, files: list[str], shape: tuple[int, int, int], workers: int | None, desc: str, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]], int]:
    """Decode `files` into one (N, C, H, W) array: (images, which decoded, failures, how many converted)."""
    images = np.empty((len(files), *shape), dtype=np.uint8)
    keep = np.zeros(len(files), dtype=bool)
    failures: list[tuple[int, str]] = []
    converted = 0
    with Progress(len(files), desc, unit="img", enabled=progress) as bar:
        for batch in decode_batches(folder, files, shape, batch_size=1024, workers=workers):
            images[batch.positions] = batch.images
            keep[batch.positions] = True
            failures.extend(batch.failures)
            converted += batch.converted
            bar.update(len(batch.positions) + len(batch.failures))
    return images, keep, failures, converted


def load_split(
    folder: str,
    classes: tuple[str, ...],
    shape: tuple[int, int, int] | None = None,
    color: str = "auto",
    size: tuple[int, int] | None = None,
    workers: int | None = None,
    desc: str = "loading",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> LoadedSplit:
    """Decode every PNG under `folder/<class>/` for the given classes.

    Args:
        folder: a folder of class subfolders.
        classes: the class names to load, in label order (subfolders not listed are ignored).
        shape: (C, H, W) the images are decoded to (converted and resized as `cnnkit infer` does);
            None: `input_shape(folder, files, color, size)`.
        color, size: `--color` and `--size` (used when `shape` is None).
        workers: decoder processes (None: one per core).
        shard: (k, n): load only every n-th file starting at the k-th (a distributed rank's share).

    Raises:
        DataError: a class folder is missing or empty, or no image is readable.
    """
    listing = list_pngs(folder)
    wanted = {c: i for i, c in enumerate(classes)}
    files = [f for f in listing.files if class_of(f) in wanted]
    # What the walk could not use (it never opens these: a FIFO would block), in the wanted classes
    # (an unreadable class folder is its own entry); each rank reports its share, as with the files.
    unusable = [(p, why) for p, why in listing.skipped if p in wanted or class_of(p) in wanted]
    for c in classes:
        if not os.path.isdir(os.path.join(folder, c)):
            raise DataError(f"{folder}: no class folder {c!r} (found: {', '.join(class_names(folder))})")
    counts = np.bincount([wanted[class_of(f)] for f in files], minlength=len(classes))
    if (counts == 0).any():
        empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        raise DataError(f"{folder}: no PNG images for class(es) {', '.join(empty)}")
    if shape is None:
        shape = input_shape(folder, files, color, size)  # before sharding, so every rank agrees
    files = files[shard[0] :: shard[1]]
    images, keep, failures, converted = _decode_all(folder, files, shape, workers, desc, progress)
    skipped = sorted(unusable[shard[0] :: shard[1]] + [(files[pos], reason) for pos, reason in failures])
    _warn_skipped(folder, skipped)
    if converted and shard[0] == 0:
        mode = "grayscale" if shape[0] == 1 else "RGB"
        log(
            f"note: {folder}: {converted:,} image(s) converted to {mode} {shape[1]}x{shape[2]} (the rule: docs/data.md)"
        )
    ignored = {kind: n for kind, n in listing.ignored.items() if n}
    if ignored and shard[0] == 0:  # the same on every rank: said once
        log(f"note: {folder}: ignored {describe_ignored(ignored)}")
    labels = np.array([wanted[class_of(f)] for f in files], dtype=np.int64)
    paths = [f for f, k in zip(files, keep, strict=True) if k]
    return LoadedSplit(folder, images[keep], labels[keep], tuple(classes), paths, skipped, ignored, converted)


def _warn_skipped(folder: str, skipped: list[tuple[str, str]]) -> None:
    """Every file left out is said: the count, and the first few with their reason."""
    if not skipped:
        return
    log(f"warning: skipped {len(skipped):,} file(s) under {folder} that could not be used:")
    for path, reason in skipped[:SKIPPED_PRINTED]:
        log(f"  {printable(path)}: {reason}")
    if len(skipped) > SKIPPED_PRINTED:
        log(f"  ... and {len(skipped) - SKIPPED_PRINTED:,} more (the run's metrics.json lists up to {SKIPPED_KEPT:,})")


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) index arrays holding out `fraction` of each class.

    Stratified: every class gives round(n_c * fraction) images (at least one, and never its last), so
    validation has the training split's class balance. Seeded: the same labels and seed give the same
    split, whatever else the run does.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-split must be at least 0 and below 1, got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = min(max(1, int(round(len(members) * fraction))), len(members) - 1)
        val.append(rng.permutation(members)[:n_val])
    va = np.sort(np.concatenate(val))
    keep = np.ones(len(labels), dtype=bool)
    keep[va] = False
    return np.flatnonzero(keep), va
