"""Static INT8 quantization of a cnnkit ONNX model, gated on top-1 accuracy instead of output parity.

How (onnxruntime's own tooling, `onnxruntime.quantization`):
  1. `quant_pre_process`: symbolic shape inference and onnxruntime's basic graph optimizations (it
     folds BatchNorm into the convolutions, so the folded weights are what gets quantized).
  2. `quantize_static` in QDQ format: QuantizeLinear/DequantizeLinear pairs around each Conv/Gemm
     (onnxruntime fuses them into integer kernels when it loads the file), int8 weights per output
     channel, uint8 activations with MinMax ranges calibrated on training images.
  3. The uint8 input and the `/ 255` scaling stay float (Cast + Div are not quantizable ops), so the
     file keeps the cnnkit input contract. The scaled input is then quantized with scale 1/255 and
     zero point 0, fixed rather than calibrated: that maps every pixel back to itself, so the input
     loses nothing whatever range the calibration images happen to cover.
  4. The head's output (the Gemm producing logits, and a sigmoid after it) stays float: a uint8 logit
     has steps of ~0.1-0.2, which would turn close calls into argmax ties.

Speed depends on the CPU, so the gate measures it rather than promising one. onnxruntime fuses the QDQ
graph fully (QLinearConv, NhwcMaxPool, QGemm), whose speed rests on integer dot-product instructions
(VNNI, AMX, ARM dot-product); the first conv has one input channel, so its GEMM is only 9 deep and
gains least. Keeping that conv (and its pooling) float does not help: onnxruntime's QDQ propagation
then moves the QuantizeLinear above the first MaxPool, which runs as a slow NCHW uint8 MaxPool. So
everything is quantized.

The gate (`accuracy_gate`): fp32 and int8 files run on the CPU provider (`cnnkit.runtime`'s session,
the one `cnnkit infer` uses) over the labeled testing split; the int8 top-1 accuracy may be at most
`max_drop` points below the fp32 one. Argmax agreement, file sizes and images/s (same batch size,
same process, alternating runs, one intra-op thread: how `cnnkit infer` runs the model beside its
decoder processes, and steadier than all cores on a shared machine) are reported alongside; they
inform, the accuracy decides.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cnnkit.console import log
from cnnkit.errors import CnnkitError, ModelError
from cnnkit.export.onnx import finish, opset_of, quiet, read_record, write_record
from cnnkit.meta import ModelMeta, check_speed, predict

DEFAULT_CALIBRATION_SIZE = 1024  # training images for the activation ranges (the quick check)
DEFAULT_MAX_ACCURACY_DROP = 0.5  # points of top-1 accuracy, int8 vs fp32
DEFAULT_EVAL_LIMIT = 10_000  # testing images for the gate (all of MNIST's / Fashion-MNIST's test split)
SPEED_BATCH = 256  # `cnnkit infer`'s default batch size
SPEED_ROUNDS = 3
SPEED_IMAGES = 4096  # at most this many of the gate's images in the speed rounds after the first
SPEED_THREADS = 1
CALIBRATION_BATCH = 64
HEAD_OPS = ("Gemm", "MatMul", "Sigmoid")  # ops whose outputs stay float (see the module docstring)


@dataclass
class AccuracyGate:
    """The INT8 accuracy gate's numbers.

    Attributes:
        n_images: labeled testing images compared.
        data: the folder they came from.
        fp32_accuracy / int8_accuracy: top-1 accuracy (0..1) of each file.
        drop_points: (fp32 - int8) accuracy in percentage points (negative: int8 did better).
        max_drop_points: the limit.
        argmax_agreement: share of images where both files predict the same class.
        max_abs_diff: largest |int8 - fp32| output difference (information, not gated).
        fp32_bytes / int8_bytes / size_ratio: file sizes.
        fp32_images_per_second / int8_images_per_second / speedup: CPU provider, batch `batch_size`.
        batch_size: the batch size of the speed runs.
        threads: onnxruntime intra-op threads in the speed runs.
        passed: drop_points <= max_drop_points.
        isa_class: this CPU's INT8 ISA class (`cnnkit.cpu.isa_class`), where the speeds were measured.
        cpu: this CPU's model name.
    """

    n_images: int
    data: str
    fp32_accuracy: float
    int8_accuracy: float
    drop_points: float
    max_drop_points: float
    argmax_agreement: float
    max_abs_diff: float
    fp32_bytes: int
    int8_bytes: int
    size_ratio: float
    fp32_images_per_second: float
    int8_images_per_second: float
    speedup: float
    batch_size: int
    threads: int
    passed: bool
    isa_class: str = "unknown"
    cpu: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def speed_record(self) -> dict[str, Any]:
        """The record `cnnkit infer --precision auto` reads (`cnnkit.meta.int8_speed`): the measured
        int8/fp32 model-only speedup and the CPU it holds for."""
        return {"int8_speedup": self.speedup, "isa_class": self.isa_class, "cpu": self.cpu, "threads": self.threads}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"int8 accuracy gate {verdict}: top-1 {self.int8_accuracy:.2%} vs fp32 {self.fp32_accuracy:.2%} "
            f"(drop {self.drop_points:+.2f} points, limit {self.max_drop_points:g}) on {self.n_images} images, "
            f"argmax agreement {self.argmax_agreement:.2%}; size {self.int8_bytes:,} vs {self.fp32_bytes:,} bytes "
            f"({self.size_ratio:.0%}); CPU provider, {self.threads} thread(s), batch {self.batch_size}: "
            f"{self.int8_images_per_second:,.0f} vs {self.fp32_images_per_second:,.0f} img/s "
            f"({self.speedup:.2f}x on {self.isa_class}, {self.cpu})"
        )


def check_options(calibration_size: int, max_drop: float, eval_limit: int) -> None:
    if calibration_size < 1:
        raise CnnkitError(f"--calibration-size must be at least 1, got {calibration_size}")
    if not 0 <= max_drop <= 100:  # also refuses NaN
        raise CnnkitError(f"--max-accuracy-drop is in accuracy points (0 to 100), got {max_drop}")
    if eval_limit < 1:
        raise CnnkitError(f"the accuracy gate needs at least one image, got a limit of {eval_limit}")


def _scaled_input(proto: Any) -> str | None:
    """The tensor holding the scaled input: graph input -> Cast -> Div (or Mul), else None."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tensor = proto.graph.input[0].name
    for ops in (("Cast",), ("Div", "Mul")):
        nodes = consumers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            return None
        tensor = nodes[0].output[0]
    return tensor


class _Reader:
    """`CalibrationDataReader` protocol: feeds uint8 batches under the graph's input name."""

    def __init__(self, name: str, images: np.ndarray):
        step = CALIBRATION_BATCH
        self.batches = iter([{name: images[i : i + step]} for i in range(0, len(images), step)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _run_quantizer(src: str, path: str, calibration: np.ndarray) -> tuple[Any, str | None]:
    """onnxruntime's static QDQ quantizer on `src`, in a work folder beside `path`: (the int8 graph,
    the scaled input tensor whose quantization was fixed to 1/255, or None)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix=".cnnkit-int8-", dir=os.path.dirname(os.path.abspath(path))) as work:
        pre, out = os.path.join(work, "pre.onnx"), os.path.join(work, "int8.onnx")
        try:
            with quiet():
                quant_pre_process(src, pre)
                pre_proto = onnx.load(pre)
                scaled = _scaled_input(pre_proto)
                overrides = {}
                if scaled is not None:  # exact: pixel p -> p / 255 -> quantized back to p
                    overrides[scaled] = [
                        {"scale": np.array(1 / 255, dtype=np.float32), "zero_point": np.array(0, dtype=np.uint8)}
                    ]
                quantize_static(
                    pre,
                    out,
                    _Reader(pre_proto.graph.input[0].name, calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={
                        "OpTypesToExcludeOutputQuantization": list(HEAD_OPS),
                        "TensorQuantOverrides": overrides,
                    },
                )
        except Exception as e:  # the quantizer raises plain Exceptions and onnxruntime Fails
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"onnxruntime could not quantize the model: {first}") from None
        proto = onnx.load(out)
    return proto, scaled


def quantize_int8(
    src: str, path: str, meta: ModelMeta, calibration: np.ndarray, calibration_data: str
) -> dict[str, Any]:
    """Quantize the fp32 cnnkit model `src` to a QDQ int8 file at `path` (written atomically).

    Args:
        src: the fp32 ONNX file (as written by `export_onnx`).
        path: the file to write.
        meta: the checkpoint's record (checked against the graph's input and output).
        calibration: uint8 (N, C, H, W) training images for the activation ranges.
        calibration_data: the folder they came from (recorded).

    Returns:
        Plain info, also recorded as `extra["export"]["quantization"]` in the file's record.

    Raises:
        ModelError: the quantizer fails or writes a graph that breaks the cnnkit contract.
    """
    import onnxruntime as ort

    t0 = time.perf_counter()
    proto, scaled = _run_quantizer(src, path, calibration)
    _drop_unused_domains(proto)
    n_q = sum(node.op_type == "QuantizeLinear" for node in proto.graph.node)
    quantized = sorted({node.op_type for node in proto.graph.node if _consumes_dq(node, proto)})
    info = {
        "method": "static",
        "format": "QDQ",
        "per_channel": True,
        "weights": "int8",
        "activations": "uint8",
        "calibration": {"method": "MinMax", "n_images": int(len(calibration)), "data": calibration_data},
        "input_scale": "1/255, zero point 0 (fixed)" if scaled is not None else "calibrated",
        "float_outputs_of": list(HEAD_OPS),
        "quantized_ops": quantized,
        "quantize_nodes": n_q,
        "preprocess": "onnxruntime.quantization.shape_inference.quant_pre_process",
        "onnxruntime": ort.__version__,
    }
    set_quantization_record(proto, info)
    size = finish(proto, meta, path)
    return {
        **info,
        "opset": opset_of(proto),
        "ir_version": int(proto.ir_version),
        "bytes": size,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def set_quantization_record(proto: Any, quantization: dict[str, Any]) -> None:
    """Record precision, opset, IR version and the quantization details in the file's cnnkit record."""
    record = read_record(proto)
    export_info = dict(record.extra.get("export", {}))
    export_info.update(
        {
            "precision": "int8",
            "opset": opset_of(proto),
            "ir_version": int(proto.ir_version),
            "quantization": quantization,
        }
    )
    write_record(proto, record.replace(extra={**record.extra, "export": export_info}))


def record_gate(path: str, meta: ModelMeta, gate: AccuracyGate) -> None:
    """Add the accuracy gate's numbers to the quantized file's record (rewritten atomically)."""
    import onnx

    proto = onnx.load(path)
    quantization = dict(read_record(proto).extra["export"]["quantization"])
    keys = ("n_images", "data", "fp32_accuracy", "int8_accuracy", "drop_points", "max_drop_points", "argmax_agreement")
    quantization["accuracy_gate"] = {**{k: getattr(gate, k) for k in keys}, "passed": gate.passed}
    quantization["speed"] = check_speed(gate.speed_record())
    set_quantization_record(proto, quantization)
    finish(proto, meta, path)


def _consumes_dq(node: Any, proto: Any) -> bool:
    """A compute node fed by a DequantizeLinear (what onnxruntime turns into an integer kernel)."""
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return False
    dq_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return any(name in dq_outputs for name in node.input)


def _drop_unused_domains(proto: Any) -> None:
    """Keep only the opset imports the graph uses.

    `quant_pre_process` saves the model through onnxruntime's optimizer, which declares every domain it
    knows (ai.onnx.ml, training, com.microsoft, ...); an older runtime on a small device may refuse a
    file that merely declares a domain version it lacks.
    """
    used = {node.domain or "" for node in proto.graph.node}
    keep = [o for o in proto.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def _outputs(session: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    outs = [session.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(outs).astype(np.float32), time.perf_counter() - t0


def _fastest_seconds(sessions: dict[str, Any], images: np.ndarray, batch_size: int) -> dict[str, float]:
    """Each session's fastest of SPEED_ROUNDS runs over `images`, in seconds.

    The sessions alternate, so that on a shared machine a burst of load from elsewhere hits them
    alike instead of one.
    """
    best = {name: float("inf") for name in sessions}
    for _ in range(SPEED_ROUNDS):
        for name, session in sessions.items():
            best[name] = min(best[name], _outputs(session, images, batch_size)[1])
    return best


def accuracy_gate(
    fp32: str,
    int8: str,
    images: np.ndarray,
    labels: np.ndarray,
    meta: ModelMeta,
    max_drop: float,
    data: str = "",
    batch_size: int = SPEED_BATCH,
) -> AccuracyGate:
    """Compare the int8 file with the fp32 one on labeled images (CPU provider).

    Args:
        fp32, int8: the two ONNX files; images, labels: uint8 (N, C, H, W) and their int64 classes.
        meta: the model's record (output kind); max_drop: the accuracy points int8 may lose.
        data: the folder the images came from (reported); batch_size: of all runs (accuracy and speed).

    Returns:
        The gate's numbers; `passed` says whether it holds.
    """
    import cnnkit.cpu as cpu
    from cnnkit.runtime.session import create_session

    files = {"fp32": fp32, "int8": int8}
    sessions = {name: create_session(p, device="cpu", threads=SPEED_THREADS) for name, p in files.items()}
    outs = {name: _outputs(session, images, batch_size)[0] for name, session in sessions.items()}
    timed = images[:SPEED_IMAGES]
    best = _fastest_seconds(sessions, timed, batch_size)
    pred = {name: predict(out, meta.output)[0] for name, out in outs.items()}
    acc = {name: float((p == labels).mean()) for name, p in pred.items()}
    diff = np.abs(outs["int8"].astype(np.float64) - outs["fp32"])
    drop = round((acc["fp32"] - acc["int8"]) * 100, 6)  # rounded: 0.5 - 0.0 must not read 0.5000000001
    sizes = {name: os.path.getsize(p) for name, p in files.items()}
    speed = {name: len(timed) / s for name, s in best.items()}
    max_abs = float("nan") if np.isnan(diff).any() else float(diff.max())
    gate = AccuracyGate(
        n_images=len(images),
        data=data,
        fp32_accuracy=acc["fp32"],
        int8_accuracy=acc["int8"],
        drop_points=drop,
        max_drop_points=float(max_drop),
        argmax_agreement=float((pred["fp32"] == pred["int8"]).mean()),
        max_abs_diff=max_abs,
        fp32_bytes=sizes["fp32"],
        int8_bytes=sizes["int8"],
        size_ratio=sizes["int8"] / sizes["fp32"],
        fp32_images_per_second=round(speed["fp32"], 1),
        int8_images_per_second=round(speed["int8"], 1),
        speedup=round(speed["int8"] / speed["fp32"], 3),
        batch_size=batch_size,
        threads=SPEED_THREADS,
        passed=bool(drop <= max_drop and not np.isnan(max_abs)),
        isa_class=cpu.isa_class(),
        cpu=cpu.cpu_info().model,
    )
    log(f"export: {gate.summary()}")
    return gate
