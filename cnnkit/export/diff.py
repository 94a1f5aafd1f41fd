"""`cnnkit diff`: where an exported artifact stops answering like the eager model, layer by layer.

The parity gate (`cnnkit.export.parity`) says *that* an artifact differs; this says *where*. Both models
run once over the same real images; every intermediate tensor that both expose is compared:
  - torch side: a forward hook on every module of the eager model records its output (cloned: an
    in-place ReLU would otherwise overwrite the BatchNorm output it was handed). channels_last outputs
    are compared by value, as NCHW arrays.
  - ONNX side: on an in-memory copy of the graph, the tensor that ends each module's scope is added as
    a graph output (a name with no type: onnxruntime infers it) and the copy runs once on the CPU
    provider. The scope comes from the node's `pkg.torch.onnx.name_scopes` metadata (dynamo exporter,
    kept through cnnkit's INT8 and FP16 conversions) or from its name, `/net/net.0/Conv` (the legacy
    TorchScript exporter). In a QDQ (INT8) graph the compared tensor is the DequantizeLinear output that
    the next layer reads; where the quantizer folded a ReLU into the uint8 range before it (zero point
    0), that tensor stands for the ReLU module after it. Modules the exporter fused away (a Conv whose
    BatchNorm was folded into it) have no tensor of their own and are left out.

A layer is within tolerance when:
  - fp32 / fp16: max |diff| <= the tier's tolerance (`TIERS`) times max(1, max |reference|): absolute
    for activations up to 1, relative beyond (float32 rounding grows with the values). The final output
    row uses the gate's own absolute rule.
  - int8: SQNR = 10 log10(||ref||^2 / ||ref - q||^2) >= `INT8_MIN_SQNR_DB` (20 dB: the error's power is
    at most 1% of the signal's, its RMS 10%). 8-bit steps over a calibrated range leave far more than
    that on a healthy layer; a layer below it has lost its range (bad calibration, a broken scale or
    weight), and the layers after it inherit the error, so the first one below is the one to look at.

TorchScript and pt2 graphs do not expose their intermediate tensors here: for them only the final
output is compared (and such files are loaded only when `cnnkit.provenance` proves cnnkit wrote them,
or with `trust_model`: loading them runs code).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.console import log
from cnnkit.errors import DataError, ModelError
from cnnkit.export.parity import TIERS
from cnnkit.meta import ModelMeta
from cnnkit.runtime.session import read_meta

INT8_MIN_SQNR_DB = 20.0
DEFAULT_IMAGES = 64  # enough to see a layer's error; all intermediate tensors of the batch stay in memory
OUTPUT_ROW = "(output)"
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class LayerDiff:
    """One compared tensor: the torch module, the ONNX tensor, and how far apart they are."""

    module: str
    kind: str
    tensor: str
    shape: list[int]
    max_abs: float
    relative: float
    cosine: float
    sqnr_db: float
    within: bool


@dataclass
class DiffResult:
    """A layer-by-layer comparison of an artifact with its eager model.

    Attributes:
        artifact: the file compared.
        format: `onnx`, `torchscript` or `pt2`.
        precision: `fp32`, `fp16` or `int8` (from the artifact's record).
        per_layer: whether intermediate tensors were compared (ONNX only).
        n_images: images run through both models.
        tolerance: the max |diff| rule's tolerance (fp32/fp16), or None.
        min_sqnr_db: the SQNR floor (int8), or None.
        layers: the compared tensors in graph order, the final output last.
        first_bad: the first module out of tolerance, or None.
        note: what could not be compared, in words.
        seconds: wall time, loading included.
    """

    artifact: str
    format: str
    precision: str
    per_layer: bool
    n_images: int
    tolerance: float | None
    min_sqnr_db: float | None
    layers: list[LayerDiff] = field(default_factory=list)
    first_bad: str | None = None
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the first layer out of tolerance, or that all are within it."""
        rule = f"SQNR floor {self.min_sqnr_db:g} dB" if self.precision == "int8" else f"tolerance {self.tolerance:g}"
        if self.first_bad is None:
            what = f"all {len(self.layers)} compared tensors" if self.per_layer else "the final output"
            return f"diff: {what} within tolerance ({rule})"
        bad = next(r for r in self.layers if r.module == self.first_bad)
        return (
            f"diff: first layer out of tolerance ({rule}): {bad.module} ({bad.kind}, tensor {bad.tensor}): "
            f"max |diff| {bad.max_abs:.3g}, SQNR {bad.sqnr_db:.1f} dB"
        )


def format_table(result: DiffResult) -> str:
    """The table the CLI prints: one row per compared tensor, the first bad one marked."""
    head = f"{'layer':<16} {'module':<18} {'max |diff|':>10} {'rel':>9} {'cosine':>9} {'SQNR dB':>8}  verdict"
    rows = [head]
    for r in result.layers:
        mark = "ok" if r.within else ("FIRST BAD" if r.module == result.first_bad else "bad")
        rows.append(
            f"{r.module[:16]:<16} {r.kind[:18]:<18} {r.max_abs:>10.3g} {r.relative:>9.3g} {r.cosine:>9.6f} "
            f"{r.sqnr_db:>8.1f}  {mark}"
        )
    rows.append(result.summary() + (f"; {result.note}" if result.note else ""))
    return "\n".join(rows)


def compare(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float, float, float]:
    """(max |diff|, max |diff| / max |ref|, cosine similarity, SQNR in dB) of two same-size arrays,
    computed in float64; NaN anywhere gives NaN max |diff| (never within tolerance)."""
    r = ref.astype(np.float64).ravel()
    c = cand.astype(np.float64).ravel()
    d = c - r
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    nr, nc, nd = float(r @ r), float(c @ c), float(d @ d)
    cosine = float(r @ c) / math.sqrt(nr * nc) if nr > 0 and nc > 0 else float(nr == nc)
    sqnr = math.inf if nd == 0 else (10 * math.log10(nr / nd) if nr > 0 else -math.inf)
    return max_abs, relative, cosine, sqnr


def _within(precision: str, tol: float, max_abs: float, relative: float, sqnr: float, final: bool) -> bool:
    if precision == "int8":
        return sqnr >= INT8_MIN_SQNR_DB
    if final:
        return max_abs <= tol
    scale = max_abs / relative if relative > 0 and math.isfinite(relative) else 1.0
    return max_abs <= tol * max(1.0, scale)


def _row(module: str, kind: str, tensor: str, ref: np.ndarray, cand: np.ndarray, precision: str, tol: float) -> Any:
    """A LayerDiff, or None when the two tensors do not have the same number of values per image."""
    if ref.shape[0] != cand.shape[0] or ref.size != cand.size:
        return None
    max_abs, rel, cos, sqnr = compare(ref, cand.reshape(ref.shape))
    final = module == OUTPUT_ROW
    ok = _within(precision, tol, max_abs, rel, sqnr, final)
    return LayerDiff(module, kind, tensor, list(ref.shape[1:]), max_abs, rel, cos, sqnr, ok)


# --------------------------------------------------------------------------------------------
# ONNX: which tensor ends which module


def _scope(node: Any) -> list[str]:
    """The module names a node sits in, outermost first (`["net", "net.0"]`), from the dynamo
    exporter's metadata or the legacy exporter's node name; [] when neither says."""
    meta = {p.key: p.value for p in node.metadata_props}
    text = meta.get(SCOPE_KEY)
    if text:
        parts = [p.strip().strip("'\"") for p in text.strip("[]").split(",")]
        return [p for p in parts[:-1] if p]
    if node.name.startswith("/"):
        return [p for p in node.name.split("/")[1:-1] if p]
    return []


def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _dequantized(name: str, users: dict[str, list[Any]]) -> str:
    """The tensor the next layer reads for `name`: in a QDQ graph, the DequantizeLinear output after
    `name`'s QuantizeLinear; else `name` itself."""
    q = next((n for n in users.get(name, []) if n.op_type == "QuantizeLinear"), None)
    dq = next((n for n in users.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None) if q else None
    return dq.output[0] if dq is not None else name


def module_tensors(proto: Any) -> list[tuple[str, str]]:
    """(module name, tensor to compare) for each module whose scope ends in a tensor, in graph order; the
    innermost module only (a container ends where its last child does)."""
    graph = proto.graph
    users = _consumers(graph)
    last: dict[str, str] = {}
    for node in graph.node:
        scope = _scope(node)
        if scope and node.op_type not in QDQ_OPS and node.output:
            last.pop(scope[-1], None)  # re-insert: dict order is then the order modules end in
            last[scope[-1]] = node.output[0]
    taken: set[str] = set()
    found = []
    for module, name in last.items():
        if name in taken:
            continue
        taken.add(name)
        found.append((module, _dequantized(name, users)))
    return found


def _fused_into(module: str, order: list[str], have: set[str]) -> list[str]:
    """The modules an exporter may have fused into `module`'s node: those that run next with no tensor of
    their own, up to the next one that has one (a BatchNorm folded into the Conv before it, the Identity
    cnnkit's folding leaves in its place, a ReLU the INT8 quantizer folded into the uint8 range of the
    layer before it)."""
    pos = order.index(module) if module in order else len(order)
    fused = []
    for nxt in order[pos + 1 : pos + 4]:
        if nxt in have or not nxt.startswith(module.rsplit(".", 1)[0] + "."):
            break  # the next layer with its own tensor, or the container ending
        fused.append(nxt)
    return fused


# --------------------------------------------------------------------------------------------
# Running both sides


def _torch_outputs(model: Any, images: np.ndarray, wanted: set[str] | None) -> tuple[dict, list[str], dict]:
    """(module name -> its output over `images` as float32 numpy, the order modules ran in, module
    name -> class name), in IEEE float32 on the CPU (`full_fp32`), as the gates' reference."""
    import torch

    from cnnkit.export.parity import full_fp32

    model = model.to("cpu").eval()
    outs: dict[str, np.ndarray] = {}
    order: list[str] = []
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name}

    def hook_for(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if name not in order:
                order.append(name)
            if isinstance(output, torch.Tensor) and (wanted is None or name in wanted):
                outs[name] = output.detach().float().contiguous().clone().numpy()

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode(), full_fp32():
            final = model(torch.from_numpy(np.ascontiguousarray(images))).float().numpy()
    finally:
        for h in handles:
            h.remove()
    outs[OUTPUT_ROW] = final
    return outs, order, kinds


def _onnx_outputs(proto: Any, tensors: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Run a copy of `proto` with `tensors` added as graph outputs (CPU provider): name -> float32 array."""
    import onnx
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(copy.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(images)})
    return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values, strict=True)}


def diff_onnx(model: Any, proto: Any, images: np.ndarray, precision: str, artifact: str) -> DiffResult:
    """Compare every module output of `model` with its tensor in the ONNX graph `proto` over `images`."""
    t0 = time.perf_counter()
    tol = TIERS["fp16" if precision == "fp16" else "fp32"].max_abs
    final = proto.graph.output[0].name
    pairs = [(m, t) for m, t in module_tensors(proto) if t != final] + [(OUTPUT_ROW, final)]
    ref, order, kinds = _torch_outputs(model, images, None)
    got = _onnx_outputs(proto, [t for _, t in pairs], images)
    have = {m for m, _ in pairs}
    rows = []
    for module, tensor in sorted(pairs, key=lambda p: _position(p[0], order)):
        # A fused pair's one tensor is compared with both modules' outputs and kept under the closer one.
        names = [module, *_fused_into(module, order, have)] if module != OUTPUT_ROW else [module]
        found = [
            _row(m, kinds.get(m, "output"), tensor, ref[m], got[tensor], precision, tol)
            for m in names
            if m in ref and tensor in got
        ]
        found = [r for r in found if r is not None]
        if found:
            rows.append(max(found, key=lambda r: r.sqnr_db))
    return _result(artifact, "onnx", precision, True, images, rows, t0, "")


def _position(module: str, order: list[str]) -> int:
    return order.index(module) if module in order else len(order)


def _result(
    artifact: str, fmt: str, precision: str, per_layer: bool, images: np.ndarray, rows: list, t0: float, note: str
) -> DiffResult:
    first = next((r.module for r in rows if not r.within), None)
    return DiffResult(
        artifact=artifact,
        format=fmt,
        precision=precision,
        per_layer=per_layer,
        n_images=len(images),
        tolerance=None if precision == "int8" else TIERS["fp16" if precision == "fp16" else "fp32"].max_abs,
        min_sqnr_db=INT8_MIN_SQNR_DB if precision == "int8" else None,
        layers=rows,
        first_bad=first,
        note=note,
        seconds=round(time.perf_counter() - t0, 3),
    )


# --------------------------------------------------------------------------------------------
# The command: a checkpoint and an artifact


def diff(
    checkpoint: str,
    artifact: str,
    data: str | None = None,
    n_images: int = DEFAULT_IMAGES,
    trust_arch: str | None = None,
    trust_model: bool = False,
) -> DiffResult:
    """Compare `artifact` (ONNX: layer by layer; TorchScript / pt2: the final output) with the eager model
    of `checkpoint` on up to `n_images` real images from `data` (default: the checkpoint's recorded
    testing folder, as the export gate samples them).

    Raises:
        ModelError: unreadable checkpoint or artifact, a user arch not named by `trust_arch`, a .ts/.pt2
            cnnkit cannot prove it wrote (without `trust_model`), an artifact for another model.
        DataError: no usable images.
    """
    from cnnkit.checkpoint import model_from_checkpoint

    if n_images < 1:
        raise DataError(f"--images must be at least 1, got {n_images}")
    if not os.path.isfile(artifact):
        raise ModelError(f"{artifact}: no such file (pass a model.onnx, model.int8.onnx, model.ts or model.pt2)")
    t0 = time.perf_counter()
    model, meta, _ = model_from_checkpoint(checkpoint, trust_arch)
    images = _images(data, meta, checkpoint, n_images)
    if artifact.endswith(".onnx"):
        record = read_meta(artifact)
        _same_model(record, meta, artifact, checkpoint)
        if isinstance(record.extra.get("fold"), dict) and record.extra["fold"].get("folded"):
            from cnnkit.export.fold import fold_batchnorm

            model, _ = fold_batchnorm(model)  # as export did: its layers are the folded ones
        result = diff_file(model, artifact, images)
    else:
        result = _diff_final(model, meta, artifact, images, trust_model, checkpoint)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _images(data: str | None, meta: ModelMeta, checkpoint: str, n_images: int) -> np.ndarray:
    """Up to `n_images` real images, spread over `data` or the checkpoint's recorded testing (else
    training) folder: the export gate's sample (`cnnkit.batches.sample_folder`)."""
    from cnnkit.batches import sample_folder

    recorded = meta.extra.get("data") if isinstance(meta.extra.get("data"), dict) else {}
    folder = data or recorded.get("test") or recorded.get("train")
    if not folder or not os.path.isdir(folder):
        what = f"{folder}: no such folder" if folder else f"{checkpoint} records no data folder"
        raise DataError(f"{what}; pass --data DIR (a folder of images like the training data)")
    sample = sample_folder(folder, meta.input_shape, meta.classes, n_images)
    log(f"diff: {len(sample.images)} images from {folder}")
    return sample.images


def diff_file(model: Any, path: str, images: np.ndarray) -> DiffResult:
    """`diff_onnx` over the ONNX file at `path`, its precision read from its cnnkit record (what the export
    gate runs on a file that failed, before the file is removed)."""
    return diff_onnx(model, _load_onnx(path), images, _precision(read_meta(path)), path)


def _load_onnx(path: str) -> Any:
    import onnx

    try:
        return onnx.load(path)
    except Exception as e:  # a damaged file: onnx raises DecodeError, ValueError, ...
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def _precision(record: ModelMeta) -> str:
    export = record.extra.get("export")
    precision = export.get("precision") if isinstance(export, dict) else None
    return precision if precision in ("fp32", "fp16", "int8") else "fp32"


def _same_model(record: ModelMeta, meta: ModelMeta, artifact: str, checkpoint: str) -> None:
    if (record.classes, record.input_shape, record.output) != (meta.classes, meta.input_shape, meta.output):
        raise ModelError(f"{artifact} is not an export of {checkpoint}: classes, input shape or output differ")


def _diff_final(model: Any, meta: ModelMeta, artifact: str, images: np.ndarray, trust: bool, ckpt: str) -> DiffResult:
    """TorchScript / pt2: the final output only, loaded only when proven or trusted (it runs code)."""
    from cnnkit.export import parity
    from cnnkit.provenance import read_proven

    t0 = time.perf_counter()
    data, why = read_proven(artifact)
    if data is None and not trust:
        raise ModelError(f"{artifact}: {why}; loading it would run its code: pass --trust-model if you trust it")
    if artifact.endswith(".pt2"):
        from cnnkit.export.pt2 import load_pt2

        module, record = load_pt2(artifact, data=data)
        fmt, runner = "pt2", parity.pt2_runner(module)
    else:
        from cnnkit.export.torchscript import load_torchscript

        module, record = load_torchscript(artifact, data=data)
        fmt, runner = "torchscript", parity.torchscript_runner(module)
    _same_model(record, meta, artifact, ckpt)
    ref = parity.torch_runner(model)(images)
    row = _row(
        OUTPUT_ROW, "output", "output", ref, np.asarray(runner(images), np.float32), "fp32", TIERS["fp32"].max_abs
    )
    note = f"per-layer comparison is not available for {fmt} files (their graphs do not expose intermediate tensors)"
    return _result(artifact, fmt, "fp32", False, images, [row] if row else [], t0, note)
