"""`cnnkit infer`: classify a folder of PNGs with an ONNX model, streaming predictions to a CSV.

The pipeline, tuned on a 2-core machine (measurements in `scripts/bench_infer.py`):
  - one worker process per core reads + decodes PNGs (`cnnkit.images.decode_batches`, ~25 us per
    28 x 28 image, half of it libspng/zlib) in tasks of up to 2048 files, 2 tasks per worker in
    flight, and sends back uint8 batches;
  - this process runs the model (onnxruntime, one thread, ~11 us per image) and writes the CSV.
The decoder is started (and its first batch received) before the onnxruntime session exists, so
the workers fork from a process without runtime thread pools. About 37k images/s on 2 cores.

Memory is bounded whatever the folder size: the file list, a few batches in flight, and running
counts for the accuracy and confusion matrix; predictions go straight to the CSV.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit.console import Progress, log, table
from cnnkit.errors import DataError
from cnnkit.files import atomic_path
from cnnkit.images import decode_batches, default_workers, list_pngs
from cnnkit.meta import predict
from cnnkit.runs import ONNX_NAME, PREDICTIONS_NAME, latest_file
from cnnkit.runtime.session import create_session, read_meta

CSV_COLUMNS = ("path", "predicted", "score", "label")
_NEEDS_QUOTING = re.compile(r'[,"\r\n]')
FAILURES_KEPT = 1000  # failures listed in the result (all are counted)
FAILURES_PRINTED = 5
# Files per decode task. Every task costs a round trip through the process pool (pickling, a pipe,
# thread wake-ups); over 60k images, 2048 files per task ran at 37k img/s, 512 at 34k. Smaller
# folders get smaller tasks so that every worker has several (the tail of the run is then short).
MIN_TASK_FILES = 256
MAX_TASK_FILES = 2048
MAX_TASK_BYTES = 8 << 20  # decoded pixels per task: 2 * workers tasks in flight stay ~100 MB at most
TASKS_PER_WORKER = 8
# Below this, one process decoding and predicting in turn is as fast as starting workers: measured
# break-even near 4,000 28 x 28 images on 2 cores (about 0.3 s of work; forking and the first task's
# latency cost ~50 ms).
MIN_FILES_FOR_WORKERS = 4096


def _task_files(n_files: int, workers: int, batch_size: int, image_bytes: int) -> int:
    """Files per decode task: a whole number of session batches, clamped as above."""
    most = max(1, min(MAX_TASK_FILES, MAX_TASK_BYTES // image_bytes))
    want = min(most, max(MIN_TASK_FILES, -(-n_files // (TASKS_PER_WORKER * max(1, workers)))))
    return batch_size * -(-want // batch_size)


def _labels(files: list[str], classes: list[str]) -> np.ndarray:
    """Class index of each file from its top-level folder, -1 for none.

    `files` is sorted, so the files under `c/` are the contiguous range ["c/", "c0") ("0" follows "/"):
    two bisections per class instead of a Python call per file.
    """
    labels = np.full(len(files), -1, dtype=np.int64)
    for i, c in enumerate(classes):
        if "/" in c:  # cannot be a folder name
            continue
        labels[bisect.bisect_left(files, c + "/") : bisect.bisect_left(files, c + "0")] = i
    return labels


@dataclass
class InferResult:
    """What `infer` did.

    Attributes:
        model: the model file.
        provider: the onnxruntime execution provider that ran it.
        output: the predictions CSV.
        classes: the model's class names.
        n_images: images predicted (rows in the CSV).
        n_failed: files that could not be read or decoded (not in the CSV).
        n_converted: images converted to 8-bit grayscale of the model's size.
        seconds: wall time of the whole call, listing included.
        accuracy: fraction predicted right, when every file sits under a class-named folder; else None.
        confusion: counts [true][predicted] in class order, when `accuracy` is set.
        failures: (path, reason) of the first failed files.
        notes: remarks for the user (e.g. why `device=auto` did not use the GPU).
    """

    model: str
    provider: str
    output: str
    classes: list[str]
    n_images: int
    n_failed: int
    n_converted: int
    seconds: float
    accuracy: float | None = None
    confusion: list[list[int]] | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batch_size: int = 0
    workers: int = 0
    threads: int | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "output": self.output,
            "classes": list(self.classes),
            "n_images": self.n_images,
            "n_failed": self.n_failed,
            "n_converted": self.n_converted,
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.images_per_second, 1),
            "accuracy": self.accuracy,
            "confusion": self.confusion,
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "notes": list(self.notes),
            "batch_size": self.batch_size,
            "workers": self.workers,
            "threads": self.threads,
        }


def _threads_for(workers: int) -> int:
    # Measured on 2 cores (bench_infer.py): with decode workers busy on every core, one onnxruntime
    # thread is best; more threads only preempt the decoders. Without workers this process does
    # everything in turn, so the model may use every core.
    return 1 if workers > 0 else default_workers()


def infer(
    folder: str,
    model: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    output: str | None = None,
    workers: int | None = None,
    *,
    threads: int | None = None,
    min_files_for_workers: int = MIN_FILES_FOR_WORKERS,
    progress: bool = True,
) -> InferResult:
    """Classify every PNG under `folder` and write one CSV row per image.

    Args:
        folder: the images (searched recursively; files under a folder named like a class are
            labeled with it, and when all are, accuracy and a confusion matrix are computed).
        model: an ONNX model exported by cnnkit; default `runs/latest/model.onnx`.
        device: `auto`, `cpu` or `cuda`.
        batch_size: images per model call (the answer does not depend on it).
        output: the CSV to write (atomically); default `predictions.csv` next to the model.
        workers: decode processes; default one per core, 0 decodes in this process.
        threads: onnxruntime intra-op threads; default tuned to the worker count.
        min_files_for_workers: below this many files, decode in this process (no process start-up).
        progress: draw a progress bar on stderr.

    Returns:
        An `InferResult` (`to_dict()` for JSON).

    Raises:
        ModelError, DeviceError, DataError: a model, device or folder that cannot be used.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise DataError("batch size must be at least 1")
    if model is None:
        model = latest_file(ONNX_NAME, "export one with `cnnkit export --format onnx`, or pass the model path")
    meta = read_meta(model)  # a foreign or broken model fails here, before any work
    if output is None:
        output = os.path.join(os.path.dirname(os.path.abspath(model)), PREDICTIONS_NAME)
    listing = list_pngs(folder)
    files = listing.files
    if not files:
        raise DataError(f"{folder}: no PNG files found (searched recursively for *.png)")
    workers = default_workers() if workers is None else max(0, workers)
    task = _task_files(len(files), workers, batch_size, meta.input_shape[1] * meta.input_shape[2])
    if len(files) < min_files_for_workers or len(files) <= task:
        workers = 0  # what decode_batches does: a small folder is not worth starting processes
    if threads is None:
        threads = _threads_for(workers)

    classes = list(meta.classes)
    k = len(classes)
    labels = _labels(files, classes)
    labeled = bool((labels >= 0).all())
    names = [*classes, ""]  # names[-1] == "": one lookup gives the label column for -1 too
    confusion = np.zeros((k, k), dtype=np.int64)

    # A folder named like a PNG is listed in `skipped` only as a note; everything else there failed.
    failures = [(p, why) for p, why in listing.skipped if not why.startswith("a folder named like a PNG")]
    n_failed = len(failures)
    n_images = n_converted = 0

    batches = decode_batches(
        folder, files, meta.input_shape[1:], task, workers=workers, min_files_for_workers=min_files_for_workers
    )
    with contextlib.closing(batches):
        # Fork the decoders (first batch) before onnxruntime starts its threads.
        first = next(batches)
        session = create_session(model, device=device, threads=threads)
        bar = Progress(len(files), "infer", unit="img") if progress else None
        with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            # Plain f-string rows cost half the csv module's (0.8 vs 2 us/row); they are the same
            # text when no path or class name holds a comma, quote or line break.
            plain = not _NEEDS_QUOTING.search("\0".join([*files, *classes]))
            for batch in itertools.chain([first], batches):
                for pos, reason in batch.failures:
                    n_failed += 1
                    if len(failures) < FAILURES_KEPT:
                        failures.append((files[pos], reason))
                n_converted += batch.converted
                if bar is not None:
                    bar.update(len(batch.images) + len(batch.failures))
                if not len(batch.images):
                    continue
                # The model sees `batch_size` images per call; the rest works on the whole decoded
                # batch at once (numpy calls on 256 rows cost more in overhead than in work).
                images, positions = batch.images, batch.positions
                outputs = [session.run(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
                pred, prob = predict(outputs[0] if len(outputs) == 1 else np.concatenate(outputs), meta.output)
                true = labels[positions]
                # %.9g round-trips a float32 exactly: the CSV holds the model's own number.
                cols = zip(positions.tolist(), pred.tolist(), prob.tolist(), true.tolist(), strict=True)
                if plain:
                    f.write("".join([f"{files[p]},{classes[i]},{v:.9g},{names[t]}\r\n" for p, i, v, t in cols]))
                else:
                    writer.writerows([(files[p], classes[i], f"{v:.9g}", names[t]) for p, i, v, t in cols])
                if labeled:
                    confusion += np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
                n_images += len(positions)
        if bar is not None:
            bar.close()

    if failures:
        _print_failures(failures, n_failed)
    correct = int(np.trace(confusion))
    return InferResult(
        model=model,
        provider=session.provider,
        output=output,
        classes=classes,
        n_images=n_images,
        n_failed=n_failed,
        n_converted=n_converted,
        seconds=time.perf_counter() - t0,
        accuracy=correct / n_images if labeled and n_images else None,
        confusion=confusion.tolist() if labeled else None,
        failures=failures,
        notes=session.notes,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
    )


def _print_failures(failures: list[tuple[str, str]], n_failed: int) -> None:
    log(f"{n_failed:,} file(s) could not be used:")
    for path, reason in failures[:FAILURES_PRINTED]:
        log(f"  {path}: {reason}")
    if n_failed > FAILURES_PRINTED:
        log(f"  ... and {n_failed - FAILURES_PRINTED:,} more")


def format_summary(result: InferResult) -> str:
    """A short human-readable report: provider, counts, speed, accuracy and the confusion matrix."""
    lines = [
        f"model     {result.model} ({result.provider})",
        f"images    {result.n_images:,} predicted, {result.n_failed:,} failed, {result.n_converted:,} converted",
        f"speed     {result.images_per_second:,.0f} images/s ({result.seconds:.2f} s)",
        f"output    {result.output}",
    ]
    lines += [f"note      {n}" for n in result.notes]
    if result.accuracy is not None and result.confusion is not None:
        lines.append(f"accuracy  {result.accuracy:.4f}")
        lines.append("confusion (rows: true class, columns: predicted)")
        rows = [[c, *counts] for c, counts in zip(result.classes, result.confusion, strict=True)]
        lines.append(table(["true \\ pred", *result.classes], rows))
    return "\n".join(lines)
