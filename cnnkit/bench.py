"""`cnnkit bench`: every artifact of a run x every usable device, with the parity columns.

For each artifact in the run folder (`best.pt` run eagerly as the reference, `model.onnx`,
`model.int8.onnx`, `model.fp16.onnx` where a CUDA provider works, `model.ts`, `model.pt2`) and each
device it can run on here (onnxruntime's CPU / CUDA providers through `cnnkit.runtime`, the session
`cnnkit infer` uses; torch on the CPU / CUDA for the eager model, TorchScript and pt2), one row:

  - file size; top-1 accuracy on DATA (default: the run's testing split) and its change against the
    eager model, in points;
  - max |output - eager output| and argmax agreement with the eager model on every image (the eager
    reference runs in float32 on the CPU, so GPU rows show what TF32 / fp16 do to the numbers);
  - load time, then the first call at batch 1 right after loading (cold); after `LATENCY_WARMUP` more
    calls, `latency_calls` timed single-image calls give p50 / p95 / p99; images/s at `batch_size` (the
    fastest of a few passes over all images) and at each of `throughput_batches`, the best of them kept
    with its batch size;
  - for ONNX rows, cold start: a fresh `python -c` process that imports cnnkit's runtime, opens the
    model as `cnnkit.Predictor` and classifies one image file, timed from the spawn to its answer
    (the median of `cold_starts` processes), and that process's peak resident memory (its
    `ru_maxrss` from `os.wait4`: native memory included, which tracemalloc would not see).

Every runtime gets the same number of intra-op threads (`threads`, default 1: how `cnnkit infer` runs
the model beside its decoder processes). One thread also keeps the table honest on a shared machine:
with more threads than idle cores, torch's OpenMP pool waits on the machine's load (docs/benchmarks.md),
and the table would compare that load rather than the artifacts. Rows run
one after another in this process, so compare rows of one table, not numbers across tables.

With openvino installed (`pip install 'cnnkit[openvino]'`), every ONNX file also gets a CPU row on
OpenVINO (`backend` "openvino", the session `cnnkit infer --backend openvino` uses, at f32 precision).

Torch rows need torch; without it the ONNX rows still run (the reference columns are then empty),
so the benchmark works on an edge device with onnxruntime + numpy only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.batches import LOAD_LIMIT, load_images
from cnnkit.console import log, table
from cnnkit.devices import DeviceSpec, parse_device
from cnnkit.errors import DataError, DeviceError, ModelError
from cnnkit.files import path_kind
from cnnkit.listing import iter_images
from cnnkit.meta import ModelMeta, is_user_arch, predict
from cnnkit.provenance import read_proven
from cnnkit.runs import ARTIFACT_NAMES, BEST_NAME, REPORT_SUFFIX, latest_run

DEFAULT_BATCH = 256  # `cnnkit infer`'s default
DEFAULT_THREADS = 1
MAX_REPORT_BYTES = 16 << 20  # an export report holds one model record (at most 4 MiB, `cnnkit.meta`)
LATENCY_CALLS = 200  # timed batch-1 calls behind p50 / p95 / p99
LATENCY_WARMUP = 10  # untimed batch-1 calls before them
THROUGHPUT_BATCHES = (32,)  # batch sizes tried beside `batch_size` for the best-batch column
THROUGHPUT_PASSES = 3
SWEEP_PASSES = 2  # passes at each of `throughput_batches`
COLD_STARTS = 1  # fresh processes timed per ONNX row (0: none)
COLD_TIMEOUT = 120.0  # seconds before a cold-start process is killed
THROUGHPUT_SECONDS = 3.0  # stop adding passes after this long
# Artifact kind -> (file name, runtime): the checkpoint run eagerly, then what `cnnkit export` writes.
ARTIFACTS = (
    ("eager", BEST_NAME, "torch"),
    *(
        (kind, name, "torch" if kind in ("torchscript", "pt2") else "onnxruntime")
        for kind, name in ARTIFACT_NAMES.items()
    ),
)

PRECISIONS = {"onnx-int8": "int8", "onnx-fp16": "fp16"}  # every other artifact is float32

# Loading these runs code from the file: only ones cnnkit can prove it wrote, or with trust_model.
CODE_BEARING = ("torchscript", "pt2")

Runner = Callable[[np.ndarray], np.ndarray]


def top1(outputs: np.ndarray, labels: np.ndarray, output_kind: str) -> float:
    """Top-1 accuracy (0..1) of raw model outputs."""
    return float((predict(outputs, output_kind)[0] == labels).mean())


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class BenchRow:
    """One artifact on one device.

    Attributes:
        artifact: `eager`, `onnx`, `onnx-int8`, `onnx-fp16`, `torchscript` or `pt2`.
        path: the file.
        device: `cpu`, `cuda` or `cuda:N`.
        runtime: `torch` or `onnxruntime`, with the provider for onnxruntime.
        bytes: file size.
        accuracy: top-1 accuracy (0..1), None without labels.
        accuracy_change: (accuracy - eager accuracy) in points, None without labels or eager.
        max_abs_diff: largest |output - eager output| over all images, None without eager.
        argmax_agreement: share (0..1) of images predicted as the eager model does, None without eager.
        load_ms: loading the file / creating the session.
        cold_ms: the first call (batch 1) right after loading.
        p50_ms: median warm call at batch 1 (over `latency_calls` calls after `LATENCY_WARMUP` untimed ones).
        images_per_second: at `batch_size`.
        error: why the row could not run (the other numbers are then None).
        precision: `fp32`, `int8` or `fp16`.
        p95_ms, p99_ms: 95th and 99th percentile of the same batch-1 calls (numpy's linear interpolation).
        latency_calls: how many batch-1 calls the three percentiles are over.
        best_batch: the batch size, of `batch_size` and `throughput_batches`, with the most images/s;
            best_images_per_second: that speed.
        cold_start_ms: ONNX rows: a fresh process, spawn to first prediction (median of `cold_starts`).
        peak_rss_mb: that process's peak resident memory, MiB (largest of the `cold_starts` processes).
        cold_start_error: why the cold-start process gave no answer (the two columns are then None).
        backend: `onnxruntime` or `openvino` for ONNX files (`cnnkit.runtime.backends`), `torch` otherwise.
    """

    artifact: str
    path: str
    device: str
    runtime: str
    bytes: int
    accuracy: float | None = None
    accuracy_change: float | None = None
    max_abs_diff: float | None = None
    argmax_agreement: float | None = None
    load_ms: float | None = None
    cold_ms: float | None = None
    p50_ms: float | None = None
    images_per_second: float | None = None
    error: str | None = None
    precision: str = "fp32"
    p95_ms: float | None = None
    p99_ms: float | None = None
    latency_calls: int | None = None
    best_batch: int | None = None
    best_images_per_second: float | None = None
    cold_start_ms: float | None = None
    peak_rss_mb: float | None = None
    cold_start_error: str | None = None
    backend: str = ""


@dataclass
class BenchResult:
    """What `bench` measured.

    Attributes:
        run_dir: the run folder.
        data: the folder of images.
        n_images: images used; labeled: whether accuracy columns are filled.
        batch_size: batch size of the throughput column.
        reference: what the diff columns compare against.
        threads: intra-op threads of every runtime.
        rows: one per artifact x device.
        notes: artifacts or devices skipped, and why.
        versions: library versions; seconds: wall time.
        latency_calls, latency_warmup: timed and untimed batch-1 calls per row.
        throughput_batches: the batch sizes tried for the best-batch column (`batch_size` among them).
        cold_starts: fresh processes timed per ONNX row.
    """

    run_dir: str
    data: str
    n_images: int
    labeled: bool
    batch_size: int
    reference: str
    rows: list[BenchRow]
    notes: list[str] = field(default_factory=list)
    threads: int = DEFAULT_THREADS
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    latency_calls: int = LATENCY_CALLS
    latency_warmup: int = LATENCY_WARMUP
    throughput_batches: list[int] = field(default_factory=list)
    cold_starts: int = COLD_STARTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TABLE_HEADERS = (
    "artifact",
    "device",
    "KB",
    "acc %",
    "Δacc pts",
    "max|diff|",
    "agree %",
    "load ms",
    "cold ms",
    "p50 ms b1",
    "img/s",
    "p95 ms b1",
    "p99 ms b1",
    "best batch",
    "best img/s",
    "cold start ms",
    "peak MiB",
)


def _device_cell(row: BenchRow) -> str:
    return f"{row.device} (openvino)" if row.backend == "openvino" else row.device


def format_table(result: BenchResult) -> str:
    """The human table (stderr): one line per row, `-` where a number does not apply."""

    def num(v: float | None, fmt: str) -> object:
        return "-" if v is None else format(v, fmt)

    rows = []
    for r in result.rows:
        if r.error:
            rows.append(
                [
                    r.artifact,
                    _device_cell(r),
                    round(r.bytes / 1024),
                    f"error: {r.error}",
                    *[""] * (len(TABLE_HEADERS) - 4),
                ]
            )
            continue
        rows.append(
            [
                r.artifact,
                _device_cell(r),
                round(r.bytes / 1024),
                num(None if r.accuracy is None else r.accuracy * 100, ".2f"),
                num(r.accuracy_change, "+.2f"),
                num(r.max_abs_diff, ".1e"),
                num(None if r.argmax_agreement is None else r.argmax_agreement * 100, ".2f"),
                num(r.load_ms, ".1f"),
                num(r.cold_ms, ".2f"),
                num(r.p50_ms, ".3f"),
                num(r.images_per_second, ",.0f"),
                num(r.p95_ms, ".3f"),
                num(r.p99_ms, ".3f"),
                num(r.best_batch, "d"),
                num(r.best_images_per_second, ",.0f"),
                num(r.cold_start_ms, ",.0f"),
                num(r.peak_rss_mb, ".0f"),
            ]
        )
    head = (
        f"bench: {result.run_dir} on {result.n_images:,} images from {result.data}; "
        f"{result.threads} thread(s); throughput at batch {result.batch_size} (best of "
        f"{', '.join(map(str, result.throughput_batches))}); latency over {result.latency_calls} batch-1 calls after "
        f"{result.latency_warmup} warm-up; cold start: spawn to first prediction, median of {result.cold_starts} "
        f"process(es); diffs against {result.reference}"
    )
    lines = [head, table(TABLE_HEADERS, rows)]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Loading artifacts


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_cuda(index: int = 0) -> bool:
    import torch

    return bool(torch.cuda.is_available()) and index < torch.cuda.device_count()


def _onnx_cuda_works(path: str, device: str = "cuda") -> tuple[bool, str]:
    from cnnkit.runtime.session import create_session

    try:
        create_session(path, device=device, threads=None)
    except DeviceError as e:
        return False, str(e)
    return True, ""


def _load(
    artifact: str,
    path: str,
    device: str,
    threads: int | None = DEFAULT_THREADS,
    data: bytes | None = None,
    trust_arch: str | None = None,
    backend: str = "onnxruntime",
) -> tuple[Runner, str]:
    """(runner: uint8 batch -> float32 outputs, runtime description); torch's threads are set by `bench`.
    `data`: a TorchScript or pt2 file's checked bytes, loaded instead of `path`; `trust_arch`: the user
    arch the eager checkpoint may name (`cnnkit.checkpoint.model_from_checkpoint`); `backend`: the
    runtime of an ONNX file (`cnnkit.runtime.backends`)."""
    if artifact.startswith("onnx") and backend == "openvino":
        from cnnkit.runtime.openvino import create_openvino_session

        ov = create_openvino_session(path, device=device, threads=threads)
        return ov.run, f"openvino {ov.config['openvino']} CPU ({ov.config['INFERENCE_PRECISION_HINT']})"
    if artifact.startswith("onnx"):
        from cnnkit.runtime.session import create_session

        session = create_session(path, device=device, threads=threads)
        return session.run, f"onnxruntime {session.provider.replace('ExecutionProvider', '')}"
    import torch

    dev = torch.device(device)
    if artifact == "eager":
        from cnnkit.checkpoint import model_from_checkpoint

        module = model_from_checkpoint(path, trust_arch)[0].to(dev).eval()
    elif artifact == "torchscript":
        from cnnkit.export.torchscript import load_torchscript

        module = load_torchscript(path, data=data)[0].to(dev)
    else:
        from cnnkit.export.pt2 import load_pt2

        module = load_pt2(path, device=device, data=data)[0]

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x)).to(dev)).float().cpu().numpy()

    return run, f"torch {torch.__version__}"


@dataclass
class _Timings:
    """What `_measure` found for one runner."""

    outputs: np.ndarray  # over all images, at `batch_size`
    cold_ms: float
    latencies_ms: np.ndarray  # the timed batch-1 calls
    images_per_second: float  # at `batch_size`
    best_batch: int
    best_images_per_second: float


def _latencies(run: Runner, images: np.ndarray, calls: int) -> np.ndarray:
    """ms of `calls` single-image calls (cycling through the images) after `LATENCY_WARMUP` untimed ones."""
    for i in range(LATENCY_WARMUP):
        run(images[i % len(images)][None])
    times = np.empty(calls)
    for i in range(calls):
        x = images[i % len(images)][None]
        t = time.perf_counter()
        run(x)
        times[i] = time.perf_counter() - t
    return times * 1e3


def _throughput(run: Runner, images: np.ndarray, batch_size: int, passes: int) -> tuple[float, np.ndarray]:
    """(images/s of the fastest of `passes` passes over all images, at most THROUGHPUT_SECONDS of them; the
    first pass's outputs)."""
    best, outputs = float("inf"), None
    t_end = time.perf_counter() + THROUGHPUT_SECONDS
    for _ in range(passes):
        t = time.perf_counter()
        outs = [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        best = min(best, time.perf_counter() - t)
        if outputs is None:
            outputs = np.concatenate(outs).astype(np.float32)
        if time.perf_counter() > t_end:
            break
    assert outputs is not None
    return len(images) / best, outputs


def _measure(run: Runner, images: np.ndarray, batch_size: int, latency_calls: int, sweep: tuple[int, ...]) -> _Timings:
    """The cold call, the batch-1 latencies, and throughput at `batch_size` and at each size of `sweep`."""
    t = time.perf_counter()
    run(images[:1])
    cold = (time.perf_counter() - t) * 1e3
    latencies = _latencies(run, images, latency_calls)
    ips, outputs = _throughput(run, images, batch_size, THROUGHPUT_PASSES)
    speeds = {batch_size: ips}
    for b in sweep:
        if b not in speeds:
            speeds[b] = _throughput(run, images, b, SWEEP_PASSES)[0]
    best = max(speeds, key=lambda b: speeds[b])
    return _Timings(outputs, cold, latencies, ips, best, speeds[best])


# --------------------------------------------------------------------------------------------
# Cold start: a fresh process, spawn to first answer

# Run as `python -c COLD_START_CODE MODEL DEVICE THREADS IMAGE`: what a user's first prediction costs.
COLD_START_CODE = """
import sys
from cnnkit.runtime.predictor import Predictor
p = Predictor(sys.argv[1], sys.argv[2], threads=int(sys.argv[3]), workers=0, batch_size=1)
index = p.predict([sys.argv[4]])[0].index
try:
    hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
except (OSError, IndexError):
    hwm = "-"
print("cnnkit-cold-start", index, hwm, flush=True)
"""
COLD_MARK = "cnnkit-cold-start"


def _child_env() -> dict[str, str]:
    """This environment, with this cnnkit first on the child's path (the one being benchmarked)."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


def cold_start(model: str, device: str, threads: int, image: str) -> tuple[float, float]:
    """(ms from spawning a fresh Python to its first prediction of `image` with `model`, that process's
    peak resident memory in MiB). POSIX only (`os.wait4`).

    The memory is the child's own VmHWM (`/proc/self/status`, its address space since exec). Not
    `ru_maxrss` where /proc exists: Linux carries the high-water mark across exec, and subprocess's
    vfork shares this process's memory until then, so a child of a torch-loaded process would report
    this process's size. Without /proc (macOS) it is the child's `ru_maxrss` from `os.wait4`.

    Raises:
        RuntimeError: the process gave no answer (its last output line says why) or ran over COLD_TIMEOUT.
    """
    argv = [sys.executable, "-c", COLD_START_CODE, model, device, str(threads), image]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(), text=True)
    timer = threading.Timer(COLD_TIMEOUT, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        seen, elapsed, hwm_kib = [], None, "-"
        for line in proc.stdout:
            if line.startswith(COLD_MARK):
                elapsed = (time.perf_counter() - t0) * 1e3
                hwm_kib = line.split()[-1]
            elif line.strip():
                seen.append(line.strip())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if elapsed is None or proc.returncode != 0:
        raise RuntimeError((seen or [f"exit status {proc.returncode}"])[-1][:200])
    if hwm_kib.isdigit():
        return elapsed, int(hwm_kib) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return elapsed, usage.ru_maxrss * scale / (1 << 20)


def _first_image(folder: str) -> str | None:
    """The folder's first image file (the one cold starts predict)."""
    first = next(iter_images(folder), None)
    return None if first is None else os.path.join(folder, first)


def _cold_columns(row: BenchRow, image: str | None, threads: int, runs: int) -> None:
    """Fill the cold-start columns of an ONNX row from `runs` fresh processes (median time, largest memory)."""
    if runs < 1 or not row.artifact.startswith("onnx") or row.error:
        return
    if row.backend == "openvino":  # its first run also checks parity against onnxruntime: not a cold start
        row.cold_start_error = "measured on onnxruntime rows only"
        return
    if image is None or not hasattr(os, "wait4"):
        row.cold_start_error = "no image file to predict" if image is None else "needs os.wait4 (POSIX)"
        return
    try:
        found = [cold_start(row.path, row.device, threads, image) for _ in range(runs)]
    except (RuntimeError, OSError) as e:
        row.cold_start_error = str(e) or type(e).__name__
        log(f"bench: {row.artifact} on {row.device}: cold start: {row.cold_start_error}")
        return
    row.cold_start_ms = round(float(np.median([ms for ms, _ in found])), 1)
    row.peak_rss_mb = round(max(mb for _, mb in found), 1)


# --------------------------------------------------------------------------------------------
# The benchmark


def _drop_unproven(found: dict[str, str], proven: dict[str, bytes]) -> list[str]:
    """Remove from `found` the code-bearing files cnnkit cannot prove it wrote (a note for each); put
    the bytes of those it can in `proven`: they are loaded from there, never read from disk again."""
    notes = []
    for kind in CODE_BEARING:
        if kind not in found:
            continue
        data, why = read_proven(found[kind])
        if data is not None:
            proven[kind] = data
        else:
            notes.append(
                f"{found.pop(kind)}: skipped, not loaded: it can run code and is {why}; "
                "pass --trust-model if you trust it"
            )
    return notes


def _meta_of(run_dir: str, found: dict[str, str]) -> ModelMeta:
    """The model record, torch-free when an ONNX file is there."""
    from cnnkit.runtime.session import read_meta

    for kind in ("onnx", "onnx-int8", "onnx-fp16"):
        if kind in found:
            return read_meta(found[kind])
    if "eager" in found and _have_torch():
        from cnnkit.checkpoint import load_checkpoint

        return ModelMeta.from_dict(load_checkpoint(found["eager"])["meta"])
    raise ModelError(f"{run_dir}: no ONNX model (and no usable checkpoint) to benchmark; run `cnnkit export` first")


def _recorded_test(meta: ModelMeta, found: dict[str, str]) -> str | None:
    """The testing folder the model was trained with. An exported record names folders only (see
    `cnnkit.export.shipped_meta`), so the full path comes from an export report beside the artifacts,
    which stays on the machine that exported them, else from the record itself."""
    names = [meta.extra]
    for path in found.values():
        report = path + REPORT_SUFFIX
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if os.path.getsize(report) <= MAX_REPORT_BYTES:
                with open(report, encoding="utf-8") as f:
                    names.append(json.load(f)["meta"]["extra"])
    folders = [e.get("data", {}).get("test") for e in names if isinstance(e, dict) and isinstance(e.get("data"), dict)]
    folders = [f for f in folders if isinstance(f, str) and f]
    return next((f for f in folders if os.path.isdir(f)), folders[0] if folders else None)


def _resolve_data(data: str | None, meta: ModelMeta, run_dir: str, found: dict[str, str]) -> str:
    if data is not None:
        if not os.path.isdir(data):
            raise DataError(f"{data}: no such folder")
        return data
    folder = _recorded_test(meta, found)
    if not folder or not os.path.isdir(folder):
        raise DataError(
            f"the model in {run_dir} records no testing folder{'' if not folder else ' that exists (' + folder + ')'}; "
            "pass DATA (a folder of PNGs, DIR/<class>/*.png for accuracy)"
        )
    return str(folder)


def bench(
    data: str | None = None,
    run: str | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH,
    limit: int | None = LOAD_LIMIT,
    threads: int = DEFAULT_THREADS,
    trust_model: bool = False,
    trust_arch: str | None = None,
    latency_calls: int = LATENCY_CALLS,
    throughput_batches: tuple[int, ...] = THROUGHPUT_BATCHES,
    cold_starts: int = COLD_STARTS,
) -> BenchResult:
    """Benchmark every artifact of a run on every usable device.

    Args:
        data: a folder of PNGs (class folders give accuracy); default: the run's testing split.
        run: the run folder; default `runs/latest`.
        trust_model: load `.ts` / `.pt2` files (which can run code) even when cnnkit cannot prove it
            wrote them (`cnnkit.provenance`); by default those are skipped with a note.
        trust_arch: the eager reference of a user arch (`module.path:ClassName`) is rebuilt only when this
            is the run's import string (importing the module runs its code); otherwise skipped with a note.
        device: `auto` (every device that works here), `cpu`, or `cuda[:N]` (an error if it does not work).
        batch_size: batch size of the throughput column.
        limit: at most this many images (spread over the folder); None for all.
        threads: intra-op threads for every runtime (onnxruntime's CPU provider and torch on the CPU).
        latency_calls: timed batch-1 calls per row behind p50 / p95 / p99.
        throughput_batches: batch sizes tried beside `batch_size` for the best-batch column.
        cold_starts: fresh processes timed per ONNX row (spawn to first prediction, peak memory); 0: none.

    Returns:
        A `BenchResult`; `format_table(result)` is the human table, `to_dict()` the JSON.

    Raises:
        ModelError: no run folder or nothing to benchmark in it.
        DataError: no usable images.
        DeviceError: unknown device, or `cuda` with neither torch CUDA nor a working CUDA provider.
    """
    t0 = time.perf_counter()
    spec = parse_device(device)
    gpu = "cuda" if spec.index is None else str(spec)  # the name rows, torch and onnxruntime get
    if min(batch_size, threads, latency_calls, *throughput_batches) < 1 or cold_starts < 0:
        raise DataError("batch sizes, threads and latency calls must be at least 1, cold starts at least 0")
    run_dir, found = _artifacts(run)
    meta = _meta_of(run_dir, found)
    folder, images, labels = _images(data, meta, run_dir, found, limit)
    torch_ok = _have_torch()
    found, notes, proven = _loadable(found, trust_model, torch_ok)  # proven: checked bytes of .ts / .pt2
    _drop_untrusted_arch(found, meta.arch, trust_arch, notes)
    plan = _plan(found, *_devices(found, spec, gpu, torch_ok, notes), gpu, notes)
    how = _Settings(batch_size, threads, latency_calls, tuple(throughput_batches), cold_starts, _first_image(folder))
    with _torch_threads(threads) if torch_ok else contextlib.nullcontext():
        rows, reference = _run_plan(plan, found, images, labels, meta, how, proven, trust_arch)
    if reference is None and rows:
        notes.append("no eager reference (torch missing or no best.pt in the run): diff columns empty")
    if not rows:
        raise ModelError(f"{run_dir}: nothing to benchmark here ({'; '.join(notes) or 'no artifacts'})")
    return _result(run_dir, folder, images, labels, rows, notes, how, t0)


def _result(
    run_dir: str,
    folder: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    rows: list[BenchRow],
    notes: list[str],
    how: _Settings,
    t0: float,
) -> BenchResult:
    """The `BenchResult` of the measured rows, with the settings they were measured under."""
    return BenchResult(
        run_dir=run_dir,
        data=folder,
        n_images=len(images),
        labeled=labels is not None,
        batch_size=how.batch_size,
        reference="eager (best.pt), float32 on the CPU",
        rows=rows,
        notes=notes,
        threads=how.threads,
        versions=_versions(),
        seconds=round(time.perf_counter() - t0, 3),
        latency_calls=how.latency_calls,
        throughput_batches=sorted({how.batch_size, *how.sweep}),
        cold_starts=how.cold_starts,
    )


def _images(
    data: str | None, meta: ModelMeta, run_dir: str, found: dict[str, str], limit: int | None
) -> tuple[str, np.ndarray, np.ndarray | None]:
    """The folder benchmarked on (DATA, or the run's testing split), its images and their labels."""
    folder = _resolve_data(data, meta, run_dir, found)
    loaded = load_images(folder, meta, limit)
    log(
        f"bench: {len(loaded.images):,} images from {folder}"
        + ("" if loaded.labels is not None else " (unlabeled: no accuracy)")
    )
    return folder, loaded.images, loaded.labels


def _artifacts(run: str | None) -> tuple[str, dict[str, str]]:
    """The run folder (default `runs/latest`) and its artifact files, by kind."""
    run_dir = run if run is not None else latest_run()
    if not os.path.isdir(run_dir):
        there = path_kind(run_dir)
        said = "no such run folder" if there == "nothing" else f"is {there}, not a run folder"
        raise ModelError(f"{run_dir}: {said}")
    return run_dir, {
        kind: os.path.join(run_dir, name) for kind, name, _ in ARTIFACTS if os.path.isfile(os.path.join(run_dir, name))
    }


def _drop_untrusted_arch(found: dict[str, str], arch: str, trust_arch: str | None, notes: list[str]) -> None:
    """Leave out the eager checkpoint of a user arch the caller did not name (`--trust-arch`), with a note;
    `cnnkit.checkpoint.model_from_checkpoint` refuses it anyway, this says so once instead of per row."""
    if "eager" in found and is_user_arch(arch) and trust_arch != arch:
        del found["eager"]
        notes.append(
            f"eager: the run's arch {arch!r} is a user arch; rebuilding it imports module "
            f"{arch.partition(':')[0]!r}, which runs its code: pass --trust-arch {arch} if you trust it"
        )


def _loadable(
    found: dict[str, str], trust_model: bool, torch_ok: bool
) -> tuple[dict[str, str], list[str], dict[str, bytes]]:
    """The artifacts this process may and can load, a note for each left out, and the checked bytes
    of the code-bearing ones (`_drop_unproven`)."""
    notes: list[str] = []
    proven: dict[str, bytes] = {}
    if not trust_model:
        notes += _drop_unproven(found, proven)
    if not torch_ok:
        skipped = [k for k in ("eager", "torchscript", "pt2") if k in found]
        if skipped:
            notes.append(f"torch is not installed: skipped {', '.join(skipped)}")
        found = {k: v for k, v in found.items() if k not in skipped}
    return found, notes, proven


def _devices(
    found: dict[str, str], spec: DeviceSpec, gpu: str, torch_ok: bool, notes: list[str]
) -> tuple[list[str], list[str]]:
    """The devices torch and onnxruntime each run on here, for `--device` `spec`; notes say why not the GPU."""
    torch_devices = ["cpu"] + ([gpu] if torch_ok and _torch_cuda(spec.cuda_index) else [])
    onnx_probe = next((found[k] for k in ("onnx", "onnx-int8", "onnx-fp16") if k in found), None)
    ort_cuda, why = _onnx_cuda_works(onnx_probe, gpu) if onnx_probe else (False, "")
    ort_devices = ["cpu"] + ([gpu] if ort_cuda else [])
    if spec.kind == "cuda":
        if gpu not in torch_devices and not ort_cuda:
            raise DeviceError(f"device {gpu}: neither torch nor onnxruntime can use it here ({why or 'no CUDA'})")
        torch_devices, ort_devices = [d for d in torch_devices if d == gpu], [d for d in ort_devices if d == gpu]
        if not ort_cuda and onnx_probe:
            notes.append(f"ONNX files skipped: the onnxruntime CUDA provider is not usable ({why})")
        if gpu not in torch_devices and torch_ok:
            notes.append(f"torch rows skipped: torch cannot use {gpu}")
    elif spec.kind == "cpu":
        torch_devices, ort_devices = ["cpu"], ["cpu"]
    elif why and onnx_probe:
        notes.append(f"onnxruntime CUDA provider not used: {why}")
    return torch_devices, ort_devices


def _have_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _plan(
    found: dict[str, str], torch_devices: list[str], ort_devices: list[str], gpu: str, notes: list[str]
) -> list[tuple[str, str, str, str]]:
    """(artifact kind, path, device, backend) of every row, in the table's order: each ONNX file on
    onnxruntime, then on OpenVINO's CPU device when it is installed and the CPU is benchmarked."""
    plan: list[tuple[str, str, str, str]] = []
    openvino = _have_openvino() and "cpu" in ort_devices
    for kind, _, runtime in ARTIFACTS:
        if kind not in found:
            continue
        devices = torch_devices if runtime == "torch" else ort_devices
        if kind == "onnx-fp16":
            # FP16 is for the CUDA provider; the CPU provider would time a float32 run in disguise.
            if gpu not in devices:
                notes.append(f"{found[kind]}: skipped, FP16 runs on the CUDA provider and none works here")
            devices = [d for d in devices if d == gpu]
        backend = "torch" if runtime == "torch" else "onnxruntime"
        plan += [(kind, found[kind], d, backend) for d in devices]
        if runtime != "torch" and kind != "onnx-fp16" and openvino:
            plan.append((kind, found[kind], "cpu", "openvino"))
    return plan


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run the block with torch's intra-op threads set to `threads`, then put the previous number back."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Settings:
    """How each row is measured (`bench`'s arguments), and the image file cold starts predict."""

    batch_size: int
    threads: int
    latency_calls: int
    sweep: tuple[int, ...]
    cold_starts: int
    image: str | None


def _run_plan(
    plan: list[tuple[str, str, str, str]],
    found: dict[str, str],
    images: np.ndarray,
    labels: np.ndarray | None,
    meta: ModelMeta,
    how: _Settings,
    proven: dict[str, bytes],
    trust_arch: str | None = None,
) -> tuple[list[BenchRow], np.ndarray | None]:
    """Measure each (artifact, path, device) of the plan; the eager CPU run is the reference."""
    reference: np.ndarray | None = None
    ref_acc: float | None = None
    if "eager" in found and ("eager", found["eager"], "cpu", "torch") not in plan:
        # --device cuda: the reference still runs in float32 on the CPU
        ref_run, _ = _load("eager", found["eager"], "cpu", how.threads, trust_arch=trust_arch)
        b = how.batch_size
        reference = np.concatenate([ref_run(images[i : i + b]) for i in range(0, len(images), b)])
        ref_acc = None if labels is None else top1(reference, labels, meta.output)
    rows: list[BenchRow] = []
    for kind, path, dev, backend in plan:
        row = BenchRow(
            artifact=kind,
            path=path,
            device=dev,
            runtime="",
            bytes=os.path.getsize(path),
            precision=PRECISIONS.get(kind, "fp32"),
            backend=backend,
        )
        rows.append(row)
        outputs = _measure_row(row, images, how, proven.get(kind), trust_arch)
        if outputs is None:
            continue
        if labels is not None:
            row.accuracy = top1(outputs, labels, meta.output)
        if kind == "eager" and dev == "cpu":
            reference, ref_acc = outputs, row.accuracy
        if reference is not None:
            _compare(row, outputs, reference, ref_acc, meta.output)
        _cold_columns(row, how.image, how.threads, how.cold_starts)
        log(f"bench: {kind} on {_device_cell(row)}: {row.images_per_second:,.0f} img/s")
    return rows, reference


def _measure_row(
    row: BenchRow, images: np.ndarray, how: _Settings, data: bytes | None, trust_arch: str | None
) -> np.ndarray | None:
    """Load the row's artifact and fill its timing columns; its outputs, or None with `row.error` set."""
    try:
        t = time.perf_counter()
        runner, row.runtime = _load(
            row.artifact, row.path, row.device, how.threads, data=data, trust_arch=trust_arch, backend=row.backend
        )
        row.load_ms = round((time.perf_counter() - t) * 1e3, 2)
        m = _measure(runner, images, how.batch_size, how.latency_calls, how.sweep)
    except Exception as e:  # a row that fails is reported, the others still run
        row.error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log(f"bench: {row.artifact} on {_device_cell(row)}: {row.error}")
        return None
    p50, p95, p99 = np.percentile(m.latencies_ms, [50, 95, 99])
    row.cold_ms, row.images_per_second = round(m.cold_ms, 3), round(m.images_per_second, 1)
    row.p50_ms, row.p95_ms, row.p99_ms = round(float(p50), 4), round(float(p95), 4), round(float(p99), 4)
    row.latency_calls = len(m.latencies_ms)
    row.best_batch, row.best_images_per_second = m.best_batch, round(m.best_images_per_second, 1)
    return m.outputs


def _compare(row: BenchRow, outputs: np.ndarray, reference: np.ndarray, ref_acc: float | None, kind: str) -> None:
    """Fill the columns that compare a row's outputs with the eager reference's."""
    diff = np.abs(outputs.astype(np.float64) - reference)
    row.max_abs_diff = float("nan") if np.isnan(diff).any() else float(diff.max())
    same = predict(outputs, kind)[0] == predict(reference, kind)[0]
    row.argmax_agreement = float(same.mean())
    if row.accuracy is not None and ref_acc is not None:
        row.accuracy_change = round((row.accuracy - ref_acc) * 100, 4)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("cnnkit", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
