"""ONNX Runtime's mobile usability verdict on an exported file: how much of the graph the NNAPI (Android)
and CoreML (iOS) execution providers could run, in how many partitions.

The same steps as `python -m onnxruntime.tools.check_onnx_model_mobile_usability`: optimize the model
at ONNX Runtime's BASIC level (what an ORT-format conversion does), infer shapes, then ask the
checker's own partitioning functions (`onnxruntime.tools.mobile_helpers.usability_checker`) with
fixed input sizes required, as the EPs need them. The numbers are read from the checker's result
objects rather than its log lines, so nothing is printed unless `verbose` (then its analysis goes to
stderr).
"""

from __future__ import annotations

import logging
import pathlib
import sys
import tempfile
from typing import Any

CHECKER = "onnxruntime.tools.mobile_helpers.usability_checker"
# verdict key -> the checker's supported-operator list ("" for NNAPI, whose function names its own)
EPS = {
    "nnapi": "",
    "coreml": "coreml_supported_neuralnetwork_ops.md",
    "coreml_mlprogram": "coreml_supported_mlprogram_ops.md",
}


def _analysis_logger() -> logging.Logger:
    """A logger that writes the checker's detailed analysis to stderr (`verbose` only; stdout is --json's)."""
    logger = logging.getLogger("cnnkit.mobile")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _entry(info: Any) -> dict[str, Any]:
    return {
        "nodes": int(info.num_nodes),
        "supported": int(info.num_supported_nodes),
        "partitions": int(info.num_partitions),
        "unsupported_ops": sorted(info.unsupported_ops),
        "dynamic_shape_nodes": int(info.nodes_unsupported_due_to_dynamic_input),
        "suitability": info.suitability().name,
    }


def mobile_verdict(path: str, verbose: bool = False) -> dict[str, Any]:
    """The checker's verdict on the ONNX file at `path`, per execution provider.

    Returns:
        {"nnapi": {...}, "coreml": {...}, "coreml_mlprogram": {...}, "onnxruntime": version}; each EP
        entry has nodes, supported, partitions, unsupported_ops, dynamic_shape_nodes and suitability
        (the checker's YES / MAYBE / NO). On a checker that is missing or fails: {"error": "..."}.
    """
    import onnxruntime as ort

    try:
        from onnxruntime.tools.mobile_helpers import usability_checker as uc
        from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model
    except ImportError as e:
        return {"error": f"{CHECKER} is not available: {e}", "onnxruntime": ort.__version__}
    verdict: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix=".cnnkit-mobile-") as tmp:
            optimized = pathlib.Path(tmp) / "model.onnx"  # the suffix tells ORT the format
            optimize_model(pathlib.Path(path), optimized)  # BASIC level, as the checker does
            model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
            for key, ops in EPS.items():
                info = (
                    uc.check_nnapi_partitions(model, True) if not ops else uc.check_coreml_partitions(model, True, ops)
                )
                verdict[key] = _entry(info)
                if verbose:
                    info.print_analysis(_analysis_logger(), key)
    except Exception as e:  # the checker is a helper script; its failure must not fail an export
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"error": f"{CHECKER} failed: {first}", "onnxruntime": ort.__version__}
    verdict["onnxruntime"] = ort.__version__
    return verdict


def summary(verdict: dict[str, Any]) -> str:
    """One line: `NNAPI 14/14 nodes in 1 partition, CoreML 12/14 in 2, ...`."""
    if "error" in verdict:
        return f"mobile check: {verdict['error']}"
    names = {"nnapi": "NNAPI", "coreml": "CoreML", "coreml_mlprogram": "CoreML MLProgram"}
    parts = [
        f"{names[k]} {v['supported']}/{v['nodes']} nodes in {v['partitions']} partition"
        f"{'' if v['partitions'] == 1 else 's'}"
        for k, v in verdict.items()
        if k in names
    ]
    return "mobile check (onnxruntime's usability checker): " + ", ".join(parts)
