"""The export pipeline behind `cnnkit.export.export` and `export_module`: check the options, get the
model and its record (from a checkpoint, or from a trained module and a folder of images), write the
artifact to a temporary file, gate that file, and only then put it and its report in place. Both
entry points share everything after "model and record are known" (`_export_loaded`).

The package docstring (`cnnkit.export`) describes the gates; the per-format writers are
`cnnkit.export.onnx`, `.torchscript`, `.pt2` and `.quantize`, and the gate itself is `.parity`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from cnnkit.batches import class_names, input_shape, load_images, sample_folder
from cnnkit.console import log
from cnnkit.devices import DeviceSpec, parse_device
from cnnkit.errors import CnnkitError, DataError, DeviceError, ModelError, ParityError
from cnnkit.export.onnx import DEFAULT_EXPORTER, check_options
from cnnkit.export.parity import TIERS, ParityReport, run_parity
from cnnkit.export.quantize import DEFAULT_CALIBRATION_SIZE, DEFAULT_EVAL_LIMIT, DEFAULT_MAX_ACCURACY_DROP
from cnnkit.files import atomic_path, check_not_an_input, check_outside, check_writable, write_json
from cnnkit.listing import class_of, list_pngs
from cnnkit.meta import OUTPUT_LOGITS, ModelMeta, int8_speed
from cnnkit.provenance import check_key, record
from cnnkit.runs import ARTIFACT_NAMES, BEST_NAME, CHECKPOINT_NAME, REPORT_SUFFIX, fixed_batch_name, latest_file
from cnnkit.runtime.session import read_meta
from cnnkit.version import __version__

FORMATS = ("onnx", "torchscript", "pt2")
QUANTIZE = ("int8",)
# Artifact kind -> default file name in the run folder (`cnnkit bench` looks for these).
NOT_VERIFIED = "not verified here: no CUDA provider"
NOT_ON_TARGET = "not verified on its target device (CUDA)"


@dataclass
class ExportResult:
    """What `export()` wrote.

    Attributes:
        format: `onnx`, `torchscript` or `pt2`.
        path: the artifact.
        exporter: `dynamo` / `torchscript` for ONNX, `torch.jit.trace`, `torch.export`.
        parity: the gate's numbers. For INT8, the fp32 graph it was quantized from (the INT8 file is
            gated by `accuracy`); for FP16, the fp16 file; None when FP16 parity could not run here.
        report_path: the JSON report next to the artifact.
        seconds: wall time of the whole export, parity included.
        opset: the ONNX opset (None for TorchScript and pt2).
        checkpoint: the checkpoint exported.
        data: the folder the parity images came from.
        info: the exporter's own details (sizes, shapes, export seconds; quantization details).
        precision: `fp32`, `int8` or `fp16`.
        verified: the gate ran on the device the file is for. False only for an FP16 file not run on
            the CUDA provider (see `verified_on` and `notes`).
        verified_on: where the gate ran: `cpu` (fp32 and INT8 files, which are for any provider), `cuda:N`,
            or None for an FP16 file nothing here could run.
        accuracy: INT8 only: the accuracy gate (`cnnkit.export.quantize.AccuracyGate.to_dict()`).
        int8_speed: INT8 only: what the file records for `cnnkit infer --precision auto`
            (`{"int8_speedup", "isa_class", "cpu", "threads"}`, `cnnkit.meta.int8_speed`); else None.
        notes: remarks for the user (where a gate ran, what it could not check).
        batch: ONNX: the fixed batch size of the graph (`batch=N`), None for a dynamic batch axis.
        fold: ONNX: BatchNorm folded into convolutions before export (`cnnkit.export.fold`):
            {"folded": [...], "unfolded": [{"layer", "why"}]}; None with `fold=False` and other formats.
        mobile: ONNX: onnxruntime's mobile usability verdict on the file (`cnnkit.export.mobile`).
    """

    format: str
    path: str
    exporter: str
    parity: ParityReport | None
    report_path: str
    seconds: float
    opset: int | None
    checkpoint: str = ""
    data: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    verified: bool = True
    verified_on: str | None = "cpu"
    accuracy: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    batch: int | None = None
    fold: dict[str, Any] | None = None
    mobile: dict[str, Any] | None = None
    int8_speed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gate_device(device: str, precision: str) -> DeviceSpec:
    """Where the fp16 gate may run; a GPU asked for any other precision is an error (those gates run on
    the CPU provider against the CPU reference)."""
    spec = parse_device(device)
    if spec.kind == "cuda" and precision != "fp16":
        raise DeviceError(
            f"--device {spec}: only the --half gate runs on a GPU; {precision} files are gated on "
            "the CPU provider against the CPU reference (leave --device out)"
        )
    return spec


def _precision(fmt: str, quantize: str | None, half: bool) -> str:
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ModelError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZE)}")
    if (quantize or half) and fmt != "onnx":
        raise ModelError("--quantize and --half apply to --format onnx only")
    if quantize and half:
        raise ModelError("choose one of --quantize int8 and --half")
    return "int8" if quantize else "fp16" if half else "fp32"


def export(
    checkpoint: str | None = None,
    fmt: str = "onnx",
    out: str | None = None,
    data: str | None = None,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    max_abs_tol: float | None = None,
    n_images: int = 512,
    *,
    quantize: str | None = None,
    half: bool = False,
    calibration: str | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    eval_limit: int = DEFAULT_EVAL_LIMIT,
    device: str = "auto",
    strict: bool = False,
    keep_paths: bool = False,
    trust_arch: str | None = None,
    batch: int | None = None,
    fold: bool = True,
) -> ExportResult:
    """Export a checkpoint and keep the artifact only if it passes its gate against the eager model.

    The options are `cnnkit export`'s (docs/export.md): `fmt` onnx, torchscript or pt2; `out` a path or
    folder; `data` the parity (and INT8 accuracy) images; `max_abs_tol`, `n_images` the gate; ONNX:
    `exporter`, `opset`, `batch`, `fold`; INT8 (`quantize="int8"`): `calibration`, `calibration_size`,
    `max_accuracy_drop`, `eval_limit`; FP16 (`half`): `device`, `strict`; `keep_paths` full data paths
    in the artifact; `trust_arch` the import string a user-arch checkpoint must name (SECURITY.md).
    Returns the result (`result.to_dict()` is the CLI's JSON). Raises ModelError (checkpoint, options,
    an untrusted user arch), DataError (no usable images), ParityError (the gate failed: nothing was
    written) or DeviceError (an unknown device, or FP16 on `cuda[:N]` without a CUDA provider).
    """
    t0 = time.perf_counter()
    precision, spec, tol, opset = _check_options(fmt, quantize, half, device, exporter, opset, max_abs_tol)
    settings = _Settings(
        fmt,
        precision,
        spec,
        tol,
        opset,
        exporter,
        n_images,
        strict=strict,
        keep_paths=keep_paths,
        calibration=calibration,
        calibration_size=calibration_size,
        max_accuracy_drop=max_accuracy_drop,
        eval_limit=eval_limit,
        batch=batch,
        fold=fold,
    )
    checkpoint, model, meta = _load_checkpoint(checkpoint, trust_arch)
    out = _resolve_out(out, checkpoint, fmt if precision == "fp32" else f"onnx-{precision}", batch)
    return _export_loaded(model, meta, checkpoint, checkpoint, out, data, settings, t0)


def export_module(
    module: Any,
    *,
    data: str,
    out: str,
    formats: tuple[str, ...] | list[str] = ("onnx",),
    classes: tuple[str, ...] | list[str] | None = None,
    color: str = "auto",
    size: tuple[int, int] | None = None,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    max_abs_tol: float | None = None,
    n_images: int = 512,
    keep_paths: bool = False,
) -> list[ExportResult]:
    """Export an already-trained `nn.Module` without a cnnkit checkpoint, through the same gates.

    `module` maps float32 (N, C, H, W) in [0, 1] to logits (N, K), like a `--arch module.path:ClassName`
    network; cnnkit wraps a copy of it (in eval mode, float32, on the CPU; `module` itself is left alone)
    in `cnnkit.models.Classifier`, so the artifact takes uint8 as every cnnkit model does. A
    `Classifier` is taken as it is. The record gets `arch` = the network's import string
    (`type(net).__module__:type(net).__qualname__`), output `logits`, and the data folder's name.

    Args:
        module: the trained network (or a `Classifier`).
        data: a folder of class folders (`DIR/<class>/*.png`): the classes, the input shape, and the
            parity gate's real images come from it.
        out: the folder the artifacts go into, named `ARTIFACT_NAMES` (`model.onnx`, `model.ts`, ...).
        formats: any of `FORMATS` (fp32; INT8 and FP16 need `export` and a checkpoint).
        classes: class names in output order (default: `data`'s class folders, sorted).
        color, size: the input mode and size, as `cnnkit train --color/--size`: `auto` / None probe up
            to 64 images of `data` (`cnnkit.batches.input_shape`).
        exporter, opset, max_abs_tol, n_images, keep_paths: as for `export`.

    Returns:
        One `ExportResult` per format, in the order given (`checkpoint` is "").

    Raises:
        ModelError: not an nn.Module, fewer than two classes, wrong output on a probe batch, bad options.
        DataError: no such folder, no PNGs in its class folders.
        ParityError: an artifact does not answer like the module; that one was not written.
    """
    checked = {fmt: _check_options(fmt, None, False, "cpu", exporter, opset, max_abs_tol) for fmt in formats}
    if n_images < 1 or not checked:
        raise CnnkitError(f"export_module needs n_images >= 1 and a format, got {n_images} and {list(formats)}")
    outs = {fmt: _resolve_out(os.path.join(out, ""), "", fmt) for fmt in checked}
    model, meta = _module_record(module, data, classes, color, size)
    results = []
    for fmt, (precision, spec, tol, fmt_opset) in checked.items():
        settings = _Settings(fmt, precision, spec, tol, fmt_opset, exporter, n_images, keep_paths=keep_paths)
        source = f"module {meta.arch}"
        results.append(_export_loaded(model, meta, "", source, outs[fmt], data, settings, time.perf_counter()))
    return results


def _module_record(
    module: Any, data: str, classes: Any, color: str, size: tuple[int, int] | None
) -> tuple[Any, ModelMeta]:
    """(the eval-mode `Classifier` to export, its record) for `export_module`, the input shape probed
    from `data` as training probes it, the network checked on a probe batch (`checked_classifier`)."""
    import copy

    import torch

    from cnnkit.models import Classifier, checked_classifier

    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"export_module takes a torch.nn.Module, got {type(module).__name__}")
    net = module.net if isinstance(module, Classifier) else module
    arch = f"{type(net).__module__}:{type(net).__qualname__}"
    names = tuple(classes) if classes else tuple(class_names(data))
    if len(names) < 2:
        raise ModelError(f"a classifier needs at least two classes, got {len(names)} ({', '.join(names)})")
    files = [f for f in list_pngs(data).files if class_of(f) in set(names)]
    if not files:
        raise DataError(
            f"{data}: no PNG images in the class folders {', '.join(names[:5])}; expected {data}/<class>/*.png"
        )
    shape = input_shape(data, files, color, size)
    model = checked_classifier(copy.deepcopy(net).float().cpu(), arch, len(names), shape).eval()
    meta = ModelMeta(
        arch=arch,
        classes=names,
        input_shape=shape,
        output=OUTPUT_LOGITS,
        color="RGB" if shape[0] == 3 else "L",
        versions={"cnnkit": __version__, "torch": str(torch.__version__)},
        extra={"data": {"root": data}},
    )
    meta.validate()
    log(f"export: module {arch}: {len(names)} classes, input {'x'.join(map(str, shape))}, logits output")
    return model, meta


@dataclass(frozen=True)
class _Settings:
    """An export's options, checked (`_check_options`): what `_export_loaded` needs beside the model."""

    fmt: str
    precision: str
    spec: DeviceSpec
    tol: float
    opset: int | None
    exporter: str
    n_images: int
    strict: bool = False
    keep_paths: bool = False
    calibration: str | None = None  # INT8 only, from here on
    calibration_size: int = DEFAULT_CALIBRATION_SIZE
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    eval_limit: int = DEFAULT_EVAL_LIMIT
    batch: int | None = None  # fp32 ONNX: a fixed batch axis
    fold: bool = True  # ONNX: fold BatchNorm into convolutions (`cnnkit.export.fold`)

    def __post_init__(self) -> None:
        """Refuse, before any work, what `_check_options` does not check: the counts and the fixed batch."""
        if self.n_images < 1:
            raise CnnkitError(f"n_images must be at least 1, got {self.n_images}")
        _check_batch(self.batch, self.fmt, self.precision)
        if self.precision == "int8":
            from cnnkit.export.quantize import check_options as check_int8

            check_int8(self.calibration_size, self.max_accuracy_drop, self.eval_limit)


def _check_batch(batch: int | None, fmt: str, precision: str) -> None:
    """A fixed batch is for fp32 ONNX (what NNAPI and CoreML load), from 1 to the runtime's limit."""
    from cnnkit.runtime.session import MAX_FIXED_BATCH

    if batch is None:
        return
    if fmt != "onnx" or precision != "fp32":
        raise ModelError("--batch applies to fp32 --format onnx only (not --quantize, --half or other formats)")
    if not 1 <= batch <= MAX_FIXED_BATCH:
        raise ModelError(f"--batch must be 1 to {MAX_FIXED_BATCH}, got {batch}")


def _export_loaded(
    model: Any, meta: ModelMeta, checkpoint: str, source: str, out: str, data: str | None, s: _Settings, t0: float
) -> ExportResult:
    """The path `export` and `export_module` share once the eager model and its record are known: read
    the gate's images, write the artifact and gate it, record it in the manifest and write its report.

    `checkpoint`: the file exported ("" for a module); `source`: what the messages call it.
    """
    data_dir = _data_for(data, meta, source, out)
    images = sample_images(data_dir, meta, s.n_images)
    # INT8 inputs are read before any export work: a missing folder fails in a second, not a minute.
    int8_inputs = (
        _int8_inputs(data, s.calibration, s.calibration_size, s.eval_limit, meta, source)
        if s.precision == "int8"
        else None
    )

    from cnnkit.export.fold import fold_batchnorm
    from cnnkit.export.parity import torch_runner

    shipped, ship = _shipping(meta, s.keep_paths)  # what the artifact may tell about this machine
    folded, fold_info = fold_batchnorm(model) if s.fmt == "onnx" and s.fold else (model, None)
    if fold_info is not None:
        log(f"export: BatchNorm folded into convolutions: {_fold_summary(fold_info)}")
        shipped = shipped.replace(extra={**shipped.extra, "fold": fold_info})  # `cnnkit diff` folds alike
    job = _Job(
        checkpoint=checkpoint,
        source=source,
        fmt=s.fmt,
        precision=s.precision,
        model=folded,
        meta=shipped,
        reference=torch_runner(model),  # the unfolded eager model: the gate checks the folding too
        images=images,
        exporter=s.exporter,
        opset=s.opset,
        tol=s.tol,
        spec=s.spec,
        strict=s.strict,
        int8_inputs=int8_inputs,
        max_accuracy_drop=s.max_accuracy_drop,
        ship=ship,
        batch=s.batch,
        fold=fold_info,
    )
    gated = _write_and_gate(job, out)
    return _write_report(job, gated, out, data_dir, meta, t0)  # the report keeps full paths: it stays here


@dataclass(frozen=True)
class _Job:
    """One export, its options checked and its inputs loaded (what `_write_and_gate` needs)."""

    checkpoint: str  # the checkpoint exported; "" for `export_module`
    source: str  # what messages call the model: the checkpoint's path, or `module <arch>`
    fmt: str
    precision: str
    model: Any  # the eager model, float32 on the CPU
    meta: ModelMeta  # the record the artifact carries (`shipped_meta`)
    reference: Any  # the parity runner over `model`
    images: np.ndarray  # the parity images
    exporter: str
    opset: int | None
    tol: float
    spec: DeviceSpec
    strict: bool
    int8_inputs: tuple[np.ndarray, str, np.ndarray, np.ndarray, str] | None
    max_accuracy_drop: float
    ship: Callable[[Any], Any]  # a path as the artifact records it (`shipped_path`)
    batch: int | None = None  # fp32 ONNX: the fixed batch axis
    fold: dict[str, Any] | None = None  # what `fold_batchnorm` folded into `model`, None if not asked


@dataclass
class _Gated:
    """What a passed gate hands to the report: the file's details and the gate's numbers."""

    info: dict[str, Any]
    report: ParityReport | None
    exporter: str
    accuracy: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    verified_on: str | None = "cpu"
    mobile: dict[str, Any] | None = None


def _check_options(
    fmt: str, quantize: str | None, half: bool, device: str, exporter: str, opset: int | None, tol: float | None
) -> tuple[str, DeviceSpec, float, int | None]:
    """Refuse bad options before the checkpoint is read: (precision, gate device, tolerance, opset)."""
    precision = _precision(fmt, quantize, half)
    spec = _gate_device(device, precision)
    tier = TIERS["fp16" if precision == "fp16" else "fp32"]
    tol = tier.max_abs if tol is None else tol
    if fmt == "onnx":
        opset = check_options(exporter, opset)
    elif opset is not None:
        log(f"export: --opset applies to ONNX only; ignored for {fmt}")
    if not tol >= 0:  # also refuses NaN
        raise CnnkitError(f"the parity tolerance must be a number >= 0, got {tol}")
    return precision, spec, tol, opset


def _load_checkpoint(checkpoint: str | None, trust_arch: str | None = None) -> tuple[str, Any, ModelMeta]:
    """(the checkpoint's path, its eager model, its record); `runs/latest/best.pt` by default. A user
    arch is rebuilt only when `trust_arch` names it (`cnnkit.checkpoint.model_from_checkpoint`)."""
    from cnnkit.checkpoint import model_from_checkpoint  # imports torch: not at module level

    if checkpoint is None:
        checkpoint = latest_file(BEST_NAME, hint="train a model first (`cnnkit train`) or pass --checkpoint PATH")
    model, meta, _ = model_from_checkpoint(checkpoint, trust_arch)
    c, h, w = meta.input_shape
    log(f"export: {checkpoint}: arch {meta.arch}, {meta.num_classes} classes, input {c}x{h}x{w}, {meta.output} output")
    return checkpoint, model, meta


def _shipping(meta: ModelMeta, keep_paths: bool) -> tuple[ModelMeta, Callable[[Any], Any]]:
    """(the record the artifact carries, how the artifact records a path): `shipped_meta`, `shipped_path`."""
    recorded = meta.extra.get("data")
    root = recorded.get("root") if isinstance(recorded, dict) else None
    return shipped_meta(meta, keep_paths), functools.partial(shipped_path, root=root, keep=keep_paths)


def _write_and_gate(job: _Job, out: str) -> _Gated:
    """Write the artifact to a temporary file beside `out` and gate that file; only a file that
    passes is renamed onto `out` (`atomic_path` removes the others)."""
    try:
        with atomic_path(out) as tmp:
            try:
                gated = _export_fp32(job, tmp) if job.precision == "fp32" else _export_from_fp32_graph(job, tmp)
            except ParityError as e:
                if job.fmt != "onnx" or e.diff is not None or not (os.path.isfile(tmp) and os.path.getsize(tmp)):
                    raise
                raise located(e, job.model, tmp, job.images) from None
            if job.fmt == "onnx":
                from cnnkit.export.mobile import mobile_verdict, summary

                gated.mobile = mobile_verdict(tmp)
                log(f"export: {summary(gated.mobile)}")
            return gated
    except PermissionError as e:  # an exporter's own write (atomic_path reports the rest)
        raise ModelError(f"cannot write {out}: {e.strerror or e}; pass another --out") from None


def _export_fp32(job: _Job, tmp: str) -> _Gated:
    """An fp32 ONNX, TorchScript or pt2 file at `tmp`, gated against the eager model."""
    info, candidate = _export_to(tmp, job.model, job.meta, job.fmt, job.exporter, job.opset, job.batch)
    used_exporter = info["exporter"]
    how = f"{used_exporter}, opset {job.opset}" if job.fmt == "onnx" else used_exporter
    if job.batch is not None:
        how += f", fixed batch {job.batch}"
    log(f"export: {job.fmt} via {how} in {info['seconds']:.2f} s")
    # A fixed-batch file runs at its own batch size only (the runner pads the last, partial batch).
    sizes = {} if job.batch is None else {"batch_sizes": (job.batch,)}
    report = run_parity(job.reference, candidate, job.images, job.meta.output, job.tol, **sizes)
    log(f"export: {report.summary()}")
    if not report.passed:  # atomic_path removes the temporary file
        raise ParityError(f"{job.fmt} export of {job.source} ({how}): {report.summary()}; nothing was written")
    return _Gated(info, report, used_exporter)


def _export_from_fp32_graph(job: _Job, tmp: str) -> _Gated:
    """An INT8 or FP16 ONNX file at `tmp`, made from a gated fp32 graph in a work folder beside it."""
    with tempfile.TemporaryDirectory(prefix=".cnnkit-export-", dir=os.path.dirname(tmp)) as work:
        fp32 = os.path.join(work, "model.fp32.onnx")
        base_tol = job.tol if job.precision == "int8" else TIERS["fp32"].max_abs
        base_info, base = _fp32_base(
            fp32, job.model, job.meta, job.exporter, job.opset, job.images, base_tol, job.source, job.reference
        )
        used_exporter = base_info["exporter"]
        if job.precision == "int8":
            assert job.int8_inputs is not None
            info, accuracy = _int8(
                fp32, tmp, job.meta, job.source, *job.int8_inputs, job.max_accuracy_drop, ship=job.ship
            )
            gated = _Gated(info, base, used_exporter, accuracy=accuracy)
        else:
            info, report, notes, verified_on = _fp16(
                fp32, tmp, job.meta, job.source, job.reference, job.images, job.tol, job.spec
            )
            if job.strict and not (verified_on or "").startswith("cuda"):
                raise ParityError(
                    f"fp16 export of {job.source}: {NOT_ON_TARGET} and --strict is set; "
                    f"nothing was written ({'; '.join(notes)})"
                )
            gated = _Gated(info, report, used_exporter, notes=notes, verified_on=verified_on)
        gated.info = {**gated.info, "exporter": used_exporter, "fp32": base_info}
    return gated


def _write_report(job: _Job, gated: _Gated, out: str, data_dir: str, local_meta: ModelMeta, t0: float) -> ExportResult:
    """Record the artifact in the manifest and write its report beside it (full paths: it stays here)."""
    report, precision, verified_on = gated.report, job.precision, gated.verified_on
    result = ExportResult(
        format=job.fmt,
        path=out,
        exporter=gated.exporter,
        parity=report,
        report_path=out + REPORT_SUFFIX,
        seconds=0.0,
        opset=gated.info.get("opset", job.opset) if job.fmt == "onnx" else None,
        checkpoint=job.checkpoint,
        data=data_dir,
        info=gated.info,
        precision=precision,
        verified=report is not None and (precision != "fp16" or (verified_on or "").startswith("cuda")),
        verified_on=verified_on if report is not None else None,
        accuracy=gated.accuracy,
        notes=gated.notes,
        batch=job.batch,
        fold=job.fold,
        mobile=gated.mobile,
        int8_speed=int8_speed(read_meta(out)) if precision == "int8" else None,
    )
    # Lets `cnnkit bench` load a .ts / .pt2 it can prove cnnkit wrote (cnnkit.provenance): the hash of
    # the bytes the gate loaded, not of whatever is at `out` by now.
    record(out, digest=gated.info.get("sha256"))
    result.seconds = round(time.perf_counter() - t0, 3)
    write_json(result.report_path, {**result.to_dict(), "meta": local_meta.to_dict()})  # stays on this machine
    log(f"export: wrote {out} ({gated.info['bytes']:,} bytes) and {result.report_path}")
    return result


def _fold_summary(info: dict[str, Any]) -> str:
    """`net.2, net.6 folded; net.9 left (why)` for the log."""
    done = f"{', '.join(info['folded'])} folded" if info["folded"] else "nothing folded"
    left = "; ".join(f"{u['layer']} left in place: {u['why']}" for u in info["unfolded"])
    return f"{done}; {left}" if left else done


DATA_PATH_KEYS = ("root", "train", "test")  # the folders `extra["data"]` records (cnnkit.trainer.loop)


def shipped_path(path: Any, root: str | None, keep: bool = False) -> Any:
    """`path` as an artifact records it: relative to the data root's parent (`fashion/training`), or
    its last folder name when outside the root, so a shipped model does not reveal a user's home
    folders; `path` itself with `keep`."""
    if keep or not isinstance(path, str) or not path:
        return path
    path = os.path.normpath(path)
    if isinstance(root, str) and root:
        root = os.path.normpath(root)
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.join(os.path.basename(root), os.path.relpath(path, root)).rstrip(os.sep + ".")
    return os.path.basename(path)


def shipped_meta(meta: ModelMeta, keep_paths: bool = False) -> ModelMeta:
    """The record as an exported artifact carries it: `extra["data"]` folders by name (`shipped_path`),
    unless `keep_paths`. The checkpoint and the run's own files keep full paths."""
    data = meta.extra.get("data")
    if keep_paths or not isinstance(data, dict):
        return meta
    root = data.get("root")
    names = {k: shipped_path(v, root) if k in DATA_PATH_KEYS else v for k, v in data.items()}
    return meta.replace(extra={**meta.extra, "data": names})


def _fp32_base(
    path: str,
    model: Any,
    meta: ModelMeta,
    exporter: str,
    opset: int | None,
    images: np.ndarray,
    tol: float,
    checkpoint: str,
    reference: Any,
) -> tuple[dict[str, Any], ParityReport]:
    """Export the fp32 ONNX graph that INT8/FP16 start from, and gate it like a plain ONNX export
    (against `reference`, the unfolded eager model)."""
    from cnnkit.export import onnx as onnx_export
    from cnnkit.export import parity

    info = onnx_export.export_onnx(model, meta, path, exporter, opset)
    _check_record(read_meta(path), meta, path)
    report = run_parity(reference, parity.onnx_runner(path), images, meta.output, tol)
    log(f"export: fp32 graph ({info['exporter']}, opset {info['opset']}): {report.summary()}")
    if not report.passed:
        raise located(
            ParityError(
                f"onnx export of {checkpoint}: the fp32 graph fails parity: {report.summary()}; nothing was written"
            ),
            model,
            path,
            images,
        )
    return info, report


def _int8_inputs(
    data: str | None,
    calibration: str | None,
    calibration_size: int,
    eval_limit: int,
    meta: ModelMeta,
    checkpoint: str,
) -> tuple[np.ndarray, str, np.ndarray, np.ndarray, str]:
    """(calibration images, their folder, labeled test images, labels, their folder)."""
    recorded = meta.extra.get("data") if isinstance(meta.extra.get("data"), dict) else {}
    calib_dir = calibration or recorded.get("train")
    if not calib_dir or not os.path.isdir(calib_dir):
        what = (
            f"the training folder recorded in {checkpoint} ({calib_dir}) is gone"
            if calib_dir
            else (f"{checkpoint} records no training folder")
        )
        if calibration:
            what = f"{calibration}: no such folder"
        raise DataError(f"int8 calibration: {what}; pass --calibration DIR (PNGs like the training data)")
    eval_dir = data or recorded.get("test")
    if not eval_dir or not os.path.isdir(eval_dir):
        raise DataError(
            f"the int8 accuracy gate needs the labeled testing split, and {checkpoint} records "
            f"{'none' if not eval_dir else 'a folder that is gone: ' + eval_dir}; pass --data DIR (DIR/<class>/*.png)"
        )
    calib = sample_images(calib_dir, meta, calibration_size)
    loaded = load_images(eval_dir, meta, eval_limit, command="export")
    if loaded.labels is None:
        raise DataError(
            f"{eval_dir}: the int8 accuracy gate needs labeled images, DIR/<class>/*.png with the model's classes "
            f"({', '.join(meta.classes[:5])}{', ...' if meta.num_classes > 5 else ''}); pass --data DIR"
        )
    log(
        f"export: int8: calibrating on {len(calib)} images from {calib_dir}; accuracy gate on "
        f"{len(loaded.images)} labeled images from {eval_dir}"
    )
    return calib, str(calib_dir), loaded.images, loaded.labels, str(eval_dir)


def _int8(
    fp32: str,
    tmp: str,
    meta: ModelMeta,
    checkpoint: str,
    calib: np.ndarray,
    calib_dir: str,
    eval_images: np.ndarray,
    labels: np.ndarray,
    eval_dir: str,
    max_drop: float,
    ship: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize and gate; the file records its folders as `ship` gives them (`shipped_path`), the
    returned gate numbers keep the full paths."""
    from cnnkit.export import quantize as q

    ship = ship or (lambda p: p)
    info = q.quantize_int8(fp32, tmp, meta, calib, ship(calib_dir))
    log(f"export: int8 (QDQ, per-channel, {len(calib)} calibration images) in {info['seconds']:.2f} s")
    gate = q.accuracy_gate(fp32, tmp, eval_images, labels, meta, max_drop, data=eval_dir)
    if not gate.passed:  # atomic_path removes the temporary file
        raise ParityError(
            f"int8 export of {checkpoint}: {gate.summary()}; nothing was written "
            "(calibrate on more images with --calibration-size, or allow more with --max-accuracy-drop)"
        )
    q.record_gate(tmp, meta, replace(gate, data=ship(gate.data)))
    info["bytes"] = os.path.getsize(tmp)
    return info, gate.to_dict()


def _fp16(
    fp32: str,
    tmp: str,
    meta: ModelMeta,
    checkpoint: str,
    reference: Any,
    images: np.ndarray,
    tol: float,
    spec: DeviceSpec,
) -> tuple[dict[str, Any], ParityReport | None, list[str], str | None]:
    """Convert, then gate where the file can run: (info, report or None, notes, where the gate ran)."""
    from cnnkit.export import onnx as onnx_export
    from cnnkit.export import parity

    info = onnx_export.convert_fp16(fp32, tmp, meta)
    log(f"export: fp16 conversion in {info['seconds']:.2f} s")
    tier = TIERS["fp16"]
    notes: list[str] = []
    gpu = f"cuda:{spec.cuda_index}"
    cuda_why = "--device cpu"
    candidate = None
    if spec.kind != "cpu":
        try:
            candidate, provider = parity.onnx_runner(tmp, gpu), gpu
        except DeviceError as e:
            if spec.kind == "cuda":
                raise DeviceError(f"--device {spec}: cannot run the fp16 gate there: {e}") from None
            cuda_why = str(e)
    if candidate is None:
        try:
            candidate, provider = parity.onnx_runner(tmp, "cpu"), "cpu"
            candidate(images[:1])
        except Exception:  # the CPU provider cannot run this fp16 graph
            note = f"fp16 parity {NOT_VERIFIED} ({cuda_why}) and the CPU provider cannot run the file"
            log(f"export: WARNING: {note}; check it on the GPU machine: `cnnkit bench --device cuda`")
            return info, None, [note], None
        notes.append(
            f"fp16 parity checked on the CPU provider only ({cuda_why}): it runs the fp16 graph by casting "
            "to float32 internally, so this checks the fp16 weights' rounding, not the CUDA provider's float16 "
            f"arithmetic; the file is {NOT_ON_TARGET}: check it on the GPU machine with `cnnkit bench --device cuda`"
        )
        log(f"export: WARNING: {notes[-1]}")
    report = run_parity(
        reference, candidate, images, meta.output, tol, min_agreement=tier.min_agreement, provider=provider
    )
    log(f"export: fp16 {report.summary()}")
    if not report.passed:
        raise ParityError(f"fp16 export of {checkpoint}: {report.summary()}; nothing was written")
    return info, report, notes, provider


def _export_to(
    path: str, model: Any, meta: ModelMeta, fmt: str, exporter: str, opset: int | None, batch: int | None = None
) -> tuple[dict[str, Any], Any]:
    """Write the artifact to `path`; return (info, a parity runner over the file as written)."""
    from cnnkit.export import onnx as onnx_export
    from cnnkit.export import parity, pt2, torchscript

    if fmt == "onnx":
        info = onnx_export.export_onnx(model, meta, path, exporter, opset, batch)
        _check_record(read_meta(path), meta, path)
        return info, parity.onnx_runner(path)
    # These formats run code when loaded: the gate loads the bytes it hashes, and the manifest vouches
    # for that hash only, so a file swapped in beside them is neither loaded here nor proven later.
    if fmt == "pt2":
        info = pt2.export_pt2(model, meta, path)
        data = _read_once(path, info)
        module, record = pt2.load_pt2(path, data=data)
        _check_record(record, meta, path)
        return info, parity.pt2_runner(module)
    info = torchscript.export_torchscript(model, meta, path)
    data = _read_once(path, info)
    module, record = torchscript.load_torchscript(path, data=data)
    _check_record(record, meta, path)
    return info, parity.torchscript_runner(module)


def _read_once(path: str, info: dict[str, Any]) -> bytes:
    """The bytes at `path`, with their SHA-256 kept in `info` for the manifest (`provenance.record`)."""
    with open(path, "rb") as f:
        data = f.read()
    info["sha256"] = hashlib.sha256(data).hexdigest()
    return data


def located(error: ParityError, model: Any, path: str, images: np.ndarray) -> ParityError:
    """`error` with the layer where the ONNX file at `path` leaves tolerance (`cnnkit.export.diff`) named
    in its one line, the layer table logged before it, and the diff's numbers in `error.diff`. A diff that
    cannot run leaves the error as it was (and says why): it explains a failure, it must not replace it."""
    from cnnkit.export.diff import diff_file, format_table

    try:
        result = diff_file(model, path, images)
    except Exception as e:
        log(f"export: diff: could not compare layers ({type(e).__name__}: {str(e)[:200]})")
        return error
    log(format_table(result))
    where = (
        f"first layer out of tolerance: {result.first_bad} (`cnnkit diff` shows the table)"
        if result.first_bad
        else "no layer is out of tolerance on its own (`cnnkit diff` shows the table)"
    )
    out = ParityError(f"{error}; {where}")
    out.diff = result.to_dict()
    return out


def _check_record(record: ModelMeta, meta: ModelMeta, path: str) -> None:
    same = (record.arch, record.classes, record.input_shape, record.output)
    if same != (meta.arch, meta.classes, meta.input_shape, meta.output):
        raise ModelError(f"{path}: the metadata written into the artifact does not match the checkpoint's")


def _resolve_out(out: str | None, checkpoint: str, kind: str, batch: int | None = None) -> str:
    name = fixed_batch_name(ARTIFACT_NAMES[kind], batch)
    if out is None:
        out = os.path.join(os.path.dirname(checkpoint), name)
    elif out.endswith(("/", os.sep)) or os.path.isdir(out):
        out = os.path.join(out, name)
    _check_out(out, checkpoint)
    return out


def _check_out(out: str, checkpoint: str) -> None:
    """Refuse, before any work, an artifact path that is a checkpoint (the source, its run's other
    one, any cnnkit checkpoint) or that cannot be written; likewise its report. `checkpoint` is ""
    for `export_module`."""
    from cnnkit.checkpoint import is_checkpoint

    run = os.path.dirname(checkpoint)
    outputs = [out, out + REPORT_SUFFIX]
    inputs = [checkpoint, os.path.join(run, BEST_NAME), os.path.join(run, CHECKPOINT_NAME)] if checkpoint else []
    check_not_an_input(outputs, inputs)
    for path in outputs:
        if is_checkpoint(path):
            raise ModelError(f"{path}: is a cnnkit checkpoint; exporting there would destroy it (pass another --out)")
        check_writable(path)


def _data_for(data: str | None, meta: ModelMeta, checkpoint: str, out: str) -> str:
    """The folder of images the gate reads (`_resolve_data`), once the outputs are known to lie outside
    it and the signing key to work: both fail now, not after the export."""
    data_dir = _resolve_data(data, meta, checkpoint)
    check_outside([out, out + REPORT_SUFFIX], data_dir, "the folder of images the gate reads")
    check_key()
    return data_dir


def _resolve_data(data: str | None, meta: ModelMeta, checkpoint: str) -> str:
    if data is not None:
        if not os.path.isdir(data):
            raise DataError(f"{data}: no such folder (--data takes a folder of PNGs for the parity check)")
        return data
    recorded = meta.extra.get("data")
    folder = (recorded.get("test") or recorded.get("train")) if isinstance(recorded, dict) else None
    if not folder:
        raise DataError(f"{checkpoint} records no data folder; pass --data DIR (a folder of PNGs) for the parity check")
    if not os.path.isdir(folder):
        raise DataError(
            f"the data folder recorded in {checkpoint} ({folder}) is gone; "
            "pass --data DIR (a folder of PNGs like the training data) for the parity check"
        )
    return str(folder)


def sample_images(root: str, meta: ModelMeta, n_images: int) -> np.ndarray:
    """Up to `n_images` real images from `root` for the model (`cnnkit.batches.sample_folder`).

    Returns:
        uint8 (n, C, H, W).
    """
    _, h, w = meta.input_shape
    sample = sample_folder(root, meta.input_shape, meta.classes, n_images)
    if sample.n_failed or sample.n_converted:
        log(
            f"export: parity images: {sample.n_failed} unreadable skipped, "
            f"{sample.n_converted} converted to {h}x{w} {'grayscale' if meta.color == 'L' else meta.color}"
        )
    return sample.images
