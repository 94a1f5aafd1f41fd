"""The most confident wrong predictions of a labelled run, kept as they stream by and drawn as a PNG grid.

Torch-free (numpy, and Pillow only when a grid is drawn): `cnnkit infer` feeds it inside its
prediction loop and `cnnkit train` on its final evaluation. Memory is O(k) whatever the number of
images: a batch costs a few vectorised numpy calls, and only its wrong predictions are looked at.

Ranking: by score (the predicted class's probability), highest first; equal scores keep the order the
images were fed in (a saturated sigmoid gives many 1.0s), so the result does not depend on batch sizes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnkit.confusion import display_name
from cnnkit.files import atomic_path

DEFAULT_KEPT = 25
MIN_CELL = 84  # px: images are scaled up by a whole factor (nearest neighbour) to at least this side
NAME_CHARS = 12  # a class name longer than this is cut, with "...", so a caption stays one cell wide
_BACKGROUND = (24, 24, 24)
_TEXT = (230, 230, 230)  # never 255: a test counts the white pixels of white cells
_PAD = 4
_LINE = 13  # px per caption line (Pillow's default font is 10-11 px high)


class Mistakes:
    """The `k` most confident wrong predictions seen so far, fed a batch at a time with `add`."""

    def __init__(self, k: int = DEFAULT_KEPT, key: str = "path"):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.images: np.ndarray | None = None  # uint8 (m, C, H, W), m <= k, best first
        self.true = np.empty(0, dtype=np.int64)
        self.pred = np.empty(0, dtype=np.int64)
        self.score = np.empty(0, dtype=np.float32)
        self.ids: list[Any] = []
        self.key = key  # the JSON name of the identifiers: "path" or "index"

    def __len__(self) -> int:
        return len(self.ids)

    def add(
        self,
        images: np.ndarray,
        true: np.ndarray,
        pred: np.ndarray,
        score: np.ndarray,
        ids: Sequence[Any],
        rows: np.ndarray | None = None,
    ) -> None:
        """Feed one batch: uint8 images (n, C, H, W), true class (-1: unknown, ignored), predicted class,
        its probability, and identifiers: image i is `ids[rows[i]]` (`ids[i]` without `rows`), so a
        caller holding a list of paths does not build a list per batch."""
        wrong = np.flatnonzero((true >= 0) & (true != pred))
        if len(wrong) and len(self) == self.k:  # full: only a strictly higher score can enter
            wrong = wrong[score[wrong] > self.score[-1]]
        if not len(wrong):
            return
        if len(wrong) > self.k:  # a stable sort keeps feeding order among equal scores
            wrong = np.sort(wrong[np.argsort(-score[wrong], kind="stable")[: self.k]])
        picked = [ids[int(i)] for i in (wrong if rows is None else rows[wrong])]
        self._keep(images[wrong], true[wrong], pred[wrong], score[wrong], picked)

    def merge(self, other: Mistakes) -> None:
        """Take in another collector's kept predictions (another rank's or shard's), as if fed after these."""
        if len(other):
            self._keep(other.images, other.true, other.pred, other.score, list(other.ids))

    def _keep(self, images: Any, true: np.ndarray, pred: np.ndarray, score: np.ndarray, ids: list[Any]) -> None:
        """Join the candidates to the kept ones (kept first: earlier wins a tie) and keep the best k."""
        images = np.asarray(images, dtype=np.uint8)
        if self.images is not None and self.images.shape[1:] != images.shape[1:]:
            raise ValueError(f"images of shape {images.shape[1:]} cannot join kept ones of {self.images.shape[1:]}")
        all_images = images if self.images is None else np.concatenate([self.images, images])
        all_score = np.concatenate([self.score, np.asarray(score, dtype=np.float32)])
        order = np.argsort(-all_score, kind="stable")[: self.k]
        all_ids = self.ids + ids
        self.images = all_images[order]
        self.true = np.concatenate([self.true, true]).astype(np.int64)[order]
        self.pred = np.concatenate([self.pred, pred]).astype(np.int64)[order]
        self.score = all_score[order]
        self.ids = [all_ids[i] for i in order.tolist()]

    def to_json(self, classes: Sequence[str]) -> list[dict[str, Any]]:
        """[{"path" or "index", "true", "predicted", "score"}], highest score first. The score is the
        predictions CSV's number (`%.9g` of the float32), so the two can be compared exactly."""
        return [
            {self.key: i, "true": classes[t], "predicted": classes[p], "score": float(f"{s:.9g}")}
            for i, t, p, s in zip(self.ids, self.true.tolist(), self.pred.tolist(), self.score.tolist(), strict=True)
        ]

    def write_grid(self, path: str, classes: Sequence[str]) -> str | None:
        """Draw the kept predictions as a PNG grid at `path` (atomically) and return it; with none, write
        nothing, remove an earlier run's grid there (the file beside an output belongs to it), return None."""
        if not len(self):
            if os.path.isfile(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return None
        grid = self.render(classes)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG", compress_level=1)  # 7% larger, half the time of the default
        return path

    def render(self, classes: Sequence[str]) -> Any:
        """The grid as a Pillow RGB image: rows of cells, each the image and two caption lines (ASCII,
        `_label`; the arrow is "->" because the default font has no "→")."""
        from PIL import Image, ImageDraw, ImageFont

        assert self.images is not None
        font = ImageFont.load_default()
        h, w = self.images.shape[2:]
        scale = max(1, math.ceil(MIN_CELL / max(h, w)))
        cols = math.ceil(math.sqrt(len(self)))
        rows = math.ceil(len(self) / cols)
        captions = [self._caption(i, classes) for i in range(len(self))]
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        text_w = max(probe.textlength(line, font=font) for pair in captions for line in pair)
        cell_w, cell_h = max(w * scale, math.ceil(text_w)) + 2 * _PAD, h * scale + 2 * _LINE + 3 * _PAD
        grid = Image.new("RGB", (cols * cell_w, rows * cell_h), _BACKGROUND)
        draw = ImageDraw.Draw(grid)
        for i, pair in enumerate(captions):
            x, y = (i % cols) * cell_w + _PAD, (i // cols) * cell_h + _PAD
            grid.paste(_cell_image(self.images[i], scale), (x, y))
            for n, line in enumerate(pair):
                draw.text((x, y + h * scale + _PAD + n * _LINE), line, fill=_TEXT, font=font)
        return grid

    def _caption(self, i: int, classes: Sequence[str]) -> tuple[str, str]:
        """("true -> predicted", "0.97") of kept prediction i, names made drawable and short."""
        true, pred = _label(classes[int(self.true[i])]), _label(classes[int(self.pred[i])])
        return f"{true} -> {pred}", f"{float(self.score[i]):.2f}"


def _label(name: str) -> str:
    """A class name as one short line of ASCII, the only glyphs Pillow's default font is sure to have
    (its bitmap fallback cannot even encode others): anything else as a Python escape (\\xfc, \\x1b)."""
    text = display_name(name).encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= NAME_CHARS else text[: NAME_CHARS - 3] + "..."


def _cell_image(image: np.ndarray, scale: int) -> Any:
    """One (C, H, W) uint8 image as an RGB Pillow image scaled `scale` times, nearest neighbour."""
    from PIL import Image

    big = image.repeat(scale, axis=1).repeat(scale, axis=2)
    rgb = np.repeat(big, 3, axis=0) if big.shape[0] == 1 else big[:3]
    return Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
