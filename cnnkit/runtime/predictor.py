"""`Predictor`: classify images from Python with a cnnkit ONNX model, torch-free (docs/api.md).

Every input, whatever its kind, becomes the model's input through the one preprocessing step of
training and `cnnkit infer`: encoded files through `cnnkit.images.decode_image`, pixels (numpy
arrays, PIL images) through `cnnkit.images.convert_pixels`, with the model's record
(`meta.input_shape`). Outputs become classes and probabilities through `cnnkit.meta.predict_all`, the
rule `cnnkit infer` uses, so a `Predictor` answers as the CLI does on the same files.

A long list of paths is decoded by worker processes, as `cnnkit infer` does. They are forked once,
when the `Predictor` is created and before its onnxruntime session exists (forking a process whose
runtime thread pools run is unsafe), and kept until `close()`.

Thread safety: `predict` may be called from many threads at once. A `Predictor` holds no mutable
state after it is created: onnxruntime's `InferenceSession.run` is thread-safe, `Session.run` only
reads its fields, and each call waits only on its own decode tasks (`cnnkit.batches.DecodePool`).
With `backend="openvino"`, calls take turns on its one infer request (`runtime.openvino`), and the
first batch ever predicted settles its parity verdict against onnxruntime (`runtime.backends`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import numpy as np

from cnnkit.batches import DecodedBatch, DecodePool, default_workers
from cnnkit.errors import DataError
from cnnkit.images import ImageError, convert_pixels, decode_image, read_bytes
from cnnkit.meta import ModelMeta, predict_all
from cnnkit.runtime.backends import ONNXRUNTIME, check_backend, check_backend_parity
from cnnkit.runtime.infer import MIN_TASK_FILES, task_files, threads_for
from cnnkit.runtime.precision import open_choice, resolve
from cnnkit.runtime.session import read_meta

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
else:
    PILImage = Any

Path: TypeAlias = "str | os.PathLike[str]"
Item: TypeAlias = "str | os.PathLike[str] | bytes | PILImage | np.ndarray"
Errors: TypeAlias = Literal["raise", "report"]
# Lists of at least this many paths go to the decoder processes (already running: the only cost is a
# round trip per task); shorter ones are decoded in the calling thread. Not tuned.
POOL_MIN_FILES = 2 * MIN_TASK_FILES
_PIL_SAME = ("L", "RGB")  # PIL modes taken as they are; others are converted (as the PNG decoder does)


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer for one input.

    Attributes:
        label: the predicted class name; None when `error` is set.
        index: its index in the model's classes; -1 when `error` is set.
        score: the probability of that class (float32's value); NaN when `error` is set.
        probabilities: float32 (K,), every class's probability (sigmoid models: [1 - p, p]); empty
            when `error` is set.
        converted: the input was converted to the model's color mode or size.
        error: why the input could not be used (only with `predict(..., errors="report")`).
    """

    label: str | None
    index: int
    score: float
    probabilities: np.ndarray
    converted: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether there is a prediction (no `error`)."""
        return self.error is None


class Predictor:
    """An ONNX model exported by cnnkit, ready to classify images from Python (no torch needed).

    Args:
        model: the `.onnx` file (with its cnnkit record; `cnnkit export --format onnx` writes one), or
            a run folder: one of its ONNX files, chosen by `precision`.
        device: `auto`, `cpu`, `cuda` or `cuda:N`, as `cnnkit infer --device`.
        batch_size: images per model call (the answers do not depend on it).
        threads: onnxruntime intra-op threads; default 1 with decoder processes (they use the other
            cores), every core without.
        workers: PNG decoder processes for long lists of paths; default one per core, 0 for none
            (every input is then decoded in the calling thread).
        backend: `onnxruntime` or `openvino` (CPU; `pip install 'cnnkit[openvino]'`). OpenVINO's first
            run on a model file is checked against onnxruntime on the first images predicted;
            `backend_parity` holds the verdict.
        precision: with a run folder: `auto` (the default there), `fp32`, `int8` or `fp16`, as
            `cnnkit infer --precision` (`cnnkit.runtime.precision`); `self.precision` and
            `self.precision_reason` say what was picked and why.

    Raises:
        ModelError: a missing or foreign model file, or one whose input does not match its record.
        DeviceError: an unknown device, `cuda` where its provider does not load, or openvino not installed.
        DataError: `batch_size` below 1, or an unknown backend.
        ParityError: (from `predict`) openvino does not agree with onnxruntime on this model file.

    Use it as a context manager, or call `close()`, to end the decoder processes.
    """

    def __init__(
        self,
        model: Path,
        device: str = "auto",
        *,
        batch_size: int = 256,
        threads: int | None = None,
        workers: int | None = None,
        backend: str = ONNXRUNTIME,
        precision: str | None = None,
    ):
        if batch_size < 1:
            raise DataError("batch size must be at least 1")
        check_backend(backend)
        self.backend_parity: dict[str, Any] | None = None
        self._parity_lock = threading.Lock()
        self._parity_done = backend == ONNXRUNTIME
        choice, run_dir = resolve(os.fspath(model), precision, device)
        self.model = choice.path
        self.meta: ModelMeta = read_meta(self.model)  # a foreign model fails before any process starts
        self.batch_size = batch_size
        n = default_workers() if workers is None else max(0, workers)
        self._pool = DecodePool(n) if n > 0 else None  # forked before the session's threads exist
        try:
            threads = threads_for(n) if threads is None else threads
            self._session, choice = open_choice(choice, run_dir, device, threads, backend)
        except BaseException:
            self.close()
            raise
        self.model, self.precision, self.precision_reason = choice.path, choice.precision, choice.reason

    @property
    def classes(self) -> list[str]:
        """The model's class names, in index order."""
        return list(self.meta.classes)

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider (or `OpenVINO CPU`) that really runs the model."""
        return self._session.provider

    @property
    def backend(self) -> str:
        """`onnxruntime` or `openvino`."""
        return self._session.backend

    def _check_parity(self, images: np.ndarray) -> None:
        """Settle the backend's verdict against onnxruntime once, on the first images predicted."""
        with self._parity_lock:
            if not self._parity_done:
                self.backend_parity = check_backend_parity(self._session, images)
                self._parity_done = True

    def close(self) -> None:
        """End the decoder processes; `predict` then decodes in the calling thread."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @overload
    def predict(self, inputs: str | os.PathLike[str] | bytes | PILImage, *, errors: Errors = "raise") -> Prediction: ...

    @overload
    def predict(
        self, inputs: list[Item] | tuple[Item, ...] | np.ndarray, *, errors: Errors = "raise"
    ) -> list[Prediction]: ...

    def predict(self, inputs: Any, *, errors: Errors = "raise") -> Prediction | list[Prediction]:
        """Classify images.

        Args:
            inputs: one image, or a list (or tuple) of them, or a uint8 numpy batch. An image is a path
                (`str` or `os.PathLike`) to a PNG file, the bytes of a PNG file, a PIL image, or (in
                a list) a uint8 numpy image: (H, W) gray, (H, W, 3) RGB, or the model's (C, H, W).
                A numpy array passed alone is always a batch: (N, H, W) gray, (N, H, W, 3) RGB, or
                (N, C, H, W) exactly the model's input shape, which wins where two readings fit
                (docs/api.md: the layout rule). Images of another mode or size are converted as in
                training (`cnnkit.images.convert_pixels`).
            errors: what an image that cannot be read or decoded does: "raise" (`ImageError`, naming
                the item, and no predictions), or "report" (its `Prediction` has `error` set).

        Returns:
            One `Prediction` for one image; a list, in input order, for a list or an array.

        Raises:
            ImageError: with errors="raise", the first input that cannot be read or decoded.
            DataError: a numpy array that is not uint8 or whose layout the rule does not accept.
            TypeError: an input of another kind.
        """
        if errors not in ("raise", "report"):
            raise ValueError(f"errors must be 'raise' or 'report', not {errors!r}")
        items, single = _as_items(inputs)
        out: list[Prediction | None] = [None] * len(items)
        with contextlib.closing(self._batches(items)) as batches:
            for batch in batches:
                for pos, reason in batch.failures:
                    if errors == "raise":
                        raise ImageError(f"{_name(items[pos], pos)}: {reason}")
                    out[pos] = Prediction(None, -1, float("nan"), np.empty(0, np.float32), False, reason)
                if len(batch.images):
                    self._answer(batch, out)
        return out[0] if single else out  # type: ignore[return-value]  # every position was filled

    def _batches(self, items: Sequence[Any] | np.ndarray) -> Generator[DecodedBatch, None, None]:
        """The inputs decoded to the model's shape, in order, in batches that cover every position."""
        shape, step = self.meta.input_shape, self.batch_size
        if isinstance(items, np.ndarray):
            pixels = _batch_pixels(items, shape)
            for s in range(0, len(pixels), step):
                yield _converted(pixels[s : s + step], s, shape)
            return
        pool = self._pool
        if pool is not None and len(items) >= POOL_MIN_FILES and all(_is_path(i) for i in items):
            paths = [os.fsdecode(p) for p in items]
            task = task_files(len(paths), pool.workers, step, int(np.prod(shape)))
            yield from pool.decode("", [(s, paths[s : s + task]) for s in range(0, len(paths), task)], shape)
            return
        for s in range(0, len(items), step):
            yield _decode_items(items[s : s + step], s, shape)

    def _answer(self, batch: DecodedBatch, out: list[Prediction | None]) -> None:
        """Run the model on a decoded batch and put each image's `Prediction` at its position."""
        images, step = batch.images, self.batch_size
        if not self._parity_done:
            self._check_parity(images)
        outputs = [self._session.run(images[s : s + step]) for s in range(0, len(images), step)]
        prob, idx = predict_all(outputs[0] if len(outputs) == 1 else np.concatenate(outputs), self.meta.output)
        scores = np.take_along_axis(prob, idx[:, None], axis=1)[:, 0].tolist()
        classes = self.meta.classes
        rows = zip(batch.positions.tolist(), idx.tolist(), scores, prob, batch.converted_mask.tolist(), strict=True)
        for pos, i, score, p, conv in rows:
            out[pos] = Prediction(classes[i], i, score, p, conv)


def _is_path(item: object) -> bool:
    return isinstance(item, str | os.PathLike)


def _is_pil(item: object) -> bool:
    image = sys.modules.get("PIL.Image")  # not imported: then nothing is a PIL image
    return image is not None and isinstance(item, image.Image)


def _as_items(inputs: Any) -> tuple[Sequence[Any] | np.ndarray, bool]:
    """(the images as a sequence, whether `inputs` was one image)."""
    if isinstance(inputs, np.ndarray):
        return inputs, False
    if isinstance(inputs, str | bytes | bytearray | os.PathLike) or _is_pil(inputs):
        return [inputs], True
    if isinstance(inputs, list | tuple):
        return inputs, False
    raise TypeError(f"predict takes a path, bytes, a PIL image, a list of them or a numpy batch, not {type(inputs)}")


def _name(item: object, pos: int) -> str:
    """How an error names the input at `pos`: its path, else its position and kind."""
    if _is_path(item):
        return os.fsdecode(item)  # type: ignore[arg-type]
    return f"input {pos} ({'bytes' if isinstance(item, bytes | bytearray) else type(item).__name__})"


def _decode_items(items: Sequence[Any], start: int, shape: tuple[int, int, int]) -> DecodedBatch:
    """Decode a slice of the inputs in this thread; the images that fail are listed, not raised."""
    out = np.empty((len(items), *shape), dtype=np.uint8)
    ok = np.empty(len(items), dtype=np.int64)
    mask = np.zeros(len(items), dtype=bool)
    failures: list[tuple[int, str]] = []
    n = 0
    for i, item in enumerate(items):
        try:
            out[n], mask[n] = _decode_item(item, shape)
        except ImageError as e:
            failures.append((start + i, str(e)))
            continue
        ok[n] = start + i
        n += 1
    return DecodedBatch(start, out[:n], ok[:n], failures, int(mask[:n].sum()), mask[:n])


def _decode_item(item: Any, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """One input -> (uint8 `shape`, converted)."""
    if _is_path(item):
        return decode_image(read_bytes(os.fsdecode(item)), shape)
    if isinstance(item, bytes | bytearray):
        return decode_image(bytes(item), shape)
    if _is_pil(item):
        pixels, mode_converted = _pil_pixels(item)
        arr, converted = convert_pixels(pixels, shape)
        return arr, converted or mode_converted
    if isinstance(item, np.ndarray):
        pixels = item if item.ndim == 2 else _batch_pixels(item[None], shape)[0]
        return convert_pixels(_uint8(pixels), shape)
    raise TypeError(f"an input must be a path, bytes, a PIL image or a numpy image, not {type(item)}")


def _pil_pixels(image: PILImage) -> tuple[np.ndarray, bool]:
    """A PIL image's pixels as the PNG decoder gives them: (H, W) for L, (H, W, 3) for RGB; 1-bit to
    0/255, 16-bit gray to its high byte, palette and alpha modes to RGB (alpha dropped).

    Returns:
        (pixels, whether the mode was converted).
    """
    if image.mode in _PIL_SAME:
        return np.asarray(image), False
    if image.mode.startswith("I"):  # PNG's 16-bit gray (I;16, or I holding 0..65535): the high byte
        return np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8), True
    return np.asarray(image.convert("L" if image.mode == "1" else "RGB")), True


def _uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(f"numpy images must be uint8 (0..255), not {arr.dtype}")
    return arr


def array_layout(shape: tuple[int, ...], input_shape: tuple[int, int, int]) -> str:
    """How a numpy batch of `shape` is read for a model taking `input_shape` (C, H, W).

    The rule, first match wins:
      1. (N, C, H, W) equal to the model's input shape: "NCHW", channels first;
      2. (N, H, W, 3): "NHWC", RGB channels last (the numpy and PIL convention);
      3. (N, H, W): "NHW", grayscale; unless W is 3 and (H, W) is not the model's size, which is
         more likely one RGB image passed without its batch axis, and refused.

    Raises:
        DataError: any other shape, naming the accepted ones.
    """
    if len(shape) == 4 and tuple(shape[1:]) == tuple(input_shape):
        return "NCHW"
    if len(shape) == 4 and shape[3] == 3:
        return "NHWC"
    if len(shape) == 3 and (shape[2] != 3 or tuple(shape[1:]) == tuple(input_shape[1:])):
        return "NHW"
    if len(shape) == 3:
        raise DataError(
            f"a numpy batch of shape {shape} is ambiguous: one RGB image (H, W, 3) goes in as [image] or "
            "image[None]; a gray batch (N, H, W) 3 pixels wide is taken only at the model's size"
        )
    model = "(N, " + ", ".join(map(str, input_shape)) + ")"
    raise DataError(
        f"a numpy batch of shape {shape}: expected (N, H, W) gray, (N, H, W, 3) RGB or the model's {model}"
        + (" (one image: pass [image] or image[None])" if len(shape) == 2 else "")
    )


def _batch_pixels(arr: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A uint8 numpy batch as (N, H, W) or (N, H, W, 3) pixels, by `array_layout`."""
    layout = array_layout(arr.shape, shape)
    _uint8(arr)
    if layout == "NCHW":
        return arr[:, 0] if shape[0] == 1 else arr.transpose(0, 2, 3, 1)
    return arr


def _converted(pixels: np.ndarray, start: int, shape: tuple[int, int, int]) -> DecodedBatch:
    """Pixels (n, H, W) or (n, H, W, 3) through `convert_pixels`, one image at a time."""
    out = np.empty((len(pixels), *shape), dtype=np.uint8)
    mask = np.zeros(len(pixels), dtype=bool)
    for i, image in enumerate(pixels):
        out[i], mask[i] = convert_pixels(image, shape)
    return DecodedBatch(start, out, np.arange(start, start + len(pixels)), [], int(mask.sum()), mask)
