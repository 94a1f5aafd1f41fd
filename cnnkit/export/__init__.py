"""Export a checkpoint or a trained module to ONNX (fp32, INT8, FP16), TorchScript or pt2, behind a gate.

`export()` writes the artifact to a temporary file next to its destination, loads *that file* back
(onnxruntime / torch.jit.load / torch.export.load) and compares it with the eager model on real
images at several batch sizes. Only a file that passes is renamed onto the destination, with a JSON
report beside it (`<artifact>.parity.json`). A failing export leaves nothing behind and raises
`ParityError`.

The gate depends on the precision (`cnnkit.export.parity.TIERS`):
  - fp32 (ONNX, TorchScript, pt2): max |diff| <= 1e-4 and every decision the same.
  - INT8 (`quantize="int8"`): the fp32 graph is exported and parity-gated first, then quantized
    (`cnnkit.export.quantize`) and gated on top-1 accuracy on the labeled testing split: at most
    `max_accuracy_drop` points below the fp32 file.
  - FP16 (`half=True`): the fp32 graph is exported and gated, converted, and the fp16 file gated with
    the fp16 tier on the CUDA provider (`device`: `auto` or `cuda[:N]`; TF32 off). Only that run
    makes it `verified`: the file is for CUDA. Where no CUDA provider works (`auto`) or with
    `device="cpu"`, the gate runs on the CPU provider where it can run the file, which checks the
    fp16 weights' rounding but not float16 arithmetic: the file is written with `verified=False`,
    `verified_on="cpu"` and a warning; where nothing runs it, `verified_on=None`. With `strict=True`
    an fp16 file not verified on CUDA is an error and nothing is written.

The eager reference always runs in float32 on the CPU, so no gate depends on a GPU's TF32 setting.

`export_module(module, data=..., out=...)` exports an already-trained `nn.Module` (no checkpoint)
through the same gates, with the classes and input shape taken from a folder of class folders.

The CLI calls `export(...)` and prints `result.to_dict()` as JSON; everything for humans goes to stderr.
"""

from cnnkit.export.onnx import DEFAULT_EXPORTER, EXPORTERS
from cnnkit.export.parity import ParityReport
from cnnkit.export.pipeline import (
    ARTIFACT_NAMES,
    FORMATS,
    ExportResult,
    export,
    export_module,
    sample_images,
    shipped_meta,
    shipped_path,
)

__all__ = [
    "ARTIFACT_NAMES",
    "DEFAULT_EXPORTER",
    "EXPORTERS",
    "FORMATS",
    "ExportResult",
    "ParityReport",
    "export",
    "export_module",
    "sample_images",
    "shipped_meta",
    "shipped_path",
]
