"""ONNX export: uint8 `images` (batch, 1, H, W) in, float `output` (batch, K) out, metadata inside.

Two exporters, both through `torch.onnx.export`:
  - `dynamo` (the default, and torch's own default since 2.9): torch.export + onnxscript. Measured
    here (2 cores, torch 2.14.1, onnxscript 0.7.2): 1.5-2 s per export, ~4.6 s for the first in a
    process; dynamic batch axis; parity max |diff| ~5e-8 for both archs.
  - `torchscript` (`dynamo=False`): the legacy tracer. 0.05-0.1 s per export, same dynamic axis and
    parity, but deprecated upstream ("will be removed") and capped at opset 20.
Export is a one-off command, so the seconds matter less than staying on the maintained path; the
parity gate checks whichever was used.

The graph is serialized as one self-contained file: the dynamo exporter's own `save()` writes weights
to a side file (`<name>.data`) by default, which would not follow an atomic rename.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

from cnnkit.console import log
from cnnkit.errors import ModelError
from cnnkit.files import write_bytes
from cnnkit.meta import METADATA_KEY, ModelMeta

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
# 18 is the lowest opset the dynamo exporter implements natively (lower ones go through a version
# converter that may silently keep 18); onnxruntime loads it from 1.14 on, so older runtimes on
# small devices can still read the file.
DEFAULT_OPSET = 18
MIN_OPSET = {"dynamo": 18, "torchscript": 9}
INPUT_NAME = "images"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings, prints and log lines; on an error, show what was printed."""
    buf = io.StringIO()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    except BaseException:
        if buf.getvalue().strip():
            log(buf.getvalue().rstrip())
        raise
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def max_opset(exporter: str) -> int:
    """The highest opset that `exporter` writes, onnx knows and the installed onnxruntime loads."""
    import onnx

    top = min(_ort_max_opset(), onnx.defs.onnx_opset_version())
    if exporter == "torchscript":
        try:
            from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as legacy_max
        except ImportError:  # pragma: no cover - private constant moved
            legacy_max = 20
        top = min(top, legacy_max)
    return top


@functools.lru_cache(maxsize=1)
def _ort_max_opset() -> int:
    """Probe onnxruntime with a one-node model per opset, newest first (a few ms each)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        try:
            ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return 7  # pragma: no cover - an onnxruntime that loads nothing fails later with its own error


def check_options(exporter: str, opset: int | None) -> int:
    """Validate the exporter name and opset before any work; returns the opset to use."""
    if exporter not in EXPORTERS:
        raise ModelError(f"unknown ONNX exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    low, high = MIN_OPSET[exporter], max_opset(exporter)
    if not low <= opset <= high:
        import onnxruntime as ort

        raise ModelError(
            f"opset {opset} is out of range for the {exporter} exporter with onnxruntime {ort.__version__}: "
            f"choose {low} to {high} (default {DEFAULT_OPSET})"
        )
    return opset


def export_onnx(
    model: Any,
    meta: ModelMeta,
    path: str,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """Export `model` to a self-contained ONNX file at `path` (written atomically).

    Args:
        model: a `cnnkit.models.Classifier` (moved to the CPU, set to eval mode).
        meta: its record; written to `metadata_props[METADATA_KEY]` with `extra["export"]` added.
        path: the file to write.
        exporter: `dynamo` or `torchscript` (torch's legacy ONNX exporter, `dynamo=False`).
        opset: ONNX opset (default `DEFAULT_OPSET`).
        batch: a fixed batch size for the graph's input and output (what NNAPI and CoreML need), or
            None for a dynamic batch axis.

    Returns:
        Plain info: format, exporter, opset, ir_version, seconds, bytes, batch, input and output shapes.

    Raises:
        ModelError: bad exporter/opset, or a graph that fails the checks (a batch axis other than
            asked for, wrong opset, onnxruntime cannot load it).
    """
    import torch

    from cnnkit.models import example_batch

    opset = check_options(exporter, opset)
    model = model.to("cpu").eval()
    # Dynamic: trace with a batch of 2, as a batch of 1 lets exporters specialize the batch dimension
    # to 1. Fixed: trace with exactly that batch, and no dynamic axis.
    example = example_batch(meta.input_shape, n=batch or 2)
    t0 = time.perf_counter()
    proto = _trace(model, example, exporter, opset, fixed=batch is not None)
    seconds = time.perf_counter() - t0

    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ModelError(f"the {exporter} exporter wrote opset {got} instead of {opset}; choose another opset")

    record = meta.with_export(
        format="onnx",
        exporter=exporter,
        opset=opset,
        ir_version=int(proto.ir_version),
        precision="fp32",
        torch=str(torch.__version__),
        batch=batch,
    )
    write_record(proto, record)
    size = finish(proto, meta, path, batch)
    return _info(record, seconds, size)


def _info(record: ModelMeta, seconds: float, size: int) -> dict[str, Any]:
    """What `export_onnx` reports: the export record's facts, the time, the size and the graph's I/O."""
    export = record.extra["export"]
    dim = export["batch"] or BATCH_DIM
    keys = ("format", "exporter", "opset", "ir_version")
    return {
        **{k: export[k] for k in keys},
        "seconds": round(seconds, 3),
        "bytes": size,
        "batch": export["batch"],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [dim, *record.input_shape]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [dim, _out_width(record)]},
    }


def _trace(model: Any, example: Any, exporter: str, opset: int, fixed: bool = False) -> Any:
    """The ONNX graph (a ModelProto) of `model` traced on `example`, with a dynamic batch axis unless
    `fixed` (then the batch is `len(example)`)."""
    import onnx
    import torch

    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with quiet():
        if exporter == "dynamo":
            dynamic = None if fixed else ({0: torch.export.Dim(BATCH_DIM, min=1)},)
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, dynamic_shapes=dynamic, verbose=False, **names
            )
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            do_constant_folding=True,
            dynamic_axes=None if fixed else {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
            **names,
        )
        return onnx.load_model_from_string(buf.getvalue())


def _out_width(meta: ModelMeta) -> int:
    return 1 if meta.output == "sigmoid" else meta.num_classes


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_graph(proto: Any, meta: ModelMeta, batch: int | None = None) -> None:
    """The ONNX checker, then shape inference: one uint8 input and one output, both batch-symbolic (or
    both of the fixed `batch`)."""
    import onnx

    try:
        onnx.checker.check_model(proto)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"exported ONNX graph is invalid: {str(e).strip().splitlines()[0]}") from None
    inputs, outputs = list(inferred.graph.input), list(inferred.graph.output)
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        names = [i.name for i in inputs], [o.name for o in outputs]
        raise ModelError(f"exported graph has inputs {names[0]} and outputs {names[1]}")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ModelError("exported graph does not take uint8 input")
    in_dims, out_dims = _dims(inputs[0]), _dims(outputs[0])
    if batch is not None:
        if in_dims != [batch, *meta.input_shape] or len(out_dims) != 2 or out_dims[0] != batch:
            raise ModelError(
                f"exported graph does not have the fixed batch {batch}: input {in_dims}, output {out_dims}"
            )
        return
    want_in = [BATCH_DIM, *meta.input_shape]
    if in_dims != want_in or len(out_dims) != 2 or not isinstance(out_dims[0], str) or not out_dims[0]:
        raise ModelError(f"exported graph is not batch-dynamic: input {in_dims}, output {out_dims}")


def _check_session(data: bytes, meta: ModelMeta, batch: int | None = None) -> None:
    """onnxruntime loads the bytes and sees a symbolic batch dimension (or the fixed `batch`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"onnxruntime {ort.__version__} cannot load the exported graph: {first}") from None
    shape = session.get_inputs()[0].shape
    first_ok = shape[0] == batch if batch is not None else isinstance(shape[0], str)
    if not first_ok or list(shape[1:]) != list(meta.input_shape):
        raise ModelError(
            f"onnxruntime sees input shape {shape}, expected [{batch or BATCH_DIM}, *{list(meta.input_shape)}]"
        )


def read_record(proto: Any, where: str = "ONNX model") -> ModelMeta:
    """The cnnkit record in an ONNX ModelProto's `metadata_props` (read as files are: `record_from_props`)."""
    from cnnkit.runtime.session import record_from_props

    return record_from_props(where, {p.key: p.value for p in proto.metadata_props})


def write_record(proto: Any, record: ModelMeta) -> None:
    """Replace the cnnkit record in `proto.metadata_props` (in place)."""
    for prop in [p for p in proto.metadata_props if p.key == METADATA_KEY]:
        proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, record.to_json()


def opset_of(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def finish(proto: Any, meta: ModelMeta, path: str, batch: int | None = None) -> int:
    """Check a graph (fresh, or derived: int8, fp16) for its batch axis, then write it atomically;
    returns its bytes."""
    _check_graph(proto, meta, batch)
    data = proto.SerializeToString()
    _check_session(data, meta, batch)
    write_bytes(path, data)
    return len(data)


def convert_fp16(src: str, path: str, meta: ModelMeta) -> dict[str, Any]:
    """Convert a cnnkit fp32 ONNX file to float16 weights and activations, for the CUDA provider.

    The conversion is onnxruntime's own (`onnxruntime.transformers.float16`, shipped in both the CPU
    and the GPU wheel) with `keep_io_types=True`: the input stays uint8 (its Cast now goes straight to
    float16; 0..255 are exact in float16) and the output gets a Cast back to float32, so the file keeps
    the cnnkit input/output contract and `cnnkit infer` reads it unchanged.

    Args:
        src: the fp32 model (as written by `export_onnx`).
        path: the file to write.
        meta: the checkpoint's record (checked against the graph's input and output).

    Returns:
        Plain info: format, precision, converter, opset, ir_version, seconds, bytes.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    t0 = time.perf_counter()
    proto = onnx.load(src)
    record = read_record(proto)
    with quiet():
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    export_info = dict(record.extra.get("export", {}))
    export_info.update(
        {
            "precision": "fp16",
            "opset": opset_of(half),
            "ir_version": int(half.ir_version),
            "fp16": {
                "converter": "onnxruntime.transformers.float16",
                "keep_io_types": True,
                "onnxruntime": ort.__version__,
            },
        }
    )
    write_record(half, record.replace(extra={**record.extra, "export": export_info}))
    size = finish(half, meta, path)
    return {
        "format": "onnx",
        "precision": "fp16",
        "converter": "onnxruntime.transformers.float16 (keep_io_types)",
        "opset": export_info["opset"],
        "ir_version": export_info["ir_version"],
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes": size,
    }
