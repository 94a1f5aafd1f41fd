"""One entry point for the runtimes that run cnnkit's ONNX files, and the first-use parity check of a
second runtime against onnxruntime.

Backends: `onnxruntime` (the default, `runtime.session`) and `openvino` (`runtime.openvino`). Both
give a session with `run(uint8 (N, C, H, W)) -> float32 (N, K)`, `provider`, `meta`, `notes`, `backend`.

onnxruntime is the reference every export gate measured, so a model file runs on OpenVINO only after
both answered alike on real images (`check_backend_parity`): the first time a file (by SHA-256) meets
an openvino version, both run on the first `PARITY_IMAGES` decoded images and the verdict is kept in
`$CNNKIT_CACHE/backend-parity/`, reused by later runs. Tiers (by what the file holds):
  - `fp32`: max |diff| <= 1e-4 and every prediction the same, the tolerance of the export gate
    (`cnnkit.export.parity`); OpenVINO at f32 precision is well inside it (docs/infer.md).
  - `int8`: >= 99.5% of predictions the same; |diff| is reported, not gated. Both runtimes run the
    same Q/DQ graph with their own int8 kernels (requantization rounding, u8 x s8 saturation), so a
    logit may move by a quantization step, far above 1e-4; 99.5% keeps the two within the 0.5-point
    accuracy margin that `--quantize int8` gates on.
  - `fp16`: the export gate's fp16 tier, max |diff| <= 5e-2 and >= 99.5% the same.
A disagreeing verdict raises `ParityError` (exit 3), from the cache too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cnnkit.console import log
from cnnkit.errors import DataError, DeviceError, ParityError
from cnnkit.files import default_cache_dir, write_json
from cnnkit.meta import predict
from cnnkit.runtime.openvino import BACKEND as OPENVINO
from cnnkit.runtime.openvino import OpenVINOSession, create_openvino_session, openvino_version
from cnnkit.runtime.session import Session, external_data_files
from cnnkit.runtime.session import create_session as create_ort_session
from cnnkit.runtime.shard import file_sha256

ONNXRUNTIME = "onnxruntime"
BACKENDS = (ONNXRUNTIME, OPENVINO)
PARITY_IMAGES = 256  # decoded images both backends run on first use
# precision of the file -> (max |diff| allowed or None for not gated, smallest share of equal predictions)
PARITY_TIERS: dict[str, tuple[float | None, float]] = {
    "fp32": (1e-4, 1.0),
    "int8": (None, 0.995),
    "fp16": (5e-2, 0.995),
}

AnySession = Session | OpenVINOSession


def check_backend(backend: str) -> str:
    """`backend` if it is one of `BACKENDS`, else a one-line `DataError`."""
    if backend not in BACKENDS:
        raise DataError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def create_session(
    path: str, device: str = "auto", threads: int | None = None, backend: str = ONNXRUNTIME
) -> AnySession:
    """A session for the ONNX model `path` on `backend` (`runtime.session.create_session` for
    onnxruntime, `runtime.openvino.create_openvino_session` for openvino); same arguments and errors."""
    if check_backend(backend) == OPENVINO:
        return create_openvino_session(path, device=device, threads=threads)
    return create_ort_session(path, device=device, threads=threads)


def backend_config(session: AnySession) -> dict[str, Any] | None:
    """The settings a non-default backend was compiled with (None for onnxruntime)."""
    return dict(session.config) if isinstance(session, OpenVINOSession) else None


def model_sha256(path: str) -> str:
    """The SHA-256 a verdict is kept under: of the ONNX file and of every weights file it keeps beside
    it (`TensorProto.external_data`), which the backends load too; a weights file swapped in after a
    verdict gets a new one."""
    digests = [file_sha256(path), *(file_sha256(f) for f in sorted(external_data_files(path)))]
    if len(digests) == 1:
        return digests[0]
    import hashlib

    return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def parity_cache_path(model_sha256: str, version: str) -> str:
    return os.path.join(default_cache_dir(), "backend-parity", f"{OPENVINO}-{version}-{model_sha256}.json")


def check_backend_parity(session: AnySession, images: np.ndarray) -> dict[str, Any] | None:
    """The recorded verdict of `session`'s backend against onnxruntime on this model file: from the
    cache, or measured now on (up to `PARITY_IMAGES` of) `images` and recorded. None for onnxruntime.

    Raises:
        ParityError: the backends disagree beyond the file's tier (numbers in the message).
        DeviceError: no verdict yet and onnxruntime, the reference, is not installed.
    """
    if not isinstance(session, OpenVINOSession):
        return None
    sha, version = model_sha256(session.path), openvino_version()
    cache = parity_cache_path(sha, version)
    verdict = _read_verdict(cache, sha, version)
    if verdict is not None:
        verdict["cached"] = True
    else:
        if len(images) == 0:
            raise DataError(f"{session.path}: no decoded image to check the openvino backend against onnxruntime")
        verdict = _measure(session, images[:PARITY_IMAGES], sha, version)
        _write_verdict(cache, verdict)
        verdict["cached"] = False
    verdict["cache"] = cache
    if not verdict["passed"]:
        raise ParityError(_refusal(session.path, verdict))
    return verdict


def _measure(session: OpenVINOSession, images: np.ndarray, sha: str, version: str) -> dict[str, Any]:
    """Run both backends on `images` and compare them by the file's tier."""
    try:
        reference = create_ort_session(session.path, device="cpu", threads=session.threads)
    except ImportError:
        raise DeviceError(
            "backend openvino: its first run on a model file is checked against onnxruntime, which is not "
            "installed; pip install 'cnnkit[cpu]'"
        ) from None
    ours, ref = session.run(images).astype(np.float64), reference.run(images).astype(np.float64)
    diff = np.abs(ours - ref)
    max_diff = float("nan") if np.isnan(diff).any() else float(diff.max())
    agreement = float((predict(ours, session.meta.output)[0] == predict(ref, session.meta.output)[0]).mean())
    tolerance, min_agreement = PARITY_TIERS[session.precision]
    passed = agreement >= min_agreement and (tolerance is None or max_diff <= tolerance)
    log(
        f"backend parity: openvino {version} vs onnxruntime on {len(images)} images of {session.path}: "
        f"max |diff| {max_diff:.3g}, {agreement:.2%} same predictions ({'agree' if passed else 'DISAGREE'})"
    )
    return {
        "model_sha256": sha,
        "backend": OPENVINO,
        "backend_version": version,
        "reference": f"onnxruntime {_ort_version()}",
        "precision_hint": session.config["INFERENCE_PRECISION_HINT"],
        "file_precision": session.precision,
        "n_images": len(images),
        "max_abs_diff": max_diff,
        "argmax_agreement": agreement,
        "tolerance": tolerance,
        "min_agreement": min_agreement,
        "passed": passed,
    }


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _read_verdict(path: str, sha: str, version: str) -> dict[str, Any] | None:
    """A cached verdict for this file and version; None when there is none or it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            verdict = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(verdict, dict) and verdict.get("model_sha256") == sha and verdict.get("backend_version") == version
    return verdict if ok and isinstance(verdict.get("passed"), bool) else None


def _write_verdict(path: str, verdict: dict[str, Any]) -> None:
    """Record the verdict; a cache that cannot be written only means the check runs again next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, verdict)
    except OSError as e:
        log(f"backend parity: verdict not recorded ({e.strerror or e}); set CNNKIT_CACHE to a writable folder")


def _refusal(path: str, v: dict[str, Any]) -> str:
    tol = "" if v["tolerance"] is None else f" (allowed {v['tolerance']:g})"
    return (
        f"{path}: openvino {v['backend_version']} does not agree with {v['reference']} on this "
        f"{v['file_precision']} model: max |diff| {v['max_abs_diff']:.3g}{tol}, {v['argmax_agreement']:.2%} same "
        f"predictions (need {v['min_agreement']:.1%}) over {v['n_images']} images; use --backend onnxruntime "
        f"(verdict recorded in {v.get('cache') or 'the cache'})"
    )
