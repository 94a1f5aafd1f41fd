"""`cnnkit infer`: classify a folder of PNGs with an ONNX model, streaming predictions to a CSV.

The pipeline, tuned on a 2-core machine (the tuning notes are in `scripts/bench_infer.py`):
  - one worker process per core reads + decodes PNGs (`cnnkit.images.decode_batches`) in tasks of
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
from typing import Any

import numpy as np

from cnnkit.confusion import Confusion, summary_lines, top_pairs
from cnnkit.console import Progress, log, printable, table
from cnnkit.csvcells import RISKY_START, escape
from cnnkit.errors import DataError, FileFailedError
from cnnkit.files import atomic_path, check_not_an_input, check_writable, remove_stale_temps
from cnnkit.images import decode_batches, default_workers
from cnnkit.listing import Listing, describe_ignored, is_listed, iter_pngs
from cnnkit.meta import predict
from cnnkit.runs import ONNX_NAME, PREDICTIONS_NAME, latest_file
from cnnkit.runtime.outputs import CSV_COLUMNS, FAILURE_COLUMNS, FAILURES_KEPT, failures_path, summary_path
from cnnkit.runtime.session import create_session, read_meta
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
# Below this, one process decoding and predicting in turn is as fast as starting workers: measured
# break-even near 4,000 28 x 28 images on 2 cores (about 0.3 s of work; forking and the first task's
# latency cost ~50 ms).
MIN_FILES_FOR_WORKERS = 4096
# Paths read ahead of decoding (~90 bytes each): a folder with fewer files is counted before the run
# starts (exact task sizes and a progress bar with a total); a larger one streams, its bar counting up.
LOOKAHEAD_FILES = 1 << 16


def _task_files(n_files: int, workers: int, batch_size: int, image_bytes: int) -> int:
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
        provider: the onnxruntime execution provider that ran it.
        output: the predictions CSV.
        classes: the model's class names.
        n_images: images predicted (rows in the CSV).
        n_failed: files that could not be read or decoded (not in the CSV).
        n_converted: images converted to 8-bit grayscale of the model's size.
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
    shard: Shard | str | None = None,
    strict: bool = False,
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
        shard: `Shard(K, N)` or "K/N": keep only the files of shard K of N (by a hash of their path,
            `cnnkit.runtime.shard`); default output `predictions.shard-K-of-N.csv` next to the model,
            and a summary `<output>.json` for `cnnkit merge`.
        strict: stop at the first file that cannot be used (`FileFailedError`, nothing written)
            instead of listing it in `<output>.failures.csv` and going on.

    Returns:
        An `InferResult` (`to_dict()` for JSON). Files that failed are not in the CSV; they are
        counted, listed in `<output>.failures.csv` (written atomically; a stale one from an earlier
        run is removed when none failed) and the first `FAILURES_KEPT` in `result.failures`.

    Raises:
        ModelError, DeviceError, DataError: a model, device or folder that cannot be used.
        FileFailedError: with `strict`, a file that could not be used.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise DataError("batch size must be at least 1")
    if model is None:
        model = latest_file(ONNX_NAME, "export one with `cnnkit export --format onnx`, or pass the model path")
    meta = read_meta(model)  # a foreign or broken model fails here, before any work
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if output is None:
        name = PREDICTIONS_NAME if shard is None else shard.default_output
        output = os.path.join(os.path.dirname(os.path.abspath(model)), name)
    _check_outputs(folder, model, [output, failures_path(output), *([summary_path(output)] if shard else [])])
    # The folder is walked as the run goes, in the order of its sorted paths. The first files are
    # read ahead: a folder (or shard) smaller than that is sized exactly as a listed one would be;
    # past it, decode tasks are at their largest whatever the size, so a lower bound is enough.
    listing = Listing(root=folder, files=[])  # what the walk skipped or ignored, filled as it goes
    walk = iter_pngs(folder, listing)
    picker = ShardFilter(walk, shard) if shard is not None else None
    selected = iter(picker if picker is not None else walk)
    workers = default_workers() if workers is None else max(0, workers)
    image_bytes = meta.input_shape[1] * meta.input_shape[2]
    largest = _task_files(1 << 40, workers, batch_size, image_bytes)
    ahead = 1 + max(LOOKAHEAD_FILES, min_files_for_workers, TASKS_PER_WORKER * max(1, workers) * largest)
    head = list(itertools.islice(selected, ahead))
    n_known = len(head)  # every file when below `ahead`, else a lower bound
    if not head and (picker is None or picker.n_seen == 0):
        raise DataError(f"{folder}: no PNG files found (searched recursively for *.png{_what_else(listing)})")
    task = _task_files(n_known, workers, batch_size, image_bytes)
    if n_known < min_files_for_workers or n_known <= task:
        workers = 0  # what decode_batches does: a small folder is not worth starting processes
    if threads is None:
        threads = _threads_for(workers)

    classes = list(meta.classes)
    k = len(classes)
    labeled = True  # every file so far sits under a class folder
    names = [*classes, ""]  # names[-1] == "": one lookup gives the label column for -1 too
    confusion = Confusion(k)
    failures: list[tuple[str, str]] = []
    n_failed = n_images = n_converted = 0

    in_flight: deque[list[str]] = deque()  # the files of the chunks being decoded, in order
    chunks = _chunked(itertools.chain(head, selected) if n_known == ahead else iter(head), task, in_flight)
    del head
    batches = decode_batches(folder, (), meta.input_shape[1:], task, workers=workers, chunks=chunks)
    with contextlib.closing(batches):
        # Fork the decoders (first batch) before onnxruntime starts its threads.
        first = next(batches, None)  # None: a shard without files
        session = create_session(model, device=device, threads=threads)
        bar = Progress(n_known if n_known < ahead else None, "infer", unit="img") if progress else None
        # Names that are not valid UTF-8 reach us surrogate-escaped (`os.fsdecode`): they are written
        # back as their original bytes, so the CSV names exactly the file on disk. The failure list
        # is entered first so that it is committed last: a CSV that cannot be written (a full disk)
        # leaves no failure list of a run that has no CSV.
        with (
            _FailureLog(failures_path(output)) as failure_log,
            atomic_path(output) as tmp,
            open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f,
        ):
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for batch in itertools.chain([first] if first is not None else [], batches):
                files = in_flight.popleft()  # batches come back in order, one per chunk
                labels = _labels(files, classes)
                labeled = labeled and bool((labels >= 0).all())
                if strict and (listing.skipped or batch.failures):
                    bad = _unusable(listing, shard) + [(files[p - batch.start], why) for p, why in batch.failures]
                    if bad:
                        raise FileFailedError(_strict_message(*bad[0], output))
                for pos, reason in batch.failures:
                    n_failed += 1
                    failure_log.add(files[pos - batch.start], reason)
                    if len(failures) < FAILURES_KEPT:
                        failures.append((files[pos - batch.start], reason))
                n_converted += batch.converted
                if bar is not None:
                    bar.update(len(batch.images) + len(batch.failures))
                if not len(batch.images):
                    continue
                # The model sees `batch_size` images per call; the rest works on the whole decoded
                # batch at once (numpy calls on 256 rows cost more in overhead than in work).
                images, positions = batch.images, batch.positions - batch.start
                outputs = [session.run(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
                pred, prob = predict(outputs[0] if len(outputs) == 1 else np.concatenate(outputs), meta.output)
                true = labels[positions]
                # %.9g round-trips a float32 exactly: the CSV holds the model's own number.
                cols = zip(positions.tolist(), pred.tolist(), prob.tolist(), true.tolist(), strict=True)
                # Plain f-string rows cost half the csv module's (0.8 vs 2 us/row); they are the same
                # text when no path or class name holds a comma, quote or line break, or starts
                # like a spreadsheet formula (`cnnkit.csvcells`).
                if not _NEEDS_CARE.search("\0".join([*files, *classes])):
                    f.write("".join([f"{files[p]},{classes[i]},{v:.9g},{names[t]}\r\n" for p, i, v, t in cols]))
                else:
                    writer.writerows([(escape(files[p]), escape(classes[i]), f"{v:.9g}", escape(names[t]))
                                      for p, i, v, t in cols])
                if labeled:
                    confusion.add(true, pred)
                n_images += len(positions)
            # The walk is over: PNG-named entries it could not use (dangling symlinks, ...) failed too.
            for path, reason in _unusable(listing, shard):
                if strict:
                    raise FileFailedError(_strict_message(path, reason, output))
                failure_log.add(path, reason)
        if bar is not None:
            bar.close()

    # PNG-named entries the walk could not use failed too; with a shard, each belongs to one shard.
    n_listed = (picker.n_seen if picker is not None else n_images + n_failed) + len(listing.skipped)
    unusable = _unusable(listing, shard)
    n_failed += len(unusable)
    failures = (unusable + failures)[:FAILURES_KEPT]
    if failures:
        _print_failures(failures, n_failed, failure_log.path)
    correct = confusion.n_correct
    result = InferResult(
        model=model,
        provider=session.provider,
        output=output,
        classes=classes,
        n_images=n_images,
        n_failed=n_failed,
        n_converted=n_converted,
        seconds=time.perf_counter() - t0,
        accuracy=correct / n_images if labeled and n_images else None,
        confusion=confusion.matrix.tolist() if labeled and confusion.matrix is not None else None,
        confused_pairs=confusion.pairs() if labeled and confusion.matrix is None else None,
        n_correct=correct if labeled else None,
        failures=failures,
        notes=session.notes,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        shard=str(shard) if shard is not None else None,
        failures_output=failure_log.path if failure_log.n else None,
        ignored=dict(listing.ignored),
        png_folders=listing.png_folders[:FAILURES_KEPT],
    )
    if shard is not None:
        result.summary = write_shard_summary(result, folder, shard, n_listed)
    return result


def _check_outputs(folder: str, model: str, outputs: list[str]) -> None:
    """Refuse, before any work, outputs that would destroy an input (the model, an image of the folder)
    or that cannot be written: a failure at the end would leave some outputs written and not others."""
    check_not_an_input(outputs, [model])
    for out in outputs:
        if is_listed(folder, out):
            raise DataError(f"{out}: is one of the images under {folder}; writing there would destroy it "
                            "(choose another output path)")
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
    parts = [f"{len(listing.skipped):,} unusable: {printable(listing.skipped[0][0])}: {listing.skipped[0][1]}"
             if listing.skipped else "", describe_ignored(listing.ignored)]
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


def format_summary(result: InferResult) -> str:
    """A short human-readable report: provider, counts, speed, accuracy and the confusion matrix."""
    lines = [
        f"model     {result.model} ({result.provider})",
        f"images    {result.n_images:,} predicted, {result.n_failed:,} failed, {result.n_converted:,} converted",
        f"speed     {result.images_per_second:,.0f} images/s ({result.seconds:.2f} s)",
        f"output    {result.output}",
    ]
    if result.failures_output is not None:
        lines.append(f"failures  {result.failures_output}")
    if describe_ignored(result.ignored):
        lines.append(f"ignored   {describe_ignored(result.ignored)}")
    if result.png_folders:
        n = len(result.png_folders)
        lines.append(f"note      {n:,} folder{'s' if n > 1 else ''} named like a PNG, searched like any folder: "
                     f"{printable(result.png_folders[0])}{', ...' if n > 1 else ''}")
    if result.shard is not None:
        lines.append(f"shard     {result.shard} (summary {result.summary})")
    lines += [f"note      {n}" for n in result.notes]
    if result.accuracy is not None:
        lines.append(f"accuracy  {result.accuracy:.4f}")
        lines += summary_lines(result.classes, result.confusion, result.confused_pairs, table)
    return "\n".join(lines)
