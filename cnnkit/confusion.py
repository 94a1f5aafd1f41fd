"""Confusion counts that stay small for any number of classes; shared by training plots and inference.

Up to MAX_MATRIX_CLASSES classes a K x K matrix is kept, printed and plotted. Beyond that a matrix is
neither readable (2,500+ cells) nor affordable (its memory, and a plot's labels, grow with K squared:
100,000 classes would be an 80 GB matrix), so only the count of right answers and the (true,
predicted) pairs that actually occurred are kept, at most one per misclassified image, and reports
show the TOP_PAIRS most frequent ones. Torch-free: the runtime uses it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

MAX_MATRIX_CLASSES = 50  # documented in docs/infer.md and docs/train.md
TOP_PAIRS = 20


def display_name(text: str) -> str:
    """`text` as it can be drawn or shown anywhere: bytes of a file name that are not UTF-8 (which
    Python hands over as surrogate escapes) become `\\xNN`, which fonts and strict encoders accept."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Confusion:
    """Running confusion counts for `k` classes: a matrix up to MAX_MATRIX_CLASSES, else pair counts."""

    def __init__(self, k: int):
        self.k = k
        self.matrix = np.zeros((k, k), dtype=np.int64) if k <= MAX_MATRIX_CLASSES else None
        self.n_correct = 0
        self.n_total = 0
        self._pairs: Counter[int] = Counter()  # true * k + predicted, off the diagonal only

    def add(self, true: np.ndarray, predicted: np.ndarray) -> None:
        true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
        self.n_total += len(true)
        self.n_correct += int((true == predicted).sum())
        if self.matrix is not None:
            self.matrix += np.bincount(true * self.k + predicted, minlength=self.k * self.k).reshape(self.k, self.k)
            return
        wrong = true != predicted
        codes, counts = np.unique(true[wrong] * self.k + predicted[wrong], return_counts=True)
        self._pairs.update(dict(zip(codes.tolist(), counts.tolist(), strict=True)))

    def pairs(self) -> list[list[int]]:
        """Every off-diagonal [true, predicted, count], most frequent first (ties: class order)."""
        if self.matrix is not None:
            rows, cols = np.nonzero(self.matrix * (1 - np.eye(self.k, dtype=np.int64)))
            found = {int(r) * self.k + int(c): int(self.matrix[r, c]) for r, c in zip(rows, cols, strict=True)}
        else:
            found = dict(self._pairs)
        order = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
        return [[code // self.k, code % self.k, n] for code, n in order]

    def add_pairs(self, n_correct: int, n_total: int, pairs: Iterable[Sequence[int]]) -> None:
        """Add counts kept elsewhere (a shard's summary of a model with over MAX_MATRIX_CLASSES classes)."""
        assert self.matrix is None, "matrices add up as matrices"
        self.n_correct += int(n_correct)
        self.n_total += int(n_total)
        for t, p, n in pairs:
            self._pairs[int(t) * self.k + int(p)] += int(n)


def top_pairs(classes: Sequence[str], pairs: Sequence[Sequence[int]], n: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The `n` most frequent confusions by class name (for `--json` and summaries)."""
    return [{"true": classes[t], "predicted": classes[p], "count": c} for t, p, c in pairs[:n]]


def summary_lines(
    classes: Sequence[str], matrix: list[list[int]] | None, pairs: Sequence[Sequence[int]] | None, table: Any
) -> list[str]:
    """The printed confusion: the matrix for few classes, else the most frequent confusions."""
    names = [display_name(c) for c in classes]
    if matrix is not None:
        rows = [[c, *counts] for c, counts in zip(names, matrix, strict=True)]
        return ["confusion (rows: true class, columns: predicted)", table(["true \\ pred", *names], rows)]
    pairs = pairs or []
    head = (
        f"confusion: {len(classes):,} classes, over {MAX_MATRIX_CLASSES} so no matrix; the "
        f"{min(TOP_PAIRS, len(pairs))} most frequent of {len(pairs):,} confused pairs"
    )
    rows = [[names[t], names[p], c] for t, p, c in pairs[:TOP_PAIRS]]
    return [head, table(["true", "predicted", "images"], rows)] if rows else [head]
