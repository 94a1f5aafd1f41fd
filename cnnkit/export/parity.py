"""The parity gate: an exported artifact must answer like the eager model, at every batch size.

Both models run over the same uint8 images at each batch size in turn (1, 2, an odd size and all
at once). Batch 1 and the odd size catch graphs that baked in the traced batch size; the last,
partial batch of the odd size catches graphs that only work for one size. Outputs are compared
element-wise (max / mean absolute difference) and as decisions (`cnnkit.meta.predict`, so a sigmoid
output compares as p >= 0.5). The gate passes iff max |diff| <= tolerance and every decision agrees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.errors import ParityError
from cnnkit.meta import predict

Runner = Callable[[np.ndarray], np.ndarray]

DEFAULT_BATCH_SIZES = (1, 2, 7, 0)  # 0: all images in one batch
SINGLE_IMAGE_LIMIT = 64  # batch size 1 runs over the first 64 images only (a call per image is slow)


@dataclass
class ParityReport:
    """How closely a candidate artifact matched the reference (eager) model.

    Attributes:
        n_images: distinct images compared.
        max_abs_diff: largest |candidate - reference| over all outputs and batch sizes.
        mean_abs_diff: mean |candidate - reference| over all compared outputs.
        argmax_agreement: fraction (0..1) of compared images where both pick the same class.
        passed: max_abs_diff <= tolerance and argmax_agreement == 1.
        tolerance: the max |diff| allowed.
        batch_sizes: the batch sizes run.
        per_batch_size: one dict per batch size with the same numbers.
        output_kind: `logits` or `sigmoid`.
        seconds: time the comparison took.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line with the numbers (used in logs and in the ParityError message)."""
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict}: max |diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}), "
            f"mean |diff| {self.mean_abs_diff:.3g}, argmax agreement {self.argmax_agreement:.2%} "
            f"over {self.n_images} images at batch sizes {', '.join(map(str, self.batch_sizes))}"
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


def run_parity(
    reference: Runner,
    candidate: Runner,
    images: np.ndarray,
    output_kind: str,
    max_abs_tol: float,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
) -> ParityReport:
    """Compare `candidate` against `reference` over `images` at several batch sizes.

    Args:
        reference: uint8 (n, 1, H, W) -> float (n, K) outputs; the eager model.
        candidate: the same for the exported artifact.
        images: uint8 (N, 1, H, W).
        output_kind: `logits` or `sigmoid` (how outputs turn into decisions).
        max_abs_tol: the largest |diff| allowed.
        batch_sizes: sizes to run; 0 (or anything >= N) means all images in one batch. Batch size 1
            runs over the first `SINGLE_IMAGE_LIMIT` images only.

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
        subset = images[:SINGLE_IMAGE_LIMIT] if b == 1 else images
        ref = _run(reference, subset, b, "reference model")
        cand = _run(candidate, subset, b, "exported model")
        if cand.shape != ref.shape:
            raise ParityError(f"parity: exported model outputs {cand.shape[1:]}, the model {ref.shape[1:]}")
        diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
        # NaN anywhere must fail the gate, and nan <= tol is False: keep it as the max.
        b_max = float(np.nan) if np.isnan(diff).any() else float(diff.max())
        same = int((predict(ref, output_kind)[0] == predict(cand, output_kind)[0]).sum())
        per.append(
            {
                "batch_size": b,
                "n_images": len(subset),
                "max_abs_diff": b_max,
                "mean_abs_diff": float(diff.mean()),
                "argmax_agreement": same / len(subset),
                "mismatches": len(subset) - same,
            }
        )
        max_abs = b_max if np.isnan(b_max) or np.isnan(max_abs) else max(max_abs, b_max)
        abs_sum += float(diff.sum())
        n_values += diff.size
        agree += same
        n_compared += len(subset)
    agreement = agree / n_compared
    return ParityReport(
        n_images=n,
        max_abs_diff=max_abs,
        mean_abs_diff=abs_sum / n_values,
        argmax_agreement=agreement,
        passed=bool(max_abs <= max_abs_tol and agree == n_compared),
        tolerance=float(max_abs_tol),
        batch_sizes=sizes,
        per_batch_size=per,
        output_kind=output_kind,
        seconds=round(time.perf_counter() - t0, 3),
    )


# --------------------------------------------------------------------------------------------
# Runners: uint8 (n, 1, H, W) numpy in, float32 (n, K) numpy out, all on the CPU.


def torch_runner(model: Any) -> Runner:
    """The eager model (eval mode, no grad, CPU)."""
    import torch

    model = model.to("cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def onnx_runner(path: str) -> Runner:
    """An onnxruntime session on the CPU provider (named explicitly: no silent GPU/CPU mix)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; they still raise
    session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x)})[0]

    return run


def torchscript_runner(module: Any) -> Runner:
    """A TorchScript module (as returned by `cnnkit.export.torchscript.load_torchscript`)."""
    import torch

    module = module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run
