"""The parity gate: an exported artifact must answer like the eager model, at every batch size.

Both models run over the same uint8 images at each batch size in turn (1, 2, an odd size and all
at once). Batch 1 and the odd size catch graphs that baked in the traced batch size; the last,
partial batch of the odd size catches graphs that only work for one size. Outputs are compared
element-wise (max / mean absolute difference) and as decisions (`cnnkit.meta.predict`, so a sigmoid
output compares as p >= 0.5). The gate passes iff max |diff| <= tolerance and the share of agreeing
decisions reaches `min_agreement` (1.0, every decision, unless a precision tier says otherwise).

Precision tiers (`TIERS`): what "answers like the eager model" means for each kind of artifact.
  - `fp32` (ONNX, TorchScript, pt2 on the CPU): max |diff| <= 1e-4 and 100% argmax agreement. Measured
    differences are ~5e-8 (the same float32 math in another order).
  - `fp16` (`model.fp16.onnx`): max |diff| <= 5e-2 and >= 99.5% argmax agreement. Weights and
    activations keep 11 significant bits (relative step 2^-11 ~ 4.9e-4); logits of the trained models
    reach ~10-20, so a few rounding steps of that size are ~1e-2. Measured (CPU provider, 512 images):
    max |diff| 7.4e-3 for the default model on Fashion-MNIST, 3.1e-3 on the bundled digits, both 100%
    agreement; true fp16 arithmetic on the CUDA provider rounds activations too, hence the 5x margin.
    A logit pair closer than that may swap, hence 99.5%.
  - INT8 is not gated here: its outputs move by design, so `cnnkit.export.quantize` gates it on top-1
    accuracy on the testing split instead.
GPU note (TF32): on CUDA, onnxruntime's CUDA provider runs float32 Conv/MatMul/Gemm in TF32 by
default (10-bit mantissa inputs), which moves logits by ~1e-3, while torch's matmuls do not (and its
cuDNN convolutions do). Every gate that runs on a GPU here (`onnx_runner(path, "cuda")`) turns TF32
off (`use_tf32=0`), and eager references always run in float32 on the CPU, so the tiers above hold
unchanged on a GPU. `cnnkit bench` measures the CUDA provider as `cnnkit infer` runs it (TF32 on) and
shows the resulting difference in its `max_abs_diff` column.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.devices import parse_device
from cnnkit.errors import DeviceError, ParityError
from cnnkit.meta import predict
from cnnkit.runtime.session import fixed_batch, load_cuda_libraries, quiet_session, run_fixed, runs_on_cuda

Runner = Callable[[np.ndarray], np.ndarray]

DEFAULT_BATCH_SIZES = (1, 2, 7, 0)  # 0: all images in one batch
SINGLE_IMAGE_LIMIT = 64  # batch size 1 runs over the first 64 images only (a call per image is slow)


@dataclass(frozen=True)
class Tier:
    """A parity tolerance tier (see the module docstring for where the numbers come from).

    Attributes:
        name: `fp32` or `fp16`.
        max_abs: default largest |artifact - eager| allowed (`--tolerance` overrides it).
        min_agreement: smallest share (0..1) of images on which both pick the same class.
    """

    name: str
    max_abs: float
    min_agreement: float


TIERS = {
    "fp32": Tier("fp32", 1e-4, 1.0),
    "fp16": Tier("fp16", 5e-2, 0.995),
}


@dataclass
class ParityReport:
    """How closely a candidate artifact matched the reference (eager) model.

    Attributes:
        n_images: distinct images compared.
        max_abs_diff: largest |candidate - reference| over all outputs and batch sizes.
        mean_abs_diff: mean |candidate - reference| over all compared outputs.
        argmax_agreement: fraction (0..1) of compared images where both pick the same class.
        passed: max_abs_diff <= tolerance and argmax_agreement >= min_agreement.
        tolerance: the max |diff| allowed.
        batch_sizes: the batch sizes run.
        per_batch_size: one dict per batch size with the same numbers.
        output_kind: `logits` or `sigmoid`.
        seconds: time the comparison took.
        min_agreement: the smallest argmax agreement allowed (1.0: every decision must agree).
        provider: where the candidate ran (`cpu`, or `cuda` for a GPU-gated artifact).
    """

    n_images: int
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    passed: bool
    tolerance: float
    batch_sizes: list[int]
    per_batch_size: list[dict[str, Any]] = field(default_factory=list)
    output_kind: str = ""
    seconds: float = 0.0
    min_agreement: float = 1.0
    provider: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line with the numbers (used in logs and in the ParityError message)."""
        verdict = "passed" if self.passed else "FAILED"
        need = f" (at least {self.min_agreement:.1%})" if self.min_agreement < 1 else ""
        where = f" on {self.provider}" if self.provider != "cpu" else ""
        return (
            f"parity {verdict}: max |diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}), "
            f"mean |diff| {self.mean_abs_diff:.3g}, argmax agreement {self.argmax_agreement:.2%}{need} "
            f"over {self.n_images} images at batch sizes {', '.join(map(str, self.batch_sizes))}{where}"
        )


def _resolve_batch_sizes(batch_sizes: Sequence[int], n: int) -> list[int]:
    sizes: list[int] = []
    for b in batch_sizes:
        b = n if b <= 0 else min(int(b), n)
        if b not in sizes:
            sizes.append(b)
    return sizes


def _run(runner: Runner, images: np.ndarray, batch_size: int, what: str) -> np.ndarray:
    outs = []
    for s in range(0, len(images), batch_size):
        batch = images[s : s + batch_size]
        try:
            out = np.asarray(runner(batch), dtype=np.float32)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ParityError(f"parity: the {what} failed at batch size {len(batch)}: {first}") from e
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ParityError(f"parity: the {what} returned shape {out.shape} for a batch of {len(batch)}")
        outs.append(out)
    return np.concatenate(outs)


def _compare_at(
    reference: Runner, candidate: Runner, images: np.ndarray, b: int, output_kind: str
) -> tuple[dict[str, Any], float, int]:
    """Both runners at batch size `b`: (this size's numbers, the sum of |diff|, how many values)."""
    subset = images[:SINGLE_IMAGE_LIMIT] if b == 1 else images
    ref = _run(reference, subset, b, "reference model")
    cand = _run(candidate, subset, b, "exported model")
    if cand.shape != ref.shape:
        raise ParityError(f"parity: exported model outputs {cand.shape[1:]}, the model {ref.shape[1:]}")
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    # NaN anywhere must fail the gate, and nan <= tol is False: keep it as the max.
    b_max = float(np.nan) if np.isnan(diff).any() else float(diff.max())
    same = int((predict(ref, output_kind)[0] == predict(cand, output_kind)[0]).sum())
    entry = {
        "batch_size": b,
        "n_images": len(subset),
        "max_abs_diff": b_max,
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": same / len(subset),
        "mismatches": len(subset) - same,
    }
    return entry, float(diff.sum()), diff.size


def run_parity(
    reference: Runner,
    candidate: Runner,
    images: np.ndarray,
    output_kind: str,
    max_abs_tol: float,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_agreement: float = 1.0,
    provider: str = "cpu",
) -> ParityReport:
    """Compare `candidate` against `reference` over `images` at several batch sizes.

    Args:
        reference, candidate: uint8 (n, C, H, W) -> float (n, K) outputs: the eager model, the artifact.
        images: uint8 (N, C, H, W).
        output_kind: `logits` or `sigmoid` (how outputs turn into decisions).
        max_abs_tol: the largest |diff| allowed.
        batch_sizes: sizes to run; 0 (or anything >= N) means all images in one batch. Batch size 1
            runs over the first `SINGLE_IMAGE_LIMIT` images only.
        min_agreement: the share of agreeing decisions required (1.0: all; `TIERS[...].min_agreement`).
        provider: where the candidate runs (recorded in the report only).

    Returns:
        The report; `passed` says whether the gate holds. Raises ParityError only when a runner fails
        or returns the wrong shape, so that no numbers can be computed.
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"parity needs uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    t0 = time.perf_counter()
    n = len(images)
    sizes = _resolve_batch_sizes(batch_sizes, n)
    per: list[dict[str, Any]] = []
    max_abs, abs_sum, n_values, agree, n_compared = 0.0, 0.0, 0, 0, 0
    for b in sizes:
        entry, b_sum, b_values = _compare_at(reference, candidate, images, b, output_kind)
        per.append(entry)
        b_max = entry["max_abs_diff"]
        max_abs = b_max if np.isnan(b_max) or np.isnan(max_abs) else max(max_abs, b_max)
        abs_sum += b_sum
        n_values += b_values
        agree += entry["n_images"] - entry["mismatches"]
        n_compared += entry["n_images"]
    agreement = agree / n_compared
    # 1.0 means every decision: compare counts, so that 99.99% can never round up to a pass.
    enough = agree == n_compared if min_agreement >= 1 else agreement >= min_agreement
    return ParityReport(
        n_images=n,
        max_abs_diff=max_abs,
        mean_abs_diff=abs_sum / n_values,
        argmax_agreement=agreement,
        passed=bool(max_abs <= max_abs_tol and enough),
        tolerance=float(max_abs_tol),
        batch_sizes=sizes,
        per_batch_size=per,
        output_kind=output_kind,
        seconds=round(time.perf_counter() - t0, 3),
        min_agreement=float(min_agreement),
        provider=provider,
    )


# --------------------------------------------------------------------------------------------
# Runners: uint8 (n, C, H, W) numpy in, float32 (n, K) numpy out, all on the CPU.


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Run torch's float32 math as IEEE float32: no TF32 (cuDNN convolutions default to it on Ampere
    and later) and no bf16 in oneDNN. The previous settings come back afterwards."""
    import torch

    backends = [
        torch.backends.cudnn.conv,
        torch.backends.cuda.matmul,
        torch.backends.mkldnn,
        torch.backends.mkldnn.conv,
        torch.backends.mkldnn.matmul,
    ]
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, v in zip(backends, saved, strict=True):
            b.fp32_precision = v


def torch_runner(model: Any) -> Runner:
    """The eager model, the gates' reference: eval mode, no grad, on the CPU, in IEEE float32
    (`full_fp32`), so the reference is the same number on every machine."""
    import torch

    model = model.to("cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), full_fp32():
            return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def onnx_runner(path: str, device: str = "cpu") -> Runner:
    """An onnxruntime session on the CPU provider, or on the CUDA provider with TF32 off.

    The provider is named explicitly and checked after creation: onnxruntime-gpu otherwise falls back
    to the CPU silently, and a gate must know where it ran.

    Raises:
        DeviceError: `device="cuda[:N]"` and the CUDA provider is missing or does not load.
    """
    import onnxruntime as ort

    spec = parse_device(device)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; they still raise
    if spec.kind == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError(f"onnxruntime {ort.__version__} has no CUDA provider")
        load_cuda_libraries(ort)
        # TF32 off: see the module docstring (the fp32 parts of a graph would otherwise move ~1e-3).
        options = {"use_tf32": 0, "device_id": spec.cuda_index}
        providers: list[Any] = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session, said = quiet_session(ort, path, sess_options=opts, providers=providers)
    if spec.kind == "cuda" and not runs_on_cuda(session):
        raise DeviceError(
            "the CUDA provider did not load (no GPU, or its CUDA / cuDNN libraries are missing)"
            + (f": {said}" if said else "")
        )
    name = session.get_inputs()[0].name
    fixed = fixed_batch(list(session.get_inputs()[0].shape))

    def once(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x)})[0]

    if fixed is None:
        return once
    # A fixed-batch file (`cnnkit export --batch N`) is fed as `cnnkit infer` feeds it: N at a time, padded.
    return lambda x: run_fixed(once, np.ascontiguousarray(x), fixed)


def torchscript_runner(module: Any) -> Runner:
    """A TorchScript module (as returned by `cnnkit.export.torchscript.load_torchscript`)."""
    import torch

    module = module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def pt2_runner(module: Any) -> Runner:
    """The module of a loaded ExportedProgram (`cnnkit.export.pt2.load_pt2`); it was exported in eval mode."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run
