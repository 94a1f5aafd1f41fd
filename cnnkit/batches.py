"""Decoding many PNG images: in order, in batches, in worker processes; and fixed samples of a folder
(parity checks, calibration, accuracy gates, bench). Torch-free: shared by training and inference.

Each image goes through `cnnkit.images.decode_image`, the one decoder.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnkit.console import log
from cnnkit.errors import DataError
from cnnkit.images import ImageError, decode_image, probe, read_bytes, read_head, read_image
from cnnkit.listing import class_of, list_pngs
from cnnkit.meta import ModelMeta

# --------------------------------------------------------------------------------------------
# Batched decoding in worker processes


@dataclass
class DecodedBatch:
    """One batch of decoded images.

    Attributes:
        start: position (in the list given to `decode_batches`) of the batch's first file.
        images: uint8 (n, C, H, W), the files that decoded, in order.
        positions: int64 (n,), each image's position in the list.
        failures: (position, reason) for files that did not decode.
        converted: how many images were converted to the model's mode or size.
        converted_mask: bool (n,), which ones (`cnnkit.runtime.predictor` reports it per image).
    """

    start: int
    images: np.ndarray
    positions: np.ndarray
    failures: list[tuple[int, str]]
    converted: int
    converted_mask: np.ndarray


def _decode_chunk(root: str, files: Sequence[str], start: int, shape: tuple[int, int, int]) -> DecodedBatch:
    # The hot loop of `cnnkit infer` (~25 us per 28 x 28 image: ~12 us of it is libspng + zlib).
    out = np.empty((len(files), *shape), dtype=np.uint8)
    ok = np.empty(len(files), dtype=np.int64)
    mask = np.zeros(len(files), dtype=bool)
    failures: list[tuple[int, str]] = []
    n = 0
    prefix = os.path.join(root, "")  # "" for a root of "": the files are paths as they stand
    for i, rel in enumerate(files):
        try:
            out[n], mask[n] = decode_image(read_bytes(prefix + rel), shape)
        except ImageError as e:
            failures.append((start + i, str(e)))
            continue
        ok[n] = start + i
        n += 1
    converted = int(mask[:n].sum())
    if n < len(files):  # copy, so that pickling the batch does not drag the unused rows along
        return DecodedBatch(start, out[:n].copy(), ok[:n].copy(), failures, converted, mask[:n].copy())
    return DecodedBatch(start, out, ok, failures, converted, mask)


_STOP_SIGNALS = {2, 15}  # SIGINT, SIGTERM (their numbers on every POSIX system)


@contextlib.contextmanager
def _forking_quietly() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while decoder processes are forked.

    A child forked with the CLI's SIGTERM handler could raise KeyboardInterrupt before
    `_init_worker` ignores the signal, possibly while holding its result queue's lock, which then
    deadlocks the pool's shutdown. Blocked here, a signal reaches the child only after it ignores
    it, and reaches this process (as usual) when the block is lifted.
    """
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_workers(pool: Any) -> None:
    """On an interrupt: cancel what is queued and end the decoder processes now, so that leaving the
    pool's `with` cannot wait on a worker forever."""
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


def _init_worker(parent: int) -> None:
    """Decoder processes leave Ctrl-C and SIGTERM to the main process and die with it.

    A terminal's Ctrl-C, and a SIGTERM sent to the process group (`kill -- -PGID`, a batch scheduler),
    reach every process of the group: the main process turns either into a clean stop that shuts the
    pool down, so the workers ignore both (instead of each printing a traceback: a forked worker
    inherits the CLI's SIGTERM handler, which raises KeyboardInterrupt).
    When the main process is killed outright (SIGKILL, the OOM killer), nothing tells pool workers
    to exit and they would wait on their queue forever: on Linux the kernel kills them instead.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by `_forking_quietly` until the lines above ran
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no usable libc
            pass
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def decode_batches(
    root: str,
    files: Sequence[str],
    shape: tuple[int, int, int],
    batch_size: int,
    workers: int | None = None,
    min_files_for_workers: int = 2048,
    *,
    chunks: Iterable[tuple[int, Sequence[str]]] | None = None,
) -> Generator[DecodedBatch, None, None]:
    """Decode `files` (relative to `root`) in batches of uint8 (n, *shape), in order, in worker processes.

    At most `2 * workers` batches are in flight, so memory stays bounded whatever the number of
    files. With `workers=0`, or when there are fewer than `min_files_for_workers` files (too few to
    pay for starting processes), the batches are decoded in this process. The answer never depends
    on `workers` or `batch_size`.

    Call this *before* creating an onnxruntime session: worker processes are forked on the first
    `next()`, and forking a process whose thread pools are running is unsafe.

    `chunks`: (position of the first file, files) pairs to decode instead of `files` cut into
    batches; pulled lazily (e.g. from `iter_pngs`), so the caller picks `workers` (0: this process).
    """
    if batch_size < 1:
        raise DataError("batch size must be at least 1")
    workers = default_workers() if workers is None else workers
    if chunks is None:
        chunks = cut = [(s, files[s : s + batch_size]) for s in range(0, len(files), batch_size)]
        if len(files) < min_files_for_workers or len(cut) < 2:
            workers = 0
    if workers <= 0:
        for s, chunk in chunks:
            yield _decode_chunk(root, chunk, s, shape)
        return

    yield from _decode_in_pool(root, chunks, shape, workers)


def _decode_in_pool(
    root: str, chunks: Iterable[tuple[int, Sequence[str]]], shape: tuple[int, int, int], workers: int
) -> Iterator[DecodedBatch]:
    """`decode_batches` in `workers` processes started for this call, ended with it."""
    pool = DecodePool(workers)
    with pool.executor:
        try:
            yield from pool.decode(root, chunks, shape)
        except BaseException:  # KeyboardInterrupt (SIGINT, SIGTERM), GeneratorExit, an error
            _stop_workers(pool.executor)
            raise


class DecodePool:
    """Decoder processes, all forked when this is created: for one `decode_batches` call, or kept for
    many calls (`cnnkit.runtime.predictor.Predictor`, which creates it before its onnxruntime session).

    `decode` may be called from several threads at once: each call waits only on its own tasks.
    """

    def __init__(self, workers: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context(method),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )
        with _forking_quietly():  # the first submit forks every worker (fork) or starts one (spawn)
            self.executor.submit(os.getpid)  # not waited for: the caller goes on while they start

    def decode(
        self, root: str, chunks: Iterable[tuple[int, Sequence[str]]], shape: tuple[int, int, int]
    ) -> Iterator[DecodedBatch]:
        """The chunks' `DecodedBatch`es in order, at most `2 * workers` in flight; leaving early
        cancels this call's queued tasks and leaves the processes running."""
        pending: deque[Any] = deque()  # futures of DecodedBatch, in file order
        it = iter(chunks)
        try:
            for s, chunk in itertools.islice(it, 2 * self.workers):
                pending.append(self.executor.submit(_decode_chunk, root, chunk, s, shape))
            while pending:
                batch = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(self.executor.submit(_decode_chunk, root, nxt[1], nxt[0], shape))
                yield batch
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        """End the processes (queued tasks are cancelled)."""
        self.executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# A fixed sample of a folder (parity checks, calibration, accuracy gates, bench)


@dataclass
class Sample:
    """Decoded images sampled from a folder.

    Attributes:
        root: the folder.
        images: uint8 (N, C, H, W).
        labels: int64 (N,) indices into the classes, or None unless every sampled file sits under a
            folder named like one of them.
        n_files: PNG files the sample was drawn from.
        n_failed: sampled files that could not be decoded (skipped).
        n_converted: sampled images converted to the model's mode or size.
    """

    root: str
    images: np.ndarray
    labels: np.ndarray | None
    n_files: int
    n_failed: int
    n_converted: int


def sample_folder(root: str, shape: tuple[int, int, int], classes: Sequence[str], limit: int | None = None) -> Sample:
    """Up to `limit` images spread evenly over the sorted listing of `root`, the same on every run.

    The listing is sorted by class folder, so its first N files would all be one class; an even
    spread covers them all. When some files sit in folders named like `classes`, only those are
    used (a 0-vs-1 model is checked on 0s and 1s, not on 7s).

    Raises:
        DataError: no folder, no PNGs, or none decodable.
    """
    files = list_pngs(root).files
    index = {c: i for i, c in enumerate(classes)}
    files = [f for f in files if class_of(f) in index] or files
    if not files:
        raise DataError(f"{root}: no PNG files found (searched recursively for *.png)")
    n_files = len(files)
    if limit is not None and n_files > limit:
        picks = np.unique(np.linspace(0, n_files - 1, num=limit).round().astype(np.int64))
        files = [files[i] for i in picks.tolist()]
    out = np.empty((len(files), *shape), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    n = failed = converted = 0
    for rel in files:
        try:
            out[n], conv = read_image(os.path.join(root, rel), shape)
        except ImageError:
            failed += 1
            continue
        labels[n] = index.get(class_of(rel) or "", -1)
        converted += conv
        n += 1
    if n == 0:
        raise DataError(f"{root}: none of {len(files)} sampled PNGs could be decoded")
    labels = labels[:n]
    return Sample(root, out[:n], labels if bool((labels >= 0).all()) else None, n_files, failed, converted)


LOAD_LIMIT = 10_000  # all of an MNIST-style test split


def load_images(root: str, meta: ModelMeta, limit: int | None = LOAD_LIMIT, command: str = "bench") -> Sample:
    """Decode up to `limit` PNGs under `root` for `meta`'s model (`sample_folder`).

    Files under `root/<class>/` are labeled with the class's index in `meta.classes`, as in
    `cnnkit infer`. Undecodable files are skipped (and counted in the log line).

    Used by `cnnkit bench` and by the INT8 accuracy gate of `cnnkit export` (`command` names which,
    in the log line).
    """
    sample = sample_folder(root, meta.input_shape, meta.classes, limit)
    if sample.n_failed:
        log(f"{command}: {sample.n_failed} of {sample.n_files} PNGs under {root} could not be decoded; skipped")
    return sample


# --------------------------------------------------------------------------------------------
# The input shape a folder of images asks for (training; `cnnkit.export.export_module`)

PROBED = 64  # files whose headers decide `--color auto` and the default size
DEFAULT_SIZE = (28, 28)  # when the images differ in size and no --size is given: MNIST's


def class_names(folder: str) -> list[str]:
    """The class subfolders of `folder`, sorted (hidden folders ignored)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{folder}: no class subfolders; expected {folder}/<class>/*.png")
    return names


def input_shape(
    folder: str, files: list[str], color: str = "auto", size: tuple[int, int] | None = None
) -> tuple[int, int, int]:
    """The (C, H, W) a run trains on, from `--color` and `--size`, reading headers where they say auto.

    color: `gray` (C = 1), `rgb` (C = 3), or `auto`: RGB when any probed image is in color (RGB,
    RGBA, palette; a JPEG with three components), else grayscale. size: (H, W), or None: the probed
    images' common size, else `DEFAULT_SIZE` with a note (pass --size for photos).
    """
    if color not in ("auto", "gray", "rgb"):
        raise DataError(f"unknown --color {color!r}; choose one of: auto, gray, rgb")
    heads = _probe(folder, files) if color == "auto" or size is None else []
    if color == "auto":
        color = "rgb" if any(c == 3 for _, _, c in heads) else "gray"
    if size is None:
        sizes = sorted({(h, w) for h, w, _ in heads})
        size = sizes[0] if len(sizes) == 1 else DEFAULT_SIZE
        if len(sizes) > 1:
            seen = ", ".join(f"{h}x{w}" for h, w in sizes[:3])
            log(f"note: {folder}: images differ in size ({seen}, ...): all resized to {size[0]}x{size[1]}; see --size")
    return (3 if color == "rgb" else 1, *size)


def _probe(folder: str, files: list[str]) -> list[tuple[int, int, int]]:
    """(H, W, channels) of up to `PROBED` readable images spread evenly over `files`."""
    picks = np.unique(np.linspace(0, len(files) - 1, num=min(PROBED, len(files))).round().astype(np.int64))
    heads = []
    for i in picks.tolist():
        try:
            heads.append(probe(read_head(os.path.join(folder, files[i]))))
        except ImageError:
            continue
    if not heads:
        raise DataError(f"{folder}: none of {len(picks)} probed images is readable")
    return heads
