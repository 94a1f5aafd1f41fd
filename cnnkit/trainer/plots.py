"""Training plots as PNG: curves, the lecture's label-vs-score plots, a confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cnnkit.confusion import MAX_MATRIX_CLASSES, TOP_PAIRS, Confusion, display_name
from cnnkit.files import atomic_path
from cnnkit.meta import OUTPUT_LOGITS, OUTPUT_SIGMOID, predict


def _save(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(
    run_dir: str,
    history: list[dict[str, Any]],
    scores: dict[str, torch.Tensor],
    labels: dict[str, np.ndarray],
    classes: Sequence[str],
    sigmoid: bool,
    selected_epoch: int | None = None,
) -> list[str]:
    """Write curves.png (the selected epoch marked), scores_<split>.png for each split and confusion.png
    (of the last split: testing, else validation); return their paths.

    Class names are drawn through `display_name`: a folder name that is not UTF-8 shows as `\\xNN`
    (matplotlib's font code refuses the surrogates Python decodes such bytes to).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    names = [display_name(c) for c in classes]
    paths = [_curves(run_dir, history, selected_epoch)]
    for split, out in scores.items():
        paths.append(_scores(run_dir, split, out, labels[split], names, sigmoid))
    if scores:
        split = list(scores)[-1]
        out, y = scores[split], labels[split]
        pred, _ = predict(out.numpy(), OUTPUT_SIGMOID if sigmoid else OUTPUT_LOGITS)
        confusion = Confusion(len(classes))
        confusion.add(y, pred)
        paths.append(_confusion(run_dir, split, confusion, names))
    return paths


def _curves(run_dir: str, history: list[dict[str, Any]], selected_epoch: int | None) -> str:
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="training")
    if history and history[0]["val_loss"] is not None:
        ax1.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax1.set(title="Loss", xlabel="epoch")
    ax2.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="training")
    if history and history[0]["val_accuracy"] is not None:
        ax2.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    ax2.set(title="Accuracy", xlabel="epoch")
    if selected_epoch:
        for ax in (ax1, ax2):
            ax.axvline(
                selected_epoch, color="gray", linestyle="--", linewidth=1, label=f"selected (epoch {selected_epoch})"
            )
    ax1.legend()
    ax2.legend()
    return _save(fig, os.path.join(run_dir, "curves.png"))


def _scores(run_dir: str, split: str, out: torch.Tensor, y: np.ndarray, names: Sequence[str], sigmoid: bool) -> str:
    """The lecture's plot: the label of every image (in data order, grouped by class) and the model's
    score for it. Two classes: the sigmoid output. K classes: the probability of the true class."""
    import matplotlib.pyplot as plt

    order = np.argsort(y, kind="stable")
    if sigmoid:
        score = out[:, 0].numpy()
        ylabel = f"P({names[1]})"
        truth = y
    else:
        prob = torch.softmax(out, 1).numpy()
        score = prob[np.arange(len(y)), y]
        ylabel = "probability of the true class"
        truth = np.ones(len(y))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(truth[order], label="label" if sigmoid else "target (1)")
    ax.plot(score[order], ".", markersize=2, alpha=0.5, label="model")
    ax.set(title=f"{split.capitalize()} set", xlabel="image (grouped by class)", ylabel=ylabel)
    ax.legend(loc="center right")
    return _save(fig, os.path.join(run_dir, f"scores_{split}.png"))


def _confusion(run_dir: str, split: str, confusion: Confusion, names: Sequence[str]) -> str:
    """The matrix for up to MAX_MATRIX_CLASSES classes; past that (its size and labels grow with K
    squared) a bar chart of the TOP_PAIRS most frequent confusions, of a fixed size."""
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "confusion.png")
    cm, k = confusion.matrix, len(names)
    if cm is None:
        pairs = confusion.pairs()[:TOP_PAIRS]
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * max(1, len(pairs))))
        ax.barh(range(len(pairs)), [c for _, _, c in pairs], color="tab:blue")
        ax.set_yticks(range(len(pairs)), [f"{names[t]} -> {names[p]}" for t, p, _ in pairs])
        ax.invert_yaxis()  # the most frequent on top
        ax.set(
            title=f"Most frequent confusions ({split}, {k:,} classes: over {MAX_MATRIX_CLASSES}, no matrix)",
            xlabel="images",
            ylabel="true -> predicted",
        )
        return _save(fig, path)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.5 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(title=f"Confusion matrix ({split})", xlabel="predicted", ylabel="true")
    return _save(fig, path)
