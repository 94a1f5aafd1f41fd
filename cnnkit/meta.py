"""The model metadata record: one JSON document inside every artifact.

The same record travels in the checkpoint (as a plain dict), in ONNX `metadata_props` (key
`cnnkit`, JSON text) and in TorchScript/pt2 extra files (`cnnkit.json`). Everything a runtime
needs to turn a folder of PNGs into named predictions is in here, so `cnnkit infer` needs
nothing but the model file and the folder.

Input contract (shared by training and inference): images are decoded by
`cnnkit.images.decode_image` to uint8 (C, H, W), grayscale (`color` "L", C = 1) or RGB ("RGB",
C = 3), converted and resized by the record's rule (`resize`), and fed to the model as a uint8 tensor
of shape (N, C, H, W). The scaling to [0, 1] happens *inside* the model graph, so eager, TorchScript and
ONNX models all see the same numbers and there is no preprocessing to get wrong at serving time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnkit.errors import ModelError

SCHEMA = "cnnkit.model/1"
METADATA_KEY = "cnnkit"  # ONNX metadata_props key
EXTRA_FILE = "cnnkit.json"  # TorchScript / pt2 extra file name

OUTPUT_LOGITS = "logits"  # (N, K) raw scores; softmax gives probabilities
OUTPUT_SIGMOID = "sigmoid"  # (N, 1) probability of classes[1] (the lecture's two-class model)

COLOR_CHANNELS = {"L": 1, "RGB": 3}  # the input's color mode -> channels (C of input_shape)
RESIZE_BILINEAR = "bilinear"  # stretch to (H, W), Pillow's bilinear filter (`cnnkit.images.convert_pixels`)

# Bounds on a record, which may come from an untrusted file: without them a few bytes of metadata can
# ask for a K x K table or an (H, W) batch that exhausts memory, or nest deeper than Python recurses.
# Documented in docs/export.md.
MAX_CLASSES = 10_000
MAX_SIDE = 4096  # pixels, for H and W
MAX_RECORD_CHARS = 4 << 20  # 10,000 class names of 100 characters are 1 MB of JSON
MAX_RECORD_DEPTH = 32  # cnnkit's own records nest 4 deep
# Bounds on the INT8 speed record (`int8_speed`): it decides which file `cnnkit infer --precision auto` runs.
MAX_SPEEDUP = 1000.0
MAX_RECORDED_THREADS = 4096
MAX_CPU_CHARS = 200
_ISA_NAME = re.compile(r"[a-z0-9-]{1,32}")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def is_user_arch(arch: str) -> bool:
    """Whether a record's `arch` names a user's class (`module.path:ClassName`, `cnnkit train --arch`)
    rather than a built-in arch: rebuilding one imports that module, which runs its code."""
    return ":" in arch


@dataclass(frozen=True)
class ModelMeta:
    """What a model expects and what its output means.

    Attributes:
        arch: architecture name (`cnnkit.models.ARCHS`), or a user's import string `module.path:ClassName`.
        classes: class names, in output order.
        input_shape: (C, H, W) of one image.
        output: `logits` or `sigmoid`.
        color: color mode of the input: `L` (8-bit grayscale, C = 1) or `RGB` (C = 3).
        input_dtype: dtype the model takes (`uint8`).
        scaling: what the model does to its input before the first layer (documentation only).
        resize: how an image of another size becomes (H, W): `bilinear` (stretched; records written
            before the field existed mean the same).
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
    resize: str = RESIZE_BILINEAR
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
        _check_size(d)
        try:
            meta = cls(
                arch=str(d["arch"]),
                classes=tuple(str(c) for c in d["classes"]),
                input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
                output=str(d["output"]),
                color=str(d.get("color", "L")),
                input_dtype=str(d.get("input_dtype", "uint8")),
                scaling=str(d.get("scaling", "")),
                resize=str(d.get("resize", RESIZE_BILINEAR)),
                versions={str(k): str(v) for k, v in dict(d.get("versions", {})).items()},
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"malformed cnnkit model record: {e!r}") from None
        meta.validate()
        return meta

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMeta:
        if len(text) > MAX_RECORD_CHARS:
            raise ModelError(
                f"cnnkit model record of {len(text):,} characters is over the {MAX_RECORD_CHARS:,} "
                "a model needs; the file is damaged or not cnnkit's"
            )
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            _check_nesting(_nesting(text))  # before json.loads, which would recurse that deep
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"cnnkit model record is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1 or max(self.input_shape[1:]) > MAX_SIDE:
            raise ModelError(
                f"model record has a bad input_shape {self.input_shape} "
                f"(expected [C, H, W], H and W from 1 to {MAX_SIDE})"
            )
        if COLOR_CHANNELS.get(self.color) != self.input_shape[0] or self.input_dtype != "uint8":
            raise ModelError(
                f"model record has color {self.color!r} with {self.input_shape[0]} channel(s) of {self.input_dtype}; "
                "cnnkit models take uint8 L (1 channel) or RGB (3 channels)"
            )
        if self.resize != RESIZE_BILINEAR:
            raise ModelError(f"model record has an unknown resize rule {self.resize!r} (this cnnkit knows bilinear)")
        if self.output not in (OUTPUT_LOGITS, OUTPUT_SIGMOID):
            raise ModelError(f"model record has an unknown output kind {self.output!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"model record needs two or more distinct classes, got {self.classes}")
        if self.output == OUTPUT_SIGMOID and len(self.classes) != 2:
            raise ModelError("a sigmoid output needs exactly two classes")


def int8_speed(meta: ModelMeta) -> dict[str, Any] | None:
    """The INT8 speed record of an INT8 file (`extra["export"]["quantization"]["speed"]`, written by
    `cnnkit export --quantize int8`), checked; None when the file has none (exported before it existed).

    Raises:
        ModelError: a record that is there but malformed or out of bounds.
    """
    export = meta.extra.get("export")
    quantization = export.get("quantization") if isinstance(export, dict) else None
    speed = quantization.get("speed") if isinstance(quantization, dict) else None
    return None if speed is None else check_speed(speed)


def check_speed(d: Any) -> dict[str, Any]:
    """`{"int8_speedup", "isa_class", "cpu", "threads"}` checked against the bounds above (a copy).

    Raises:
        ModelError: anything else.
    """
    if not isinstance(d, dict):
        raise ModelError(f"malformed int8 speed record: {type(d).__name__}, expected an object")
    x, isa, cpu, threads = (d.get(k) for k in ("int8_speedup", "isa_class", "cpu", "threads"))
    problems = [
        "int8_speedup"
        if isinstance(x, bool) or not isinstance(x, int | float) or not (math.isfinite(x) and 0 < x <= MAX_SPEEDUP)
        else "",
        "isa_class" if not (isinstance(isa, str) and _ISA_NAME.fullmatch(isa)) else "",
        "cpu" if not (isinstance(cpu, str) and len(cpu) <= MAX_CPU_CHARS and cpu.isprintable()) else "",
        "threads"
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_RECORDED_THREADS
        else "",
    ]
    bad = [p for p in problems if p]
    if bad:
        raise ModelError(f"malformed int8 speed record: bad {', '.join(bad)} (the file is damaged or not cnnkit's)")
    return {"int8_speedup": float(x), "isa_class": isa, "cpu": cpu, "threads": threads}  # type: ignore[arg-type]


def _nesting(text: str) -> int:
    """How deep the arrays and objects of JSON `text` nest, without parsing it (no recursion)."""
    bare = _JSON_STRING.sub('""', text).encode("utf-8", "surrogatepass")  # strings may hold brackets
    b = np.frombuffer(bare, dtype=np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int32) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _check_nesting(depth: int) -> None:
    if depth > MAX_RECORD_DEPTH:
        raise ModelError(
            f"cnnkit model record nests {depth:,} levels deep, over the {MAX_RECORD_DEPTH} a model "
            "needs; the file is damaged or not cnnkit's"
        )


def _check_size(d: dict[str, Any]) -> None:
    """Refuse a record that would cost memory out of proportion to a model, before copying any of it."""
    classes = d.get("classes")
    if isinstance(classes, list | tuple) and len(classes) > MAX_CLASSES:
        raise ModelError(
            f"model record names {len(classes):,} classes, over the {MAX_CLASSES:,} cnnkit "
            "supports; the file is damaged or not cnnkit's"
        )
    depth = 0
    level: list[Any] = [d]
    while level:  # breadth first, no recursion: checkpoints bring dicts that never were JSON text
        depth += 1
        _check_nesting(depth)
        level = [
            v for x in level for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, dict | list | tuple)
        ]


def probabilities(outputs: np.ndarray, output_kind: str) -> np.ndarray:
    """Raw model outputs -> float32 (N, K) probabilities of every class.

    Args:
        outputs: (N, K) logits (softmax) or (N, 1) sigmoid probabilities p of class 1 ([1 - p, p]).
        output_kind: `logits` or `sigmoid`.
    """
    outputs = np.asarray(outputs, dtype=np.float32)
    if output_kind == OUTPUT_SIGMOID:
        p1 = outputs.reshape(-1)
        return np.stack([1.0 - p1, p1], axis=1)
    e = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(outputs: np.ndarray, output_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw model outputs into (class index, probability of that class).

    The class is the largest logit, or class 1 when the sigmoid's p >= 0.5; its probability is its
    entry of `probabilities`.

    Args:
        outputs: (N, K) logits or (N, 1) sigmoid probabilities.
        output_kind: `logits` or `sigmoid`.

    Returns:
        int64 class indices and float32 probabilities, both of shape (N,).
    """
    prob, idx = predict_all(outputs, output_kind)
    return idx, np.take_along_axis(prob, idx[:, None], axis=1)[:, 0]


def predict_all(outputs: np.ndarray, output_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (N, K) `probabilities`, int64 (N,) predicted class): `predict` before it picks."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if output_kind == OUTPUT_SIGMOID:
        idx = (outputs.reshape(-1) >= 0.5).astype(np.int64)
    else:
        idx = outputs.argmax(axis=1).astype(np.int64)
    return probabilities(outputs, output_kind), idx
