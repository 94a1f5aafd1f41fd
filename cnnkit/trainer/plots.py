"""Training plots as PNG: curves, the lecture's label-vs-score plots, a confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cnnkit.files import atomic_path


def _save(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)


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
    (of the last split: testing, else validation); return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    paths = []
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
            ax.axvline(selected_epoch, color="gray", linestyle="--", linewidth=1,
                       label=f"selected (epoch {selected_epoch})")
    ax1.legend()
    ax2.legend()
    paths.append(_save(fig, os.path.join(run_dir, "curves.png")))

    # The lecture's plot: the label of every image (in data order, grouped by class) and the model's
    # score for it. Two classes: the sigmoid output. K classes: the probability of the true class.
    last_split = None
    for split, out in scores.items():
        y = labels[split]
        order = np.argsort(y, kind="stable")
        if sigmoid:
            score = out[:, 0].numpy()
            ylabel = f"P({classes[1]})"
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
        paths.append(_save(fig, os.path.join(run_dir, f"scores_{split}.png")))
        last_split = split

    if last_split is not None:
        out, y = scores[last_split], labels[last_split]
        pred = (out[:, 0] >= 0.5).long().numpy() if sigmoid else out.argmax(1).numpy()
        cm = confusion_matrix(y, pred, len(classes))
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.5 * len(classes)))
        ax.imshow(cm, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(title=f"Confusion matrix ({last_split})", xlabel="predicted", ylabel="true")
        paths.append(_save(fig, os.path.join(run_dir, "confusion.png")))
    return paths
