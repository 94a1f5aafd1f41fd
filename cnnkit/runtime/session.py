"""An onnxruntime session for a cnnkit model: provider chosen once, metadata and input checked up front.

Torch-free by design (numpy + onnxruntime only); `onnxruntime` is imported inside the functions that
need it, so importing this module costs nothing and a bad model file fails before the runtime loads.

Device policy (the one place where `auto|cpu|cuda` becomes an execution provider):
  - `cpu`: CPUExecutionProvider.
  - `cuda`: CUDAExecutionProvider, and an error if it does not actually run. onnxruntime-gpu lists
    the CUDA provider even where its libraries cannot load and then silently runs on the CPU, so the
    check is on `session.get_providers()` after creation, not on `get_available_providers()`.
  - `auto`: CUDA when this onnxruntime build has the provider and it loads, else the CPU.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit.devices import DeviceSpec, parse_device
from cnnkit.errors import DeviceError, ModelError
from cnnkit.files import check_model_file
from cnnkit.meta import METADATA_KEY, OUTPUT_SIGMOID, ModelMeta

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU_SLICE = 64  # images per onnxruntime call on the CPU provider (see `Session.run`)
MAX_FIXED_BATCH = 4096  # the largest fixed batch axis a model may have (`cnnkit export --batch`)


# --------------------------------------------------------------------------------------------
# Reading the metadata record without onnxruntime


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: Any, pos: int, end: int) -> Any:
    """(field number, wire type, value) of a serialized protobuf message; for length-delimited fields
    the value is its (start, end) in `buf`, never copied."""
    while pos < end:
        tag, pos = _varint(buf, pos)
        fnum, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            value, pos = None, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated field")
            value, pos = (pos, pos + n), pos + n  # type: ignore[assignment]  # a span, for wire type 2
        else:
            raise ValueError(f"unexpected wire type {wire}")
        yield fnum, wire, value
    if pos != end:
        raise ValueError("truncated message")


def _sub(buf: Any, span: tuple[int, int], fnum: int) -> list[Any]:
    """The values of field `fnum` in the message at `span`."""
    return [v for f, _, v in _fields(buf, *span) if f == fnum]


def external_data_files(path: str) -> list[str]:
    """The files an ONNX model keeps weights in beside it (TensorProto.external_data "location"): inputs
    of a command as much as the model file itself, so never an output.

    GraphProto: initializer = 5; TensorProto: external_data = 13 (StringStringEntryProto: key = 1,
    value = 2). A file this cannot parse gives [] (`read_meta` reports it).
    """
    found: set[str] = set()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for graph in (v for fnum, wire, v in _fields(buf, 0, len(buf)) if fnum == 7 and wire == 2):
                for tensor in _sub(buf, graph, 5):
                    for entry in _sub(buf, tensor, 13):
                        kv = {
                            k: bytes(buf[v[0] : v[1]]).decode("utf-8", "replace")
                            for k, wire, v in _fields(buf, *entry)
                            if wire == 2
                        }
                        if kv.get(1) == "location" and 2 in kv:
                            found.add(os.path.join(os.path.dirname(os.path.abspath(path)), kv[2]))
    except (ValueError, IndexError, TypeError, OSError):
        return []
    return sorted(found)


def _graph_inputs(buf: Any, graph: tuple[int, int]) -> list[tuple[str, int | None, list[int | str | None]]]:
    """(name, element type, dims) of the graph's real inputs (those without an initializer).

    GraphProto: input = 11 (ValueInfoProto: name = 1, type = 2), initializer = 5 (TensorProto: name =
    8); TypeProto: tensor_type = 1 (elem_type = 1, shape = 2); TensorShapeProto: dim = 1 (dim_value =
    1, dim_param = 2). Node and weight bytes are skipped by their length.
    """

    def text(span: tuple[int, int]) -> str:
        return bytes(buf[span[0] : span[1]]).decode("utf-8")

    inputs: list[tuple[str, Any, list[Any]]] = []
    weights: set[str] = set()
    for fnum, wire, value in _fields(buf, *graph):
        if wire != 2:
            continue
        if fnum == 5:
            weights.update(text(v) for v in _sub(buf, value, 8))
        elif fnum == 11:
            name = "".join(text(v) for v in _sub(buf, value, 1))
            elem = None
            dims: list[Any] = []
            for tensor in (t for typ in _sub(buf, value, 2) for t in _sub(buf, typ, 1)):
                elem = next(iter(_sub(buf, tensor, 1)), None)
                for shape in _sub(buf, tensor, 2):
                    for dim in _sub(buf, shape, 1):
                        d = dict((f, v) for f, _, v in _fields(buf, *dim))
                        dims.append(d[1] if 1 in d else text(d[2]) if 2 in d else None)
            inputs.append((name, elem, dims))
    return [i for i in inputs if i[0] not in weights]


def _metadata_props(buf: Any) -> dict[str, str]:
    """`ModelProto.metadata_props` (field 14) from serialized ONNX, skipping everything else.

    A dozen lines of protobuf wire format instead of the `onnx` package, which the runtime must not
    import; the graph (field 7) is skipped by its length, never parsed.
    """
    props: dict[str, str] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        fnum, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated field")
            if fnum == 14:  # StringStringEntryProto {key = 1, value = 2}
                entry = {1: "", 2: ""}
                p, e = pos, pos + n
                while p < e:
                    t, p = _varint(buf, p)
                    if t & 7 != 2:
                        raise ValueError("unexpected wire type in metadata entry")
                    m, p = _varint(buf, p)
                    entry[t >> 3] = bytes(buf[p : p + m]).decode("utf-8")
                    p += m
                props[entry[1]] = entry[2]
            pos += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    if pos != end:
        raise ValueError("truncated model")
    return props


def read_meta(path: str) -> ModelMeta:
    """The cnnkit record of an ONNX model, read without onnxruntime (cheap, and safe before forking).

    The graph's input is checked against the record here too (uint8, [batch, C, H, W], a dynamic
    batch axis), so that a model that cannot run fails before any image is read; `create_session`
    checks it again with onnxruntime.

    Raises:
        ModelError: the file is missing, is not ONNX, carries no valid cnnkit record, or its input
            does not match the record.
    """
    check_model_file(path, "model file", "export one with `cnnkit export --format onnx`")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            props = _metadata_props(buf)
            graphs = [v for fnum, wire, v in _fields(buf, 0, len(buf)) if fnum == 7 and wire == 2]
            inputs = _graph_inputs(buf, graphs[0]) if graphs else []
    except (ValueError, IndexError, UnicodeDecodeError, OSError) as e:
        raise ModelError(f"{path}: not a readable ONNX model ({e})") from None
    meta = record_from_props(path, props)
    if len(inputs) == 1:  # anything else is left to onnxruntime's own check in `create_session`
        name, elem, dims = inputs[0]
        problem = _input_problem(path, meta, name, "tensor(uint8)" if elem == 2 else f"element type {elem}", dims)
        if problem:
            raise ModelError(problem)
    return meta


def record_from_props(path: str, props: dict[str, str]) -> ModelMeta:
    """The cnnkit record among an ONNX model's `metadata_props` (as a dict): the one place that turns
    them into a `ModelMeta`, for files (`read_meta`) and for models in memory (`cnnkit.export.onnx`).

    Raises:
        ModelError: no record, or one that is not valid (`ModelMeta.from_json`), naming `path`.
    """
    text = props.get(METADATA_KEY)
    if text is None:
        raise ModelError(
            f"{path}: ONNX model without a {METADATA_KEY!r} metadata record; export it with "
            "`cnnkit export --format onnx` so it carries its classes and input shape"
        )
    try:
        return ModelMeta.from_json(text)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------
# The session


@dataclass
class Session:
    """A checked onnxruntime session.

    Attributes:
        path: the model file.
        meta: its cnnkit record.
        provider: the execution provider that actually runs it.
        input_name / output_name: the graph's tensor names.
        threads: intra-op threads (CPU provider), None for onnxruntime's default.
        notes: one-line remarks for the user (e.g. why `auto` did not use CUDA).
        cpu_slice: the CPU provider runs larger batches in slices of this many images.
        batch: the model's fixed batch size (`cnnkit export --batch N`), None for a dynamic batch axis;
            `run` then feeds it exactly N images per call, padding the last call.
    """

    path: str
    meta: ModelMeta
    provider: str
    input_name: str
    output_name: str
    threads: int | None
    ort_session: Any = field(repr=False)
    notes: list[str] = field(default_factory=list)
    cpu_slice: int = CPU_SLICE
    device_id: int = 0  # the GPU, when `provider` is CUDA
    batch: int | None = None
    backend: str = "onnxruntime"  # as `runtime.backends.BACKENDS`

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs for a uint8 batch of shape (N, C, H, W) or (N, H, W) (1 channel), any N."""
        if batch.ndim == 3:
            batch = batch[:, None]
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self.batch is not None:
            one = self._run_cuda if self.provider == CUDA else self._run_once
            return run_fixed(one, batch, self.batch)
        if self.provider == CUDA:
            return self._run_cuda(batch)
        n, step = len(batch), self.cpu_slice
        if n <= step:
            return self._run_once(batch)
        # Cache-sized slices: the lecture CNN costs 11 us per image in runs of 64 (its conv
        # activations, 2.4 MB, stay in L2/L3) and 17 us in runs of 256 or more, on one core.
        return np.concatenate([self._run_once(batch[i : i + step]) for i in range(0, n, step)])

    def _run_once(self, batch: np.ndarray) -> np.ndarray:
        return self.ort_session.run([self.output_name], {self.input_name: batch})[0]

    def _run_cuda(self, batch: np.ndarray) -> np.ndarray:
        # IOBinding, the CUDA pattern onnxruntime documents: the output is bound on the device and
        # copied back once, explicitly. The input comes from host memory (the decoders), so it is
        # bound as a CPU input and onnxruntime copies it over (uint8: 4x fewer bytes than float).
        # Outputs are (N, K) floats, too small for a pinned buffer to matter. Not measured: the
        # tuning machine has no GPU.
        binding = self.ort_session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        self.ort_session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _cuda_fix() -> str:
    """Why CUDA is not usable and what to do, in one clause (only called on the error path)."""
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        return (
            "both onnxruntime and onnxruntime-gpu are installed, and they overwrite each other's "
            "files; `pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'cnnkit[gpu]'`"
        )
    if not _installed("onnxruntime-gpu"):
        return (
            "this is the CPU build of onnxruntime; install onnxruntime-gpu instead of it (never both): "
            "`pip uninstall -y onnxruntime && pip install 'cnnkit[gpu]'`"
        )
    return (
        "onnxruntime-gpu is installed but its CUDA provider did not load (no GPU, or the CUDA 13 / "
        "cuDNN 9 libraries are missing: `pip install 'onnxruntime-gpu[cuda,cudnn]'`; check `nvidia-smi`)"
    )


_PRELOAD: list[str] = []  # what onnxruntime printed while loading the CUDA libraries (once per process)


def load_cuda_libraries(ort: Any) -> str:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's CUDA provider links against.

    The provider library has no search path of its own: without this (or an `import torch` first),
    the pip packages `nvidia-*-cu13` that `onnxruntime-gpu[cuda,cudnn]` installs are not found and the
    session falls back to the CPU. `ort.preload_dlls()` (onnxruntime >= 1.21) looks in those packages
    first; it prints to stdout, which `--json` owns, so its messages are kept and returned instead.
    A CPU build of onnxruntime makes this a no-op.
    """
    if not _PRELOAD and hasattr(ort, "preload_dlls"):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                ort.preload_dlls()
        except Exception as e:  # a bad `directory` or a loader error: the session's check still decides
            buf.write(f"{type(e).__name__}: {e}")
        _PRELOAD.append(" ".join(buf.getvalue().split())[:500])
    return _PRELOAD[0] if _PRELOAD else ""


def quiet_session(ort: Any, model: Any, **kwargs: Any) -> tuple[Any, str]:
    """`ort.InferenceSession(model, **kwargs)` and what onnxruntime printed while creating it.

    When a provider fails to initialise, onnxruntime prints an "EP Error" banner to stdout and retries
    on its fallback providers; `--json` owns stdout, so the banner is kept here for the caller's
    message instead. Whether the fallback happened is for the caller to check (`get_providers()`).
    """
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        sess = ort.InferenceSession(model, **kwargs)
    said = " ".join(ln for ln in buf.getvalue().split("\n") if ln.strip() and not ln.startswith("****"))
    return sess, " ".join(said.split())[:500]


def runs_on_cuda(sess: Any) -> bool:
    """Whether the CUDA provider really runs `sess`: onnxruntime-gpu lists it, then falls back to the
    CPU without an error when its libraries do not load, so only the session can tell."""
    return CUDA in sess.get_providers()


def _loader_said() -> str:
    said = _PRELOAD[0] if _PRELOAD else ""
    return f" (loading the CUDA libraries said: {said})" if said else ""


def provider_list(device: str | DeviceSpec, ort: Any) -> list[Any]:
    """The providers to ask onnxruntime for: the CUDA provider on GPU `cuda:N` (`device_id` N; 0 for
    `cuda` and `auto`) with the CPU provider behind it, or the CPU provider alone.

    Raises:
        DeviceError: an unknown device name, or `cuda[:N]` with no CUDA provider compiled in.
    """
    spec = parse_device(device)
    available = ort.get_available_providers()
    if spec.kind == "cuda" and CUDA not in available:
        raise DeviceError(f"device {spec}: no CUDA provider in onnxruntime {ort.__version__}: {_cuda_fix()}")
    if spec.kind == "cuda" or (spec.kind == "auto" and CUDA in available):
        load_cuda_libraries(ort)
        # HEURISTIC: no per-shape cuDNN benchmark, which the ragged last batch would pay again.
        return [(CUDA, {"device_id": spec.cuda_index, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    return [CPU]


def _session_options(ort: Any, threads: int | None) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = max(1, int(threads))
    # Spinning pool threads burn the cores the PNG decoders need between two batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: no warnings about unused initializers and the like
    return so


def _input_problem(path: str, meta: ModelMeta, name: str, type_name: str, shape: list[Any]) -> str | None:
    """Why the graph input `name` cannot take the record's images, or None."""
    if type_name != "tensor(uint8)":
        return f"{path}: input {name!r} is {type_name}, cnnkit models take tensor(uint8)"
    if len(shape) != 4 or shape[1:] != list(meta.input_shape):
        return (
            f"{path}: input {name!r} has shape {shape}, the model record says "
            f"[batch, {', '.join(map(str, meta.input_shape))}]"
        )
    if isinstance(shape[0], int) and not 0 < shape[0] <= MAX_FIXED_BATCH:
        return (
            f"{path}: input {name!r} has batch size {shape[0]}; expected a dynamic batch axis or 1 to {MAX_FIXED_BATCH}"
        )
    return None


def fixed_batch(shape: list[Any]) -> int | None:
    """The batch size a graph input of `shape` is fixed to (`cnnkit export --batch N`), or None when dynamic."""
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def run_fixed(run: Any, batch: np.ndarray, n: int) -> np.ndarray:
    """`run` (one model call) over `batch` in chunks of exactly `n` images, for a model whose batch
    axis is fixed to `n`: the last, partial chunk is padded with zero images whose outputs are dropped."""
    parts = []
    for i in range(0, len(batch), n):
        chunk = batch[i : i + n]
        k = len(chunk)
        if k < n:
            chunk = np.concatenate([chunk, np.zeros((n - k, *chunk.shape[1:]), dtype=chunk.dtype)])
        parts.append(run(chunk)[:k])
    return np.concatenate(parts)


def _check_io(path: str, meta: ModelMeta, sess: Any) -> tuple[str, str]:
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelError(f"{path}: expected one input and an output, found {len(inputs)} and {len(outputs)}")
    inp, out = inputs[0], outputs[0]
    problem = _input_problem(path, meta, inp.name, inp.type, list(inp.shape))
    if problem:
        raise ModelError(problem)
    width = 1 if meta.output == OUTPUT_SIGMOID else meta.num_classes
    oshape = list(out.shape)
    if len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != width):
        raise ModelError(f"{path}: output {out.name!r} has shape {oshape}, expected [batch, {width}]")
    return inp.name, out.name


def create_session(path: str, device: str = "auto", threads: int | None = None) -> Session:
    """Open an ONNX model for inference.

    Args:
        path: the .onnx file (with a cnnkit metadata record).
        device: `auto`, `cpu`, `cuda` or `cuda:N` (see the module docstring).
        threads: intra-op threads for the CPU provider; None lets onnxruntime use one per core.

    Returns:
        A `Session`; `session.provider` is the provider that really runs the model.

    Raises:
        ModelError: missing file, no/malformed metadata, or an input/output that does not match it.
        DeviceError: `cuda` asked for but not available.
    """
    meta = read_meta(path)  # fail on a foreign model before loading onnxruntime
    import onnxruntime as ort

    spec = parse_device(device)
    providers = provider_list(spec, ort)
    try:
        sess, said = quiet_session(ort, path, sess_options=_session_options(ort, threads), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path}: onnxruntime cannot load it: {first}") from None
    on_cuda = runs_on_cuda(sess)
    notes: list[str] = []
    if providers[0] != CPU and not on_cuda:
        if spec.kind == "cuda":
            raise DeviceError(
                f"device {spec}: the CUDA provider did not load: {_cuda_fix()}{_loader_said()}"
                + (f" (onnxruntime said: {said})" if said else "")
            )
        notes.append(f"device auto: the CUDA provider did not load, running on the CPU: {_cuda_fix()}")
    input_name, output_name = _check_io(path, meta, sess)
    provider = CUDA if on_cuda else CPU
    fixed = fixed_batch(list(sess.get_inputs()[0].shape))
    return Session(
        path,
        meta,
        provider,
        input_name,
        output_name,
        threads,
        sess,
        notes,
        device_id=spec.cuda_index if provider == CUDA else 0,
        batch=fixed,
    )
