"""The model metadata record: one JSON document inside every artifact.

The same record travels in the checkpoint (as a plain dict), in ONNX `metadata_props` (key
`cnnkit`, JSON text) and in TorchScript/pt2 extra files (`cnnkit.json`). Everything a runtime
needs to turn a folder of PNGs into named predictions is in here, so `cnnkit infer` needs
nothing but the model file and the folder.

Input contract (shared by training and inference): images are decoded by
`cnnkit.images.decode_image` to uint8 (H, W) grayscale and fed to the model as a uint8 tensor of
shape (N, C, H, W). The scaling to [0, 1] happens *inside* the model graph, so eager, TorchScript and
ONNX models all see the same numbers and there is no preprocessing to get wrong at serving time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.errors import ModelError

SCHEMA = "cnnkit.model/1"
METADATA_KEY = "cnnkit"  # ONNX metadata_props key
EXTRA_FILE = "cnnkit.json"  # TorchScript / pt2 extra file name

OUTPUT_LOGITS = "logits"  # (N, K) raw scores; softmax gives probabilities
OUTPUT_SIGMOID = "sigmoid"  # (N, 1) probability of classes[1] (the lecture's two-class model)


@dataclass(frozen=True)
class ModelMeta:
    """What a model expects and what its output means.

    Attributes:
        arch: architecture name (`cnnkit.trainer.models.ARCHS`).
        classes: class names, in output order.
        input_shape: (C, H, W) of one image.
        output: `logits` or `sigmoid`.
        color: color mode of the input (`L`: 8-bit grayscale).
        input_dtype: dtype the model takes (`uint8`).
        scaling: what the model does to its input before the first layer (documentation only).
        versions: library versions that produced the artifact.
        extra: free-form plain data (exporter, opset, training data root, ...).
    """

    arch: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    output: str
    color: str = "L"
    input_dtype: str = "uint8"
    scaling: str = "x / 255 inside the model"
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["input_shape"] = list(self.input_shape)
        return {"schema": SCHEMA, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_export(self, **info: Any) -> ModelMeta:
        """This record with `extra["export"]` set to `info` (format, exporter, opset, ...)."""
        return self.replace(extra={**self.extra, "export": info})

    def replace(self, **changes: Any) -> ModelMeta:
        d = self.to_dict()
        d.update(changes)
        return ModelMeta.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> ModelMeta:
        """Validate and build a record; raises ModelError on anything unexpected."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ModelError(f"not a cnnkit model record (schema {found!r}, expected {SCHEMA!r})")
        try:
            meta = cls(
                arch=str(d["arch"]),
                classes=tuple(str(c) for c in d["classes"]),
                input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
                output=str(d["output"]),
                color=str(d.get("color", "L")),
                input_dtype=str(d.get("input_dtype", "uint8")),
                scaling=str(d.get("scaling", "")),
                versions={str(k): str(v) for k, v in dict(d.get("versions", {})).items()},
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed cnnkit model record: {e!r}") from None
        meta.validate()
        return meta

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMeta:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"cnnkit model record is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ModelError(f"model record has a bad input_shape {self.input_shape}")
        if self.input_shape[0] != 1 or self.color != "L" or self.input_dtype != "uint8":
            raise ModelError("cnnkit models take 1-channel uint8 grayscale input")
        if self.output not in (OUTPUT_LOGITS, OUTPUT_SIGMOID):
            raise ModelError(f"model record has an unknown output kind {self.output!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"model record needs two or more distinct classes, got {self.classes}")
        if self.output == OUTPUT_SIGMOID and len(self.classes) != 2:
            raise ModelError("a sigmoid output needs exactly two classes")


def predict(outputs: np.ndarray, output_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw model outputs into (class index, probability of that class).

    Args:
        outputs: (N, K) logits or (N, 1) sigmoid probabilities.
        output_kind: `logits` or `sigmoid`.

    Returns:
        int64 class indices and float32 probabilities, both of shape (N,).
    """
    outputs = np.asarray(outputs, dtype=np.float32)
    if output_kind == OUTPUT_SIGMOID:
        p1 = outputs.reshape(-1)
        idx = (p1 >= 0.5).astype(np.int64)
        return idx, np.where(idx == 1, p1, 1.0 - p1).astype(np.float32)
    idx = outputs.argmax(axis=1)
    z = outputs - outputs.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = np.take_along_axis(e, idx[:, None], axis=1)[:, 0] / e.sum(axis=1)
    return idx.astype(np.int64), prob.astype(np.float32)
