"""An OpenVINO session for a cnnkit ONNX model: the same file and the same `run` as `runtime.session`.

Torch-free (numpy + openvino, imported inside the functions that need it). OpenVINO reads the ONNX
file directly, the fp32 one and the INT8 QDQ one alike. Settings, each set explicitly and recorded
(`OpenVINOSession.config`, shown by `cnnkit infer --json` as `backend_config`):
  - `INFERENCE_PRECISION_HINT = f32`: on CPUs with AVX512-BF16 or AMX the CPU plugin's default is
    bf16, which silently moves fp32 outputs by ~0.1-0.4 and flips predictions (docs/infer.md).
    cnnkit never runs a file at a precision it was not exported at, so the hint is always f32 (an
    INT8 file keeps its int8 ops; only the ops between them are float, and those stay f32).
  - `PERFORMANCE_HINT = LATENCY`: cnnkit sends one batch at a time from one thread, the case the
    LATENCY hint is for (one stream); THROUGHPUT makes several streams that only parallel requests fill.
  - `INFERENCE_NUM_THREADS`: the caller's `threads` (1 while decoder processes use the other cores), or
    OpenVINO's own default when None; `ENABLE_CPU_PINNING = False` so that its threads do not hold
    cores the decoders need (as onnxruntime's no-spinning setting in `runtime.session`).
  - Dynamic batch: the model is compiled once with its dynamic batch axis; any batch size runs without
    a recompile (a static reshape to the batch size was not clearly faster, and the ragged last batch
    would need a second compile; scripts/bench_infer.py).
Only OpenVINO's CPU device is used: `device` must be `cpu` or `auto`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit.devices import parse_device
from cnnkit.errors import DeviceError, ModelError
from cnnkit.meta import OUTPUT_SIGMOID, ModelMeta
from cnnkit.runtime.session import read_meta, run_fixed

BACKEND = "openvino"
INSTALL_HINT = "pip install 'cnnkit[openvino]'"
PRECISION_HINT = "f32"
PERFORMANCE_HINT = "LATENCY"


def import_openvino() -> Any:
    """The `openvino` module, or a one-line `DeviceError` saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise DeviceError(f"backend openvino: the openvino package is not installed ({e}); {INSTALL_HINT}") from None
    return openvino


def openvino_version() -> str:
    """The installed openvino's version (`openvino.__version__` without its build suffix)."""
    return str(import_openvino().__version__).split("-")[0]


@dataclass
class OpenVINOSession:
    """A compiled OpenVINO model with the interface of `runtime.session.Session`.

    Attributes:
        path, meta, threads, notes: as `Session`.
        provider: `OpenVINO CPU`, the device that runs it.
        precision: `fp32`, `int8` or `fp16`: what the file holds (`model_precision`), for the parity tier.
        config: the compile properties as set, and the openvino version.
    """

    path: str
    meta: ModelMeta
    provider: str
    threads: int | None
    precision: str
    config: dict[str, Any]
    compiled: Any = field(repr=False)
    notes: list[str] = field(default_factory=list)
    backend: str = BACKEND
    batch: int | None = None  # a fixed-batch file's batch size (`cnnkit export --batch N`): runs padded

    def __post_init__(self) -> None:
        # One infer request, reused (its buffers stay allocated); a request is not thread-safe, so
        # callers from several threads (`Predictor`) take turns.
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs (float32, (N, K)) for a uint8 batch of shape (N, C, H, W) or (N, H, W) (1 channel)."""
        if batch.ndim == 3:
            batch = batch[:, None]
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self.batch is not None:
            return run_fixed(self._infer, batch, self.batch)
        return self._infer(batch)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self._request.infer({0: batch}, share_inputs=True)[0]
            return np.array(out, dtype=np.float32, copy=True)  # the request reuses its output buffer


def model_precision(model: Any) -> str:
    """`int8` for a QDQ file (OpenVINO reads its Q/DQ pairs as FakeQuantize or int8 constants),
    `fp16` for float16 weights, else `fp32`."""
    kinds = set()
    for op in model.get_ordered_ops():
        name = op.get_type_name()
        if name == "FakeQuantize":
            kinds.add("int8")
        elif name == "Constant":
            et = op.get_output_element_type(0).get_type_name()
            kinds.add({"i8": "int8", "u8": "int8", "f16": "fp16"}.get(et, ""))
    return "int8" if "int8" in kinds else "fp16" if "fp16" in kinds else "fp32"


def _compile_config(ov: Any, threads: int | None) -> tuple[dict[Any, Any], dict[str, Any]]:
    """(properties for `compile_model`, the same as plain JSON)."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    config: dict[Any, Any] = {
        hints.inference_precision: ov.Type.f32,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.enable_cpu_pinning: False,
    }
    if threads is not None:
        config[props.inference_num_threads] = max(1, int(threads))
    record = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINT,
        "PERFORMANCE_HINT": PERFORMANCE_HINT,
        "INFERENCE_NUM_THREADS": None if threads is None else max(1, int(threads)),
        "ENABLE_CPU_PINNING": False,
    }
    return config, record


def _check_io(path: str, meta: ModelMeta, model: Any) -> None:
    """The graph takes one uint8 [batch, C, H, W] input and gives [batch, K] (`read_meta` checked the rest)."""
    if len(model.inputs) != 1 or len(model.outputs) < 1:
        raise ModelError(
            f"{path}: expected one input and an output, found {len(model.inputs)} and {len(model.outputs)}"
        )
    width = 1 if meta.output == OUTPUT_SIGMOID else meta.num_classes
    shape = model.outputs[0].get_partial_shape()
    if shape.rank.get_length() != 2 or (shape[1].is_static and shape[1].get_length() != width):
        raise ModelError(f"{path}: output has shape {shape}, expected [batch, {width}]")


def create_openvino_session(path: str, device: str = "auto", threads: int | None = None) -> OpenVINOSession:
    """Compile an ONNX model exported by cnnkit for OpenVINO's CPU device (settings: module docstring).

    Raises:
        ModelError: as `create_session`, or a file OpenVINO cannot read or compile.
        DeviceError: openvino not installed, or a device other than `cpu`/`auto`.
    """
    meta = read_meta(path)
    spec = parse_device(device)
    if spec.kind == "cuda":
        raise DeviceError(
            f"device {spec}: the openvino backend runs on the CPU only; use --backend onnxruntime for CUDA"
        )
    ov = import_openvino()
    config, record = _compile_config(ov, threads)
    try:
        core = ov.Core()
        model = core.read_model(path)
        _check_io(path, meta, model)
        precision = model_precision(model)
        compiled = core.compile_model(model, "CPU", config)
    except ModelError:
        raise
    except Exception as e:  # openvino raises RuntimeError (and its own types) with multi-line messages
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path}: openvino cannot load it: {first}") from None
    record["openvino"] = openvino_version()
    record["file_precision"] = precision
    first = compiled.input(0).get_partial_shape()[0]
    batch = first.get_length() if first.is_static else None
    return OpenVINOSession(path, meta, "OpenVINO CPU", threads, precision, record, compiled, batch=batch)
