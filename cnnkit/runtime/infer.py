"""`cnnkit infer`: classify a folder of PNGs with an ONNX model, streaming predictions to a CSV.

The pipeline, tuned on a 2-core machine (the tuning notes are in `scripts/bench_infer.py`):
  - one worker process per core reads + decodes PNGs (`cnnkit.batches.decode_batches`) in tasks of
    up to 2048 files, 2 tasks per worker in flight, and sends back uint8 batches;
  - this process runs the model (onnxruntime, one thread) and writes the CSV.
The decoder is started (and its first batch received) before the onnxruntime session exists, so
the workers fork from a process without runtime thread pools. Measured throughput, per model and
machine: docs/results/infer-*.json.

Memory is bounded whatever the folder size: the folder is walked lazily (`iter_pngs`: the entries of
the folders on the current path, plus up to `LOOKAHEAD_FILES` paths read ahead), a few batches are in
flight, the accuracy and confusion matrix are running counts, and predictions go straight to the CSV.
With `shard`, the run keeps its 1/N of the files (`cnnkit.runtime.shard`) and writes a summary for
`cnnkit merge` next to its CSV.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import itertools
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from cnnkit.batches import DecodedBatch, decode_batches, default_workers
from cnnkit.confusion import Confusion, summary_lines, top_pairs
from cnnkit.console import Progress, log, printable, table
from cnnkit.csvcells import RISKY_START, escape
from cnnkit.errors import DataError, FileFailedError
from cnnkit.files import atomic_path, check_not_an_input, check_writable, remove_stale_temps
from cnnkit.listing import Listing, describe_ignored, is_listed, iter_pngs
from cnnkit.meta import ModelMeta, predict
from cnnkit.mistakes import Mistakes
from cnnkit.runs import PREDICTIONS_NAME
from cnnkit.runtime.backends import (
    ONNXRUNTIME,
    AnySession,
    backend_config,
    check_backend,
    check_backend_parity,
)
from cnnkit.runtime.outputs import (
    CSV_COLUMNS,
    FAILURE_COLUMNS,
    FAILURES_KEPT,
    failures_path,
    mistakes_path,
    summary_path,
)
from cnnkit.runtime.precision import FILES, Choice, open_choice, resolve
from cnnkit.runtime.session import external_data_files, read_meta
from cnnkit.runtime.shard import Shard, ShardFilter, parse_shard, write_shard_summary

# Paths and class names that the csv module must quote, or that `escape` must prefix (at a cell's start:
# the names are joined with "\0" before the search).
_NEEDS_CARE = re.compile(r'[,"\r\n]|(?:^|\0)[' + re.escape(RISKY_START) + "]")
FAILURES_PRINTED = 5
# Files per decode task. Every task costs a round trip through the process pool (pickling, a pipe,
# thread wake-ups), so fewer, larger tasks ran faster in the tuning runs (scripts/bench_infer.py). Smaller
# folders get smaller tasks so that every worker has several (the tail of the run is then short).
MIN_TASK_FILES = 256
MAX_TASK_FILES = 2048
MAX_TASK_BYTES = 8 << 20  # decoded pixels per task: 2 * workers tasks in flight stay ~100 MB at most
TASKS_PER_WORKER = 8
# Below this, one process decoding and predicting in turn is as fast as starting workers (forking and
# the first task's latency cost more than the work they would share; docs/benchmarks.md).
MIN_FILES_FOR_WORKERS = 4096
# Paths read ahead of decoding (~90 bytes each): a folder with fewer files is counted before the run
# starts (exact task sizes and a progress bar with a total); a larger one streams, its bar counting up.
LOOKAHEAD_FILES = 1 << 16


def task_files(n_files: int, workers: int, batch_size: int, image_bytes: int) -> int:
    """Files per decode task: a whole number of session batches, clamped as above."""
    most = max(1, min(MAX_TASK_FILES, MAX_TASK_BYTES // image_bytes))
    want = min(most, max(MIN_TASK_FILES, -(-n_files // (TASKS_PER_WORKER * max(1, workers)))))
    return batch_size * -(-want // batch_size)


def _chunked(files: Iterator[str], size: int, in_flight: deque[list[str]]) -> Iterator[tuple[int, list[str]]]:
    """(position, up to `size` files) pairs; each chunk is also queued on `in_flight` for its batch."""
    start = 0
    while chunk := list(itertools.islice(files, size)):
        in_flight.append(chunk)
        yield start, chunk
        start += len(chunk)


def _labels(files: list[str], classes: list[str]) -> np.ndarray:
    """Class index of each file from its top-level folder, -1 for none.

    `files` is sorted (a chunk of the walk), so the files under `c/` are the contiguous range
    ["c/", "c0") ("0" follows "/"): two bisections per class instead of a Python call per file.
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
        provider: the execution provider (onnxruntime) or device (`OpenVINO CPU`) that ran it.
        output: the predictions CSV.
        classes: the model's class names.
        n_images: images predicted (rows in the CSV).
        n_failed: files that could not be read or decoded (not in the CSV).
        n_converted: images converted to the model's color mode or size (`cnnkit.images.convert_pixels`).
        seconds: wall time of the whole call, listing included.
        accuracy: fraction predicted right, when every file sits under a class-named folder; else None.
        confusion: counts [true][predicted] in class order, when `accuracy` is set and the model has at
            most `cnnkit.confusion.MAX_MATRIX_CLASSES` classes.
        confused_pairs: with more classes, instead: every [true, predicted, count] that occurred off the
            diagonal, most frequent first (`--json` shows the first `TOP_PAIRS` as `top_confused`).
        n_correct: images predicted right, when `accuracy` is set.
        failures: (path, reason) of the first failed files.
        notes: remarks for the user (e.g. why `device=auto` did not use the GPU).
        failures_output: `<output>.failures.csv`, every failed file and its reason; None when none failed.
        ignored: entries of the folder left out on purpose, by kind (`cnnkit.listing.Listing.ignored`).
        png_folders: folders named like a PNG (searched like any folder; the first `FAILURES_KEPT`).
        mistakes: when `accuracy` is set, the most confident wrong predictions, highest score first
            ({"path", "true", "predicted", "score"}, `cnnkit.mistakes`); else empty.
        mistakes_png: `<output>.mistakes.png`, those images drawn as a grid; None when there are none.
        backend: `onnxruntime` or `openvino` (`cnnkit.runtime.backends`).
        backend_config: the openvino compile settings (precision hint, threads, ...); None for onnxruntime.
        backend_parity: openvino's recorded verdict against onnxruntime on this model file
            (`check_backend_parity`); None for onnxruntime.
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
    confused_pairs: list[list[int]] | None = None
    n_correct: int | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batch_size: int = 0
    workers: int = 0
    threads: int | None = None
    shard: str | None = None
    summary: str | None = None
    failures_output: str | None = None
    ignored: dict[str, int] = field(default_factory=dict)
    png_folders: list[str] = field(default_factory=list)
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    mistakes_png: str | None = None
    backend: str = ONNXRUNTIME
    backend_config: dict[str, Any] | None = None
    backend_parity: dict[str, Any] | None = None
    precision: str = "fp32"
    precision_reason: str = ""

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
            "top_confused": top_pairs(self.classes, self.confused_pairs) if self.confused_pairs is not None else None,
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "notes": list(self.notes),
            "batch_size": self.batch_size,
            "workers": self.workers,
            "threads": self.threads,
            "shard": self.shard,
            "summary": self.summary,
            "failures_output": self.failures_output,
            "ignored": dict(self.ignored),
            "png_folders": list(self.png_folders),
            "mistakes": list(self.mistakes),
            "mistakes_png": self.mistakes_png,
            "backend": self.backend,
            "backend_config": self.backend_config,
            "backend_parity": self.backend_parity,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
        }


def threads_for(workers: int) -> int:
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
    shard: Shard | str | None = None,
    strict: bool = False,
    backend: str = ONNXRUNTIME,
    precision: str | None = None,
) -> InferResult:
    """Classify every PNG under `folder` and write one CSV row per image.

    Args:
        folder: the images (searched recursively; files under a folder named like a class are
            labeled with it, and when all are, accuracy and a confusion matrix are computed).
        model: an ONNX model exported by cnnkit, or a run folder (its artifacts, chosen by `precision`);
            default `runs/latest/model.onnx`.
        device: `auto`, `cpu` or `cuda`.
        batch_size: images per model call (the answer does not depend on it).
        output: the CSV to write (atomically); default `predictions.csv` next to the model.
        workers: decode processes; default one per core, 0 decodes in this process.
        threads: onnxruntime intra-op threads; default tuned to the worker count.
        min_files_for_workers: below this many files, decode in this process (no process start-up).
        progress: draw a progress bar on stderr.
        shard: `Shard(K, N)` or "K/N": keep only the files of shard K of N (by a hash of their path,
            `cnnkit.runtime.shard`); default output `predictions.shard-K-of-N.csv` next to the model,
            and a summary `<output>.json` for `cnnkit merge`.
        strict: stop at the first file that cannot be used (`FileFailedError`, nothing written)
            instead of listing it in `<output>.failures.csv` and going on.
        backend: `onnxruntime` or `openvino`; openvino's first run on a model file is checked against
            onnxruntime on the first decoded images (`cnnkit.runtime.backends`).
        precision: with a run folder as `model`: `auto` (its default), `fp32`, `int8` or `fp16`
            (`cnnkit.runtime.precision`); given without `model`, the run `runs/latest`.

    Returns:
        An `InferResult` (`to_dict()` for JSON). Files that failed are not in the CSV; they are
        counted, listed in `<output>.failures.csv` (written atomically; a stale one from an earlier
        run is removed when none failed) and the first `FAILURES_KEPT` in `result.failures`.

    Raises:
        ModelError, DeviceError, DataError: a model, device, backend or folder that cannot be used.
        ParityError: the openvino backend does not agree with onnxruntime on this model file.
        FileFailedError: with `strict`, a file that could not be used.
    """
    t0 = time.perf_counter()
    job = _job(folder, resolve(model, precision, device), batch_size, output, shard, strict, check_backend(backend))
    plan = _plan(job, workers, threads, min_files_for_workers)
    opened, counts, failure_log = _stream(job, plan, device, progress)
    return _result(job, plan, opened, counts, failure_log, t0)


@dataclass(frozen=True)
class _Job:
    """One call of `infer`, its arguments checked and defaulted: what every step reads."""

    folder: str
    model: str
    choice: Choice
    run_dir: str | None  # the run folder whose artifacts `choice` chose among; None for one file
    meta: ModelMeta
    classes: list[str]
    output: str
    shard: Shard | None
    batch_size: int
    strict: bool
    grid: str | None  # where the mistakes grid goes; None where it would be read as one of the images
    backend: str = ONNXRUNTIME


def _job(
    folder: str,
    resolved: tuple[Choice, str | None],
    batch_size: int,
    output: str | None,
    shard: Shard | str | None,
    strict: bool,
    backend: str = ONNXRUNTIME,
) -> _Job:
    """Check and default the arguments, before any work: a foreign or broken model, or an output that
    cannot be written, fails here."""
    if batch_size < 1:
        raise DataError("batch size must be at least 1")
    choice, run_dir = resolved
    if run_dir is not None:
        log(f"infer: precision {choice.precision} ({choice.path}): {choice.reason}")
    model = choice.path
    meta = read_meta(model)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if output is None:
        name = PREDICTIONS_NAME if shard is None else shard.default_output
        output = os.path.join(os.path.dirname(os.path.abspath(model)), name)
    models = [model, *([os.path.join(run_dir, name) for name in FILES.values()] if run_dir else [])]
    _check_outputs(folder, models, [output, failures_path(output), *([summary_path(output)] if shard else [])])
    grid = _grid_path(folder, models, output)
    return _Job(
        folder=folder,
        model=model,
        choice=choice,
        run_dir=run_dir,
        meta=meta,
        classes=list(meta.classes),
        output=output,
        shard=shard,
        batch_size=batch_size,
        strict=strict,
        grid=grid,
        backend=backend,
    )


def _grid_path(folder: str, models: list[str], output: str) -> str | None:
    """`<output>.mistakes.png`, checked like the other outputs; None when it would lie among the images
    (a CSV may go there, but a PNG would be read as an image by the next run): no grid then."""
    grid = mistakes_path(output)
    if is_listed(folder, grid, existing=False):
        return None
    _check_outputs(folder, models, [grid])
    return grid


@dataclass(frozen=True)
class _Plan:
    """How the run reads its folder: the files in walk order, how many, in which tasks, on how many workers."""

    listing: Listing  # what the walk skipped or ignored, filled as it goes
    picker: ShardFilter | None  # with a shard: the filter that counts every file it saw
    files: Iterator[str]  # the run's files, in the order of their sorted paths
    n_known: int  # every file when not `streaming`, else a lower bound
    streaming: bool  # more files than were read ahead: their number is known only at the end
    task: int
    workers: int
    threads: int


def _plan(job: _Job, workers: int | None, threads: int | None, min_files_for_workers: int) -> _Plan:
    """Start the walk and read its first files ahead, to size the decode tasks and choose the workers.

    The folder is walked as the run goes, in the order of its sorted paths. A folder (or shard) smaller
    than the read-ahead is sized exactly as a listed one would be; past it, decode tasks are at their
    largest whatever the size, so a lower bound is enough."""
    listing = Listing(root=job.folder, files=[])
    walk = iter_pngs(job.folder, listing)
    picker = ShardFilter(walk, job.shard) if job.shard is not None else None
    selected = iter(picker if picker is not None else walk)
    workers = default_workers() if workers is None else max(0, workers)
    image_bytes = int(np.prod(job.meta.input_shape))
    largest = task_files(1 << 40, workers, job.batch_size, image_bytes)
    ahead = 1 + max(LOOKAHEAD_FILES, min_files_for_workers, TASKS_PER_WORKER * max(1, workers) * largest)
    head = list(itertools.islice(selected, ahead))
    if not head and (picker is None or picker.n_seen == 0):
        raise DataError(f"{job.folder}: no PNG files found (searched recursively for *.png{_what_else(listing)})")
    task = task_files(len(head), workers, job.batch_size, image_bytes)
    if len(head) < min_files_for_workers or len(head) <= task:
        workers = 0  # what decode_batches does: a small folder is not worth starting processes
    streaming = len(head) == ahead
    return _Plan(
        listing=listing,
        picker=picker,
        files=itertools.chain(head, selected) if streaming else iter(head),
        n_known=len(head),
        streaming=streaming,
        task=task,
        workers=workers,
        threads=threads_for(workers) if threads is None else threads,
    )


@dataclass
class _Counts:
    """The running totals of a run: all the result needs, with no prediction kept in memory."""

    confusion: Confusion
    labeled: bool = True  # every file so far sits under a class folder
    n_images: int = 0
    n_failed: int = 0
    n_converted: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first FAILURES_KEPT
    mistakes: Mistakes = field(default_factory=Mistakes)  # fed while `labeled`


@dataclass
class _Opened:
    """What `_stream` ran the model with: the session, the artifact chosen, the backend's parity verdict."""

    session: AnySession
    choice: Choice
    parity: dict[str, Any] | None


def _stream(job: _Job, plan: _Plan, device: str, progress: bool) -> tuple[_Opened, _Counts, _FailureLog]:
    """Decode the files, run the model and write the CSV and failure list, a decoded batch at a time
    (a non-default backend's parity verdict is settled on the first batch, before any row is written)."""
    in_flight: deque[list[str]] = deque()  # the files of the chunks being decoded, in order
    chunks = _chunked(plan.files, plan.task, in_flight)
    batches = decode_batches(job.folder, (), job.meta.input_shape, plan.task, workers=plan.workers, chunks=chunks)
    counts = _Counts(Confusion(len(job.classes)))
    with contextlib.closing(batches):
        # Fork the decoders (first batch) before onnxruntime starts its threads.
        first = next(batches, None)  # None: a shard without files
        session, choice = open_choice(job.choice, job.run_dir, device, plan.threads, job.backend)
        parity = check_backend_parity(session, first.images) if first is not None and len(first.images) else None
        bar = Progress(None if plan.streaming else plan.n_known, "infer", unit="img") if progress else None
        # Names that are not valid UTF-8 reach us surrogate-escaped (`os.fsdecode`): they are written
        # back as their original bytes, so the CSV names exactly the file on disk. The failure list
        # is entered first so that it is committed last: a CSV that cannot be written (a full disk)
        # leaves no failure list of a run that has no CSV.
        with (
            _FailureLog(failures_path(job.output)) as failure_log,
            atomic_path(job.output) as tmp,
            open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f,
        ):
            rows = _PredictionRows(f, job.classes)
            for batch in itertools.chain([first] if first is not None else [], batches):
                files = in_flight.popleft()  # batches come back in order, one per chunk
                labels = _labels(files, job.classes)
                counts.labeled = counts.labeled and bool((labels >= 0).all())
                _take_failures(job, plan.listing, batch, files, failure_log, counts)
                if bar is not None:
                    bar.update(len(batch.images) + len(batch.failures))
                if len(batch.images):
                    _predict_batch(job, session, batch, files, labels, rows, counts)
            # The walk is over: PNG-named entries it could not use (dangling symlinks, ...) failed too.
            for path, reason in _unusable(plan.listing, job.shard):
                if job.strict:
                    raise FileFailedError(_strict_message(path, reason, job.output))
                failure_log.add(path, reason)
        if bar is not None:
            bar.close()
    return _Opened(session, choice, parity), counts, failure_log


def _take_failures(
    job: _Job, listing: Listing, batch: DecodedBatch, files: list[str], failure_log: _FailureLog, counts: _Counts
) -> None:
    """Count and list the files of a batch that failed; with `strict`, stop at the first one (or at an
    entry the walk could not use)."""
    if job.strict and (listing.skipped or batch.failures):
        bad = _unusable(listing, job.shard) + [(files[p - batch.start], why) for p, why in batch.failures]
        if bad:
            raise FileFailedError(_strict_message(*bad[0], job.output))
    for pos, reason in batch.failures:
        counts.n_failed += 1
        failure_log.add(files[pos - batch.start], reason)
        if len(counts.failures) < FAILURES_KEPT:
            counts.failures.append((files[pos - batch.start], reason))
    counts.n_converted += batch.converted


def _predict_batch(
    job: _Job,
    session: AnySession,
    batch: DecodedBatch,
    files: list[str],
    labels: np.ndarray,
    rows: _PredictionRows,
    counts: _Counts,
) -> None:
    """Predict the images of a decoded batch, write their rows and count them."""
    # The model sees `batch_size` images per call; the rest works on the whole decoded batch at once
    # (numpy calls on 256 rows cost more in overhead than in work).
    images, positions, step = batch.images, batch.positions - batch.start, job.batch_size
    outputs = [session.run(images[s : s + step]) for s in range(0, len(images), step)]
    pred, prob = predict(outputs[0] if len(outputs) == 1 else np.concatenate(outputs), job.meta.output)
    true = labels[positions]
    rows.write(files, positions, pred, prob, true)
    if counts.labeled:
        counts.confusion.add(true, pred)
        counts.mistakes.add(images, true, pred, prob, files, positions)
    counts.n_images += len(positions)


class _PredictionRows:
    """The predictions CSV (`CSV_COLUMNS`), written a decoded batch at a time."""

    def __init__(self, f: TextIO, classes: list[str]):
        self.f, self.writer, self.classes = f, csv.writer(f), classes
        self.names = [*classes, ""]  # names[-1] == "": one lookup gives the label column for -1 too
        self.writer.writerow(CSV_COLUMNS)

    def write(
        self, files: list[str], positions: np.ndarray, pred: np.ndarray, prob: np.ndarray, true: np.ndarray
    ) -> None:
        classes, names = self.classes, self.names
        # %.9g round-trips a float32 exactly: the CSV holds the model's own number.
        cols = zip(positions.tolist(), pred.tolist(), prob.tolist(), true.tolist(), strict=True)
        # Plain f-string rows cost half the csv module's (0.8 vs 2 us/row); they are the same
        # text when no path or class name holds a comma, quote or line break, or starts
        # like a spreadsheet formula (`cnnkit.csvcells`).
        if not _NEEDS_CARE.search("\0".join([*files, *classes])):
            self.f.write("".join([f"{files[p]},{classes[i]},{v:.9g},{names[t]}\r\n" for p, i, v, t in cols]))
        else:
            self.writer.writerows(
                [(escape(files[p]), escape(classes[i]), f"{v:.9g}", escape(names[t])) for p, i, v, t in cols]
            )


def _result(
    job: _Job, plan: _Plan, opened: _Opened, counts: _Counts, failure_log: _FailureLog, t0: float
) -> InferResult:
    """The `InferResult` of a finished run (and, with a shard, its summary for `cnnkit merge`)."""
    session, choice = opened.session, opened.choice
    # PNG-named entries the walk could not use failed too; with a shard, each belongs to one shard.
    n_seen = plan.picker.n_seen if plan.picker is not None else counts.n_images + counts.n_failed
    n_listed = n_seen + len(plan.listing.skipped)
    unusable = _unusable(plan.listing, job.shard)
    n_failed = counts.n_failed + len(unusable)
    failures = (unusable + counts.failures)[:FAILURES_KEPT]
    if failures:
        _print_failures(failures, n_failed, failure_log.path)
    labeled, confusion, n_images = counts.labeled, counts.confusion, counts.n_images
    mistakes = counts.mistakes if labeled else Mistakes()
    grid = mistakes.write_grid(job.grid, job.classes) if job.grid is not None else None
    result = InferResult(
        model=choice.path,
        provider=session.provider,
        output=job.output,
        classes=job.classes,
        n_images=n_images,
        n_failed=n_failed,
        n_converted=counts.n_converted,
        seconds=time.perf_counter() - t0,
        accuracy=confusion.n_correct / n_images if labeled and n_images else None,
        confusion=confusion.matrix.tolist() if labeled and confusion.matrix is not None else None,
        confused_pairs=confusion.pairs() if labeled and confusion.matrix is None else None,
        n_correct=confusion.n_correct if labeled else None,
        failures=failures,
        notes=session.notes,
        batch_size=job.batch_size,
        workers=plan.workers,
        threads=plan.threads,
        shard=str(job.shard) if job.shard is not None else None,
        failures_output=failure_log.path if failure_log.n else None,
        ignored=dict(plan.listing.ignored),
        png_folders=plan.listing.png_folders[:FAILURES_KEPT],
        mistakes=mistakes.to_json(job.classes),
        mistakes_png=grid,
        precision=choice.precision,
        precision_reason=choice.reason,
        backend=session.backend,
        backend_config=backend_config(session),
        backend_parity=opened.parity,
    )
    if job.shard is not None:
        result.summary = write_shard_summary(result, job.folder, job.shard, n_listed)
    return result


def _check_outputs(folder: str, models: list[str], outputs: list[str]) -> None:
    """Refuse, before any work, outputs that would destroy an input (a model, an image of the folder)
    or that cannot be written: a failure at the end would leave some outputs written and not others."""
    check_not_an_input(outputs, [*models, *(f for m in models if os.path.isfile(m) for f in external_data_files(m))])
    for out in outputs:
        if is_listed(folder, out):
            raise DataError(
                f"{out}: is one of the images under {folder}; writing there would destroy it "
                "(choose another output path)"
            )
        if is_listed(folder, out, existing=False):
            raise DataError(
                f"{out}: a PNG name under {folder}; the next run of the folder would read it as an "
                "image (choose another output path)"
            )
        check_writable(out)


class _FailureLog:
    """`<output>.failures.csv` (path, reason), streamed to a temporary file opened at the first failure
    and renamed into place with the CSV; on success without failures a stale one is removed, so the
    file beside a CSV always belongs to it."""

    def __init__(self, path: str):
        self.path = path
        self.n = 0
        self._stack = contextlib.ExitStack()
        self._writer: Any = None

    def __enter__(self) -> _FailureLog:
        return self

    def add(self, path: str, reason: str) -> None:
        if self._writer is None:
            tmp = self._stack.enter_context(atomic_path(self.path))
            f = self._stack.enter_context(open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape"))
            self._writer = csv.writer(f)
            self._writer.writerow(FAILURE_COLUMNS)
        self._writer.writerow((escape(path), escape(reason)))
        self.n += 1

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)
        if exc[0] is None and self.n == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            remove_stale_temps(self.path)  # a killed run's; `atomic_path` does it when it writes one


def _unusable(listing: Listing, shard: Shard | None) -> list[tuple[str, str]]:
    """The PNG-named entries the walk could not use; with a shard, those that belong to it."""
    return [(p, why) for p, why in listing.skipped if shard is None or shard.contains(p)]


def _what_else(listing: Listing) -> str:
    parts = [
        f"{len(listing.skipped):,} unusable: {printable(listing.skipped[0][0])}: {listing.skipped[0][1]}"
        if listing.skipped
        else "",
        describe_ignored(listing.ignored),
    ]
    parts = [p for p in parts if p]
    return f"; {', '.join(parts)}" if parts else ""


def _strict_message(path: str, reason: str, output: str) -> str:
    return f"{printable(path)}: {reason} (--strict: stopped at the first file that failed; {output} not written)"


def _print_failures(failures: list[tuple[str, str]], n_failed: int, listed_in: str) -> None:
    log(f"{n_failed:,} file(s) could not be used (all listed in {listed_in}):")
    for path, reason in failures[:FAILURES_PRINTED]:
        log(f"  {printable(path)}: {reason}")
    if n_failed > FAILURES_PRINTED:
        log(f"  ... and {n_failed - FAILURES_PRINTED:,} more")


def _backend_line(result: InferResult) -> str:
    """`, precision f32, parity checked ...` for a backend other than onnxruntime; else empty."""
    parts = []
    if result.backend_config:
        parts.append(f"precision {result.backend_config.get('INFERENCE_PRECISION_HINT')}")
    p = result.backend_parity
    if p:
        parts.append(
            f"vs onnxruntime: max |diff| {p['max_abs_diff']:.3g}, {p['argmax_agreement']:.2%} same on "
            f"{p['n_images']} images ({'recorded earlier' if p.get('cached') else 'checked now'})"
        )
    return f" ({'; '.join(parts)})" if parts else ""


def format_summary(result: InferResult) -> str:
    """A short human-readable report: provider, counts, speed, accuracy and the confusion matrix."""
    lines = [
        f"model     {result.model} ({result.provider}, {result.precision})",
        f"backend   {result.backend}{_backend_line(result)}",
        f"images    {result.n_images:,} predicted, {result.n_failed:,} failed, {result.n_converted:,} converted",
        f"speed     {result.images_per_second:,.0f} images/s ({result.seconds:.2f} s)",
        f"output    {result.output}",
    ]
    if result.failures_output is not None:
        lines.append(f"failures  {result.failures_output}")
    if result.mistakes_png is not None:
        lines.append(f"mistakes  {result.mistakes_png} (the {len(result.mistakes)} most confident wrong predictions)")
    if describe_ignored(result.ignored):
        lines.append(f"ignored   {describe_ignored(result.ignored)}")
    if result.png_folders:
        n = len(result.png_folders)
        lines.append(
            f"note      {n:,} folder{'s' if n > 1 else ''} named like a PNG, searched like any folder: "
            f"{printable(result.png_folders[0])}{', ...' if n > 1 else ''}"
        )
    if result.shard is not None:
        lines.append(f"shard     {result.shard} (summary {result.summary})")
    lines += [f"note      {n}" for n in result.notes]
    if result.accuracy is not None:
        lines.append(f"accuracy  {result.accuracy:.4f}")
        lines += summary_lines(result.classes, result.confusion, result.confused_pairs, table)
    return "\n".join(lines)
