"""`cnnkit.train` and `cnnkit.infer`: the CLI's `train` and `infer` as Python functions (docs/api.md).

Each returns the dict that the command's `--json` prints. torch is imported only when `train` is
called; `infer` never imports it. Errors are `cnnkit.errors.CnnkitError` subclasses, as in the CLI.
"""

from __future__ import annotations

from typing import Any


def train(
    data: str | None = None,
    *,
    out: str | None = None,
    arch: str = "small",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    augment: str | None = None,
    classes: tuple[str, ...] | list[str] | None = None,
    val_split: float = 0.1,
    device: str = "auto",
    seed: int = 0,
    workers: int | None = None,
    color: str = "auto",
    size: tuple[int, int] | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """Train a CNN on a folder of images, as `cnnkit train` does (docs/train.md: options and defaults).

    Args:
        data: a folder with training/ (and testing/), or of class folders; default the bundled digits.
        out: the run folder; default runs/train-<time>.
        arch: small, wide or lecture, or your own network as an import string `module:Class`
            (docs/train.md: the constructor and forward contract).
        epochs, batch_size, lr, augment: None takes the arch's recipe; augment is none, flip or shift.
        classes: the class folder names to train on; default every folder.
        val_split: the fraction of training held out for validation (which selects the checkpoint).
        device: auto, cpu, cuda or cuda:N.
        seed: the run's seed.
        workers: image decoder processes; default one per core.
        color: auto, gray or rgb: the model's input mode.
        size: (H, W) every image is resized to; default the training images' common size.
        resume: a run folder to continue.

    Returns:
        What `cnnkit train --json` prints: the run folder, accuracies, timings (docs/cli.md).

    Raises:
        CnnkitError: bad data, arguments, device or checkpoint (`cnnkit.errors`).
        Interrupted: SIGINT or SIGTERM stopped the run (its last checkpoint is kept).
    """
    options = dict(locals())  # every argument but `resume` is a `TrainConfig` field of the same name
    del options["resume"]
    options["classes"] = tuple(classes) if classes is not None else None
    from cnnkit.trainer.loop import TrainConfig
    from cnnkit.trainer.loop import train as run_training

    cfg = TrainConfig(**options)
    d = run_training(cfg, resume=resume).to_dict()
    return {k: v for k, v in d.items() if k != "history"}


def infer(
    folder: str,
    model: str | None = None,
    *,
    device: str = "auto",
    batch_size: int = 256,
    output: str | None = None,
    workers: int | None = None,
    shard: str | None = None,
    strict: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Classify every image under `folder` and write the predictions CSV, as `cnnkit infer` does.

    Args:
        folder: the images, searched recursively; files under class-named folders give accuracy.
        model: the ONNX model; default runs/latest/model.onnx.
        device: auto, cpu, cuda or cuda:N.
        batch_size: images per model call.
        output: the CSV; default predictions.csv next to the model.
        workers: image decoder processes; default one per core.
        shard: "K/N" to keep shard K of N (docs/infer.md).
        strict: stop at the first file that cannot be used (`FileFailedError`, nothing written).
        progress: draw a progress bar on stderr.

    Returns:
        What `cnnkit infer --json` prints: counts, images/s, accuracy, confusion (docs/cli.md).

    Raises:
        ModelError, DeviceError, DataError: a model, device or folder that cannot be used.
        FileFailedError: with `strict`, a file that could not be used.
    """
    from cnnkit.runtime.infer import infer as run_infer

    result = run_infer(
        folder,
        model,
        device,
        batch_size,
        output,
        workers,
        shard=shard,
        strict=strict,
        progress=progress,
    )
    return result.to_dict()
