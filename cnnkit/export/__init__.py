"""Export a checkpoint to ONNX or TorchScript, behind a parity gate.

`export()` writes the artifact to a temporary file next to its destination, loads *that file* back
(onnxruntime / torch.jit.load) and compares it with the eager model on real images at several batch
sizes. Only a file that passes is renamed onto the destination, with a JSON report beside it
(`<artifact>.parity.json`). A failing export leaves nothing behind and raises `ParityError`.

The CLI calls `export(...)` and prints `result.to_dict()` as JSON; everything for humans goes to stderr.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.console import log
from cnnkit.errors import CnnkitError, DataError, ModelError, ParityError
from cnnkit.export.onnx import DEFAULT_EXPORTER, EXPORTERS, check_options
from cnnkit.export.parity import ParityReport, run_parity
from cnnkit.files import atomic_path, write_json
from cnnkit.images import ImageError, list_pngs, read_image
from cnnkit.meta import ModelMeta
from cnnkit.runs import ONNX_NAME, TORCHSCRIPT_NAME, latest_file

__all__ = ["DEFAULT_EXPORTER", "EXPORTERS", "FORMATS", "ExportResult", "ParityReport", "export", "sample_images"]

FORMATS = ("onnx", "torchscript")
ARTIFACT_NAMES = {"onnx": ONNX_NAME, "torchscript": TORCHSCRIPT_NAME}
REPORT_SUFFIX = ".parity.json"


@dataclass
class ExportResult:
    """What `export()` wrote.

    Attributes:
        format: `onnx` or `torchscript`.
        path: the artifact.
        exporter: `dynamo` / `torchscript` for ONNX, `torch.jit.trace` for TorchScript.
        parity: the gate's numbers.
        report_path: the JSON report next to the artifact.
        seconds: wall time of the whole export, parity included.
        opset: the ONNX opset (None for TorchScript).
        checkpoint: the checkpoint exported.
        data: the folder the parity images came from.
        info: the exporter's own details (sizes, shapes, export seconds).
    """

    format: str
    path: str
    exporter: str
    parity: ParityReport
    report_path: str
    seconds: float
    opset: int | None
    checkpoint: str = ""
    data: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(
    checkpoint: str | None = None,
    fmt: str = "onnx",
    out: str | None = None,
    data: str | None = None,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    max_abs_tol: float = 1e-4,
    n_images: int = 512,
) -> ExportResult:
    """Export a checkpoint and gate the artifact on parity with the eager model.

    Args:
        checkpoint: a cnnkit checkpoint (default `runs/latest/best.pt`).
        fmt: `onnx` or `torchscript`.
        out: the artifact's path, or a folder for it (default: `model.onnx` / `model.ts` beside the
            checkpoint).
        data: a folder of PNGs for the parity check (default: the test folder, else the train
            folder, recorded in the checkpoint).
        exporter: ONNX only: `dynamo` (default) or `torchscript` (torch's legacy ONNX exporter).
        opset: ONNX only: the opset (default `cnnkit.export.onnx.DEFAULT_OPSET`).
        max_abs_tol: the largest |artifact - eager| output difference allowed.
        n_images: how many images (spread over the folder's sorted listing) to compare on.

    Returns:
        The result; `result.to_dict()` is the JSON the CLI prints.

    Raises:
        ModelError: missing/foreign/truncated checkpoint, weights not matching the arch, bad options.
        DataError: no usable parity images.
        ParityError: the artifact does not answer like the eager model; nothing was written.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        opset = check_options(exporter, opset)
    elif opset is not None:
        log("export: --opset applies to ONNX only; ignored for torchscript")
    if n_images < 1:
        raise CnnkitError(f"n_images must be at least 1, got {n_images}")
    if not max_abs_tol >= 0:  # also refuses NaN
        raise CnnkitError(f"the parity tolerance must be a number >= 0, got {max_abs_tol}")
    from cnnkit.trainer.checkpoint import BEST_NAME, model_from_checkpoint  # imports torch: not at module level

    if checkpoint is None:
        checkpoint = latest_file(BEST_NAME, hint="train a model first (`cnnkit train`) or pass --checkpoint PATH")
    model, meta, _ = model_from_checkpoint(checkpoint)
    c, h, w = meta.input_shape
    log(f"export: {checkpoint}: arch {meta.arch}, {meta.num_classes} classes, input {c}x{h}x{w}, {meta.output} output")
    out = _resolve_out(out, checkpoint, fmt)
    data_dir = _resolve_data(data, meta, checkpoint)
    images = sample_images(data_dir, meta, n_images)

    try:
        with atomic_path(out) as tmp:
            info, candidate = _export_to(tmp, model, meta, fmt, exporter, opset)
            used_exporter = info["exporter"]
            how = f"{used_exporter}, opset {opset}" if fmt == "onnx" else used_exporter
            log(f"export: {fmt} via {how} in {info['seconds']:.2f} s")

            from cnnkit.export.parity import torch_runner

            report = run_parity(torch_runner(model), candidate, images, meta.output, max_abs_tol)
            log(f"export: {report.summary()}")
            if not report.passed:  # atomic_path removes the temporary file
                raise ParityError(f"{fmt} export of {checkpoint} ({how}): {report.summary()}; nothing was written")
    except PermissionError as e:
        raise ModelError(f"cannot write {out}: {e.strerror or e}; pass another --out") from None

    result = ExportResult(
        format=fmt,
        path=out,
        exporter=used_exporter,
        parity=report,
        report_path=out + REPORT_SUFFIX,
        seconds=0.0,
        opset=opset if fmt == "onnx" else None,
        checkpoint=checkpoint,
        data=data_dir,
        info=info,
    )
    result.seconds = round(time.perf_counter() - t0, 3)
    write_json(result.report_path, {**result.to_dict(), "meta": meta.to_dict()})
    log(f"export: wrote {out} ({info['bytes']:,} bytes) and {result.report_path}")
    return result


def _export_to(
    path: str, model: Any, meta: ModelMeta, fmt: str, exporter: str, opset: int | None
) -> tuple[dict[str, Any], Any]:
    """Write the artifact to `path`; return (info, a parity runner over the file as written)."""
    from cnnkit.export import onnx as onnx_export
    from cnnkit.export import parity, torchscript

    if fmt == "onnx":
        info = onnx_export.export_onnx(model, meta, path, exporter, opset)
        _check_record(_onnx_record(path), meta, path)
        return info, parity.onnx_runner(path)
    info = torchscript.export_torchscript(model, meta, path)
    module, record = torchscript.load_torchscript(path)
    _check_record(record, meta, path)
    return info, parity.torchscript_runner(module)


def _onnx_record(path: str) -> ModelMeta:
    import onnxruntime as ort

    from cnnkit.meta import METADATA_KEY

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ModelError(f"exported ONNX file carries no {METADATA_KEY!r} metadata")
    return ModelMeta.from_json(text)


def _check_record(record: ModelMeta, meta: ModelMeta, path: str) -> None:
    same = (record.arch, record.classes, record.input_shape, record.output)
    if same != (meta.arch, meta.classes, meta.input_shape, meta.output):
        raise ModelError(f"{path}: the metadata written into the artifact does not match the checkpoint's")


def _resolve_out(out: str | None, checkpoint: str, fmt: str) -> str:
    name = ARTIFACT_NAMES[fmt]
    if out is None:
        out = os.path.join(os.path.dirname(checkpoint), name)
    elif out.endswith(("/", os.sep)) or os.path.isdir(out):
        out = os.path.join(out, name)
    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise ModelError(f"{out}: the output would overwrite the checkpoint; pass another --out")
    return out


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
    """Up to `n_images` images spread evenly over the sorted listing of `root`, decoded for the model.

    The listing is sorted by class folder, so the first N files would all be one class; an even
    spread covers every class and is the same on every run.

    Returns:
        uint8 (n, C, H, W).
    """
    files = list_pngs(root).files
    if not files:
        raise DataError(f"{root}: no PNG files for the parity check; pass --data DIR with PNGs")
    picks = np.unique(np.linspace(0, len(files) - 1, num=min(n_images, len(files))).round().astype(np.int64))
    _, h, w = meta.input_shape
    images, failed, converted = [], 0, 0
    for i in picks:
        try:
            img, conv = read_image(os.path.join(root, files[i]), (h, w))
        except ImageError:
            failed += 1
            continue
        images.append(img)
        converted += conv
    if not images:
        raise DataError(f"{root}: none of {len(picks)} sampled PNGs could be decoded; pass --data DIR")
    if failed or converted:
        log(f"export: parity images: {failed} unreadable skipped, {converted} converted to {h}x{w} grayscale")
    return np.stack(images)[:, None, :, :]
