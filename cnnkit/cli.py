"""The `cnnkit` command line: thin typer functions over the library.

Each command parses, calls one library function and formats its result. Heavy imports (torch,
onnx) happen inside the commands that need them, so `cnnkit infer` starts without torch.
With `--json`, a command prints exactly one JSON object on stdout; everything for humans goes to
stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cnnkit.console import log, printable
from cnnkit.devices import DEVICE_HELP, parse_device
from cnnkit.errors import EXIT_FILES_FAILED, CnnkitError, DataError, DeviceError

app = typer.Typer(
    help="Train a small image CNN, export it with a parity gate, and classify folders of images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Get data as PNG folders: ROOT/training/<class>/*.png and ROOT/testing/<class>/*.png.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130


def _check_device(value: str) -> str:
    try:
        return str(parse_device(value))
    except DeviceError as e:
        raise typer.BadParameter(str(e)) from None


def _device_option(what: str) -> Any:
    return typer.Option(help=f"{DEVICE_HELP}. {what}", callback=_check_device)


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
    pt2 = "pt2"


class Exporter(str, Enum):
    dynamo = "dynamo"
    torchscript = "torchscript"


class Augment(str, Enum):
    none = "none"
    flip = "flip"
    shift = "shift"
    flip_shift = "flip+shift"


class Color(str, Enum):
    auto = "auto"
    gray = "gray"
    rgb = "rgb"


class Split(str, Enum):
    training = "training"
    testing = "testing"


# Bounds on sizes and counts, so that a mistyped number is a usage error rather than an overflow deep
# inside a library: a batch of 65,536 28x28 images is 51 MB; 1,024 processes or threads is past any machine.
MAX_BATCH = 1 << 16
MAX_PROCESSES = 1024

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (human output on stderr).")]


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stops_cleanly_on_sigterm() -> Iterator[None]:
    """SIGTERM (`kill`, a batch scheduler, `docker stop`) stops a command as Ctrl-C does: the
    exception unwinds through every `finally`, so temporary files and folders are removed, and the
    command exits 130 with one line. Its default action would end the process on the spot (exit 143),
    leaving them behind."""
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not the main thread (an embedding program): leave signals to it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reports_errors(fn: F) -> F:
    """Turn CnnkitError into one line on stderr and a non-zero exit, instead of a traceback; stop
    cleanly on Ctrl-C and SIGTERM (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _stops_cleanly_on_sigterm():
                return fn(*args, **kwargs)
        except CnnkitError as e:
            log(f"error: {printable(str(e))}")  # one line, whatever file or class name it quotes
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            log("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:  # a command's own exit (it has said why)
            raise
        except Exception as e:
            if not _interrupted(e):
                raise
            log("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _interrupted(e: BaseException) -> bool:
    """Whether a stop (Ctrl-C, SIGTERM) caused `e`: a library that catches the KeyboardInterrupt raises
    its own error from it (an extension module interrupted while it loads becomes an ImportError)."""
    seen = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return False


def _emit(obj: dict[str, Any], as_json: bool, human: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        sys.stdout.flush()
    if human:
        log(human)


def _parse_classes(classes: str | None) -> tuple[str, ...] | None:
    if classes is None:
        return None
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    if len(names) < 2:
        raise CnnkitError("--classes needs at least two comma-separated class names, e.g. --classes 0,1")
    return names


def _parse_size(size: str | None) -> tuple[int, int] | None:
    """`--size 64x48` -> (64, 48): height first, as everywhere in cnnkit."""
    if size is None:
        return None
    h, sep, w = size.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise typer.BadParameter(f"expected HxW, e.g. 28x28, got {size!r}", param_hint="--size")
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# train


TrainData = Annotated[
    Path | None,
    typer.Argument(
        help="Folder with training/ (and testing/), or class folders. Default: the bundled 5,000 MNIST digits."
    ),
]
TrainEpochs = Annotated[
    int | None,
    typer.Option(min=1, help="Default: the arch's (small 14, or more on small data to reach 900 steps; lecture 5)."),
]
TrainBatchSize = Annotated[
    int | None, typer.Option(min=1, max=MAX_BATCH, help="Global batch. Default: small 256, lecture 128.")
]
TrainArch = Annotated[
    str,
    typer.Option(
        help="small (default), wide (small with more channels), lecture (the lecture's exact network), or your "
        "own nn.Module as module.path:ClassName (docs/train.md). With --resume: repeat a run's own "
        "module.path:ClassName to allow importing it."
    ),
]
TrainLr = Annotated[
    float | None,
    typer.Option(help="Peak learning rate. Default: small 5e-3 (warm-up + cosine), lecture 1e-3 (constant)."),
]
TrainAugment = Annotated[
    Augment | None,
    typer.Option(
        help="Default: small shift, lecture none. flip: mirror half of each batch (clothes, not digits); "
        "shift: move each image by up to 2 pixels."
    ),
]
TrainValSplit = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=0.99,
        help=(
            "Hold out this stratified, seeded fraction of training for validation, which alone selects the "
            "checkpoint; testing/ is evaluated once, at the end. 0: train on all of it and keep the last epoch."
        ),
    ),
]
TrainColor = Annotated[
    Color, typer.Option(help="auto (RGB when the training images are in color), gray or rgb: the model's input mode.")
]
TrainSize = Annotated[
    str | None,
    typer.Option(
        metavar="HxW",
        help="Input size every image is resized to (bilinear, stretched). Default: the training images' "
        "common size, else 28x28.",
    ),
]
Workers = Annotated[
    int | None, typer.Option(min=0, max=MAX_PROCESSES, help="Image decoder processes. Default: one per core.")
]


@app.command()
@_reports_errors
def train(
    data: TrainData = None,
    out: Annotated[Path | None, typer.Option(help="Run folder. Default: runs/train-<time>.")] = None,
    epochs: TrainEpochs = None,
    batch_size: TrainBatchSize = None,
    arch: TrainArch = "small",
    lr: TrainLr = None,
    augment: TrainAugment = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class folder names, e.g. 0,1.")] = None,
    val_split: TrainValSplit = 0.1,
    device: Annotated[str, _device_option("Mixed precision on CUDA: bf16 where native, else fp16.")] = "auto",
    seed: int = 0,
    workers: Workers = None,
    color: TrainColor = Color.auto,
    size: TrainSize = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a CNN on a folder of images (class folders); write checkpoints, metrics.json and plots to a run folder."""
    from cnnkit.trainer.loop import Interrupted, TrainConfig, format_summary
    from cnnkit.trainer.loop import train as run_training

    cfg = TrainConfig(
        data=str(data) if data else None,
        out=str(out) if out else None,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment.value if augment else None,
        classes=_parse_classes(classes),
        val_split=val_split,
        device=device,
        seed=seed,
        workers=workers,
        color=color.value,
        size=_parse_size(size),
    )
    try:
        result = run_training(cfg, resume=str(resume) if resume else None)
    except Interrupted as e:
        log(f"error: {e}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    d = result.to_dict()
    if as_json:
        d = {k: v for k, v in d.items() if k != "history"}
    _emit(d, as_json, format_summary(result))


# --------------------------------------------------------------------------------------------
# export


class Quantize(str, Enum):
    int8 = "int8"


ExportData = Annotated[
    Path | None,
    typer.Option(
        help="Folder of class folders for the parity images (and the int8 accuracy gate). "
        "Default: the testing split the model was trained with."
    ),
]
ExportTolerance = Annotated[
    float | None, typer.Option(help="Parity gate: max abs difference allowed. Default: 1e-4 (fp32), 5e-2 (--half).")
]
ExportQuantize = Annotated[
    Quantize | None,
    typer.Option(help="ONNX: static INT8 quantization (QDQ, per-channel) -> model.int8.onnx, gated on test accuracy."),
]
ExportHalf = Annotated[
    bool,
    typer.Option(
        "--half",
        help="ONNX: float16 weights and math for the CUDA provider -> model.fp16.onnx (uint8 in, float32 out).",
    ),
]
ExportCalibration = Annotated[
    Path | None, typer.Option(help="INT8: folder of images to calibrate on. Default: the run's training data.")
]
ExportCalibrationSize = Annotated[int, typer.Option(min=1, help="INT8: calibration images (spread over the folder).")]
ExportMaxAccuracyDrop = Annotated[
    float, typer.Option(help="INT8: top-1 accuracy points the int8 file may lose against fp32 on the testing split.")
]
ExportDevice = Annotated[
    str,
    _device_option(
        "Where the --half gate runs (the other gates run on the CPU provider: their files are for any device)."
    ),
]
ExportStrict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="--half: fail (exit 3, nothing written) unless the fp16 file was verified on the CUDA provider.",
    ),
]
TrustArch = Annotated[
    str | None,
    typer.Option(
        "--trust-arch",
        metavar="MODULE:CLASS",
        help="Rebuild a checkpoint of this user arch (importing its module runs its code); it must be the "
        "checkpoint's own import string (docs/train.md).",
    ),
]
ExportBatch = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=4096,
        help="fp32 ONNX: fix the batch axis to N (NNAPI/CoreML need fixed shapes); "
        "written as model.bN.onnx beside the dynamic model.onnx.",
    ),
]
ExportFold = Annotated[
    bool,
    typer.Option(
        "--fold/--no-fold",
        help="ONNX: fold BatchNorm into the convolutions where exact (the gate compares with the unfolded model).",
    ),
]
ExportKeepPaths = Annotated[
    bool,
    typer.Option(
        "--keep-paths", help="Record the full paths of the training data in the artifact (default: folder names only)."
    ),
]


@app.command()
@_reports_errors
def export(
    checkpoint: Annotated[Path | None, typer.Argument(help="Default: runs/latest/best.pt.")] = None,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.onnx,
    out: Annotated[Path | None, typer.Option(help="Artifact path. Default: next to the checkpoint.")] = None,
    data: ExportData = None,
    exporter: Annotated[Exporter | None, typer.Option(help="ONNX exporter (recorded in the file).")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset. Default: the exporter's.")] = None,
    tolerance: ExportTolerance = None,
    quantize: ExportQuantize = None,
    half: ExportHalf = False,
    calibration: ExportCalibration = None,
    calibration_size: ExportCalibrationSize = 1024,
    max_accuracy_drop: ExportMaxAccuracyDrop = 0.5,
    device: ExportDevice = "auto",
    strict: ExportStrict = False,
    keep_paths: ExportKeepPaths = False,
    trust_arch: TrustArch = None,
    batch: ExportBatch = None,
    fold: ExportFold = True,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint to ONNX (fp32, int8, fp16), TorchScript or pt2; keep it only if it passes its gate."""
    from cnnkit.export import export as run_export

    kwargs: dict[str, Any] = {}
    if exporter is not None:
        kwargs["exporter"] = exporter.value
    result = run_export(
        checkpoint=str(checkpoint) if checkpoint else None,
        fmt=format.value,
        out=str(out) if out else None,
        data=str(data) if data else None,
        opset=opset,
        max_abs_tol=tolerance,
        quantize=quantize.value if quantize else None,
        half=half,
        calibration=str(calibration) if calibration else None,
        calibration_size=calibration_size,
        max_accuracy_drop=max_accuracy_drop,
        device=device,
        strict=strict,
        keep_paths=keep_paths,
        trust_arch=trust_arch,
        batch=batch,
        fold=fold,
        **kwargs,
    )
    _emit(result.to_dict(), as_json)  # the library has logged each step, its warnings and gates, once


@app.command()
@_reports_errors
def diff(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint the artifact was exported from (best.pt).")],
    artifact: Annotated[
        Path, typer.Argument(help="model.onnx, model.int8.onnx, model.fp16.onnx, model.ts or model.pt2.")
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="Folder of images to run. Default: the testing split the model was trained with."),
    ] = None,
    images: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="How many images (spread over the folder).")] = 64,
    trust_model: Annotated[
        bool,
        typer.Option("--trust-model", help="Also load a .ts / .pt2 cnnkit cannot prove it wrote (it can run code)."),
    ] = False,
    trust_arch: TrustArch = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare an artifact with its eager model layer by layer and name the first layer out of tolerance."""
    from cnnkit.export.diff import diff as run_diff
    from cnnkit.export.diff import format_table

    result = run_diff(
        str(checkpoint),
        str(artifact),
        str(data) if data else None,
        images,
        trust_arch=trust_arch,
        trust_model=trust_model,
    )
    _emit(result.to_dict(), as_json, format_table(result))


# --------------------------------------------------------------------------------------------
# infer


INFER_MODEL_HELP = (
    "ONNX model, or a run folder (its model.onnx / model.int8.onnx / model.fp16.onnx, chosen by --precision). "
    "Default: runs/latest/model.onnx."
)
PRECISION_HELP = (
    "With a run folder as --model: auto (the default there: int8 where the run measured it faster on this CPU's "
    "instruction-set class, fp16 on CUDA, else fp32), fp32, int8 or fp16. Without --model: the run runs/latest."
)


InferFolder = Annotated[
    Path, typer.Argument(help="Folder of images: PNG, JPEG, WebP, BMP, TIFF, GIF (searched recursively).")
]
InferOutput = Annotated[
    Path | None, typer.Option(help="CSV of predictions. Default: predictions.csv next to the model.")
]
InferShard = Annotated[
    str | None,
    typer.Option(
        help="K/N: only shard K (0..N-1) of N, by a hash of each file's path; output "
        "predictions.shard-K-of-N.csv + .json, combined by `cnnkit merge`."
    ),
]
InferStrict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Stop at the first file that cannot be used (exit 4, nothing written) instead of listing it "
        "in <output>.failures.csv.",
    ),
]
InferBackend = Annotated[
    str,
    typer.Option(
        help="onnxruntime or openvino (CPU; pip install 'cnnkit[openvino]'). OpenVINO's first run on a "
        "model file is checked against onnxruntime and refused (exit 3) if they disagree."
    ),
]


@app.command()
@_reports_errors
def infer(
    folder: InferFolder,
    model: Annotated[Path | None, typer.Option(help=INFER_MODEL_HELP)] = None,
    device: Annotated[str, _device_option("cuda[:N] fails if its provider does not load.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH)] = 256,
    output: InferOutput = None,
    workers: Workers = None,
    shard: InferShard = None,
    strict: InferStrict = False,
    backend: InferBackend = "onnxruntime",
    precision: Annotated[str | None, typer.Option(help=PRECISION_HELP)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify every image under FOLDER with ONNX Runtime (or OpenVINO); write a CSV and print a summary.

    Exit status: 0 every file predicted; 3 --backend openvino does not agree with onnxruntime on this
    model; 4 some files could not be used (listed in <output>.failures.csv; the rest predicted), or
    with --strict the run stopped at the first one.
    """
    from cnnkit.runtime.infer import format_summary
    from cnnkit.runtime.infer import infer as run_infer
    from cnnkit.runtime.shard import parse_shard

    picked = parse_shard(shard) if shard is not None else None  # a bad value fails before any work
    result = run_infer(
        str(folder),
        model=str(model) if model else None,
        device=device,
        batch_size=batch_size,
        output=str(output) if output else None,
        workers=workers,
        shard=picked,
        strict=strict,
        backend=backend,
        precision=precision,
    )
    _emit(result.to_dict(), as_json, format_summary(result))
    if result.n_failed:
        raise typer.Exit(EXIT_FILES_FAILED)


@app.command()
@_reports_errors
def merge(
    shards: Annotated[
        list[Path],
        typer.Argument(help="CSVs of `cnnkit infer --shard K/N` runs, each with its .json summary next to it."),
    ],
    output: Annotated[Path, typer.Option(help="The merged CSV; its summary goes to <output>.json.")],
    check_folder: Annotated[
        bool,
        typer.Option("--check-folder", help="Walk the folder again and list its files that are in no shard's output."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge sharded `cnnkit infer` outputs into one CSV (byte for byte an unsharded run's) and summary.

    Exit status: 0 complete; 1 shards missing, files in two shards or (--check-folder) in none; 4
    complete but some files could not be used (listed in <output>.failures.csv), as `infer`.
    """
    from cnnkit.runtime.shard import format_merge
    from cnnkit.runtime.shard import merge as run_merge

    result = run_merge([str(p) for p in shards], str(output), check_folder=check_folder)
    _emit(result.to_dict(), as_json, format_merge(result))
    if not result.complete:
        raise typer.Exit(1)
    if result.n_failed:
        raise typer.Exit(EXIT_FILES_FAILED)


# --------------------------------------------------------------------------------------------
# bench, doctor


LatencyCalls = Annotated[
    int, typer.Option(min=1, help="Timed batch-1 calls per row behind p50/p95/p99 (after 10 warm-up calls).")
]
ThroughputBatches = Annotated[
    str, typer.Option(help="Batch sizes tried beside --batch-size for the best-batch column, e.g. 8,32,1024.")
]
ColdStarts = Annotated[
    int,
    typer.Option(
        min=0, help="Fresh processes per ONNX row timed from spawn to first prediction (and peak memory); 0: none."
    ),
]


def _parse_batches(text: str) -> tuple[int, ...]:
    """`8,32,1024` -> (8, 32, 1024); an empty string -> ()."""
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise DataError(f"--throughput-batches: expected batch sizes like 8,32,1024, got {text!r}") from None
    if any(not 1 <= b <= MAX_BATCH for b in sizes):
        raise DataError(f"--throughput-batches: each batch size must be 1..{MAX_BATCH}, got {text!r}")
    return sizes


@app.command()
@_reports_errors
def bench(
    data: Annotated[
        Path | None,
        typer.Argument(help="Folder of images (class folders give accuracy). Default: the run's testing split."),
    ] = None,
    run: Annotated[Path | None, typer.Option(help="Run folder. Default: runs/latest.")] = None,
    device: Annotated[str, _device_option("auto: every device that works here.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Batch size of the throughput column.")] = 256,
    limit: Annotated[int, typer.Option(min=1, help="At most this many images (spread over the folder).")] = 10_000,
    threads: Annotated[
        int, typer.Option(min=1, max=MAX_PROCESSES, help="Intra-op threads for every runtime (CPU).")
    ] = 1,
    trust_model: Annotated[
        bool,
        typer.Option(
            "--trust-model",
            help=("Also load .ts / .pt2 files that cnnkit cannot prove it wrote (loading them can run code)."),
        ),
    ] = False,
    trust_arch: TrustArch = None,
    latency_calls: LatencyCalls = 200,
    throughput_batches: ThroughputBatches = "32",
    cold_starts: ColdStarts = 1,
    as_json: JsonOpt = False,
) -> None:
    """Benchmark every artifact of a run on every usable device: size, accuracy, parity, latency, speed."""
    from cnnkit.bench import bench as run_bench
    from cnnkit.bench import format_table

    result = run_bench(
        str(data) if data else None,
        run=str(run) if run else None,
        device=device,
        batch_size=batch_size,
        limit=limit,
        threads=threads,
        trust_model=trust_model,
        trust_arch=trust_arch,
        latency_calls=latency_calls,
        throughput_batches=_parse_batches(throughput_batches),
        cold_starts=cold_starts,
    )
    _emit(result.to_dict(), as_json, format_table(result))


@app.command()
@_reports_errors
def report(
    run: Annotated[Path | None, typer.Argument(help="Run folder. Default: runs/latest.")] = None,
    bench_file: Annotated[
        Path | None,
        typer.Option(
            "--bench", help="A saved `cnnkit bench --json` output for the benchmark matrix (else bench runs)."
        ),
    ] = None,
    no_bench: Annotated[bool, typer.Option("--no-bench", help="No benchmark: the matrix section says so.")] = False,
    device: Annotated[str, _device_option("For the bench it runs; auto: every device that works here.")] = "auto",
    limit: Annotated[int, typer.Option(min=1, help="At most this many images for the bench it runs.")] = 10_000,
    trust_model: Annotated[
        bool, typer.Option("--trust-model", help="As `cnnkit bench --trust-model` (loading .ts / .pt2 can run code).")
    ] = False,
    trust_arch: TrustArch = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the run's model card into the run folder: report.html (self-contained) and report.md."""
    from cnnkit.report import report as write_report

    if bench_file is not None and no_bench:
        raise DataError("--bench and --no-bench contradict each other: give one")
    result = write_report(
        str(run) if run else None,
        bench_file=str(bench_file) if bench_file else None,
        run_bench=not no_bench,
        bench_options={"device": device, "limit": limit, "trust_model": trust_model, "trust_arch": trust_arch},
    )
    _emit(result.to_dict(), as_json, "\n".join(f"report: note: {n}" for n in result.notes) or None)


@app.command()
@_reports_errors
def doctor(as_json: JsonOpt = False) -> None:
    """Check the onnxruntime install, its providers, CUDA versions and the GPU; exit 1 on a problem."""
    from cnnkit.doctor import doctor as run_doctor
    from cnnkit.doctor import format_report

    report = run_doctor()
    _emit(report.to_dict(), as_json, format_report(report))
    if not report.healthy:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# data


@data_app.command("sample")
@_reports_errors
def data_sample(
    out: Annotated[Path, typer.Option(help="Where to write the PNG tree.")] = Path("data/mnist-sample"),
    overwrite: bool = False,
) -> None:
    """Write the bundled 5,000 MNIST digits (400 training + 100 testing per digit) as PNGs."""
    from cnnkit.datasets.sample import write_sample

    splits = write_sample(str(out), overwrite=overwrite)
    log(f"wrote {splits.train} and {splits.test}")


@data_app.command("mnist")
@_reports_errors
def data_mnist(
    out: Annotated[Path, typer.Option(help="Where to put training/ and testing/.")] = Path("data/mnist_png"),
    url: Annotated[str | None, typer.Option(help="Archive URL (a mirror of mnist_png.tgz).")] = None,
) -> None:
    """Download the lecture's MNIST PNG archive (70,000 digits), verify it and unpack it safely."""
    from cnnkit.datasets.mnist import MNIST_URL, fetch_mnist

    splits = fetch_mnist(str(out), url=url or MNIST_URL)
    log(f"MNIST ready: {splits.train} and {splits.test}")


@data_app.command("idx")
@_reports_errors
def data_idx(
    images: Annotated[Path, typer.Argument(help="IDX images file (.gz or raw).")],
    labels: Annotated[Path, typer.Argument(help="IDX labels file (.gz or raw).")],
    out: Annotated[Path, typer.Option(help="Root folder of the PNG tree.")],
    split: Annotated[Split, typer.Option(help="Which split these files are.")],
    names: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated class names for labels 0..K-1 "
            "(or 'fashion' for Fashion-MNIST's). Default: the label numbers."
        ),
    ] = None,
) -> None:
    """Convert IDX files (the MNIST / Fashion-MNIST format) to ROOT/<split>/<class>/*.png."""
    from cnnkit.datasets.idx import FASHION_MNIST_CLASSES, idx_to_tree

    class_names: tuple[str, ...] | None = None
    if names == "fashion":
        class_names = tuple(FASHION_MNIST_CLASSES)
    elif names:
        class_names = tuple(n.strip() for n in names.split(","))
    n = idx_to_tree(str(images), str(labels), str(out), split.value, class_names=class_names)
    log(f"wrote {n:,} images to {out}/{split.value}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
