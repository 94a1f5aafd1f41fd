"""Run folders: where `cnnkit train` writes and where export and infer look by default.

runs/<name>/checkpoint.pt     last epoch (written after every epoch)
runs/<name>/best.pt           the epoch selected on validation (what export reads by default)
runs/<name>/model.onnx        `cnnkit export --format onnx` (model.int8.onnx, model.fp16.onnx: INT8, FP16)
runs/<name>/model.b1.onnx     `cnnkit export --batch 1`: a fixed batch axis of 1 (`fixed_batch_name`)
runs/<name>/model.ts          `cnnkit export --format torchscript`
runs/<name>/model.pt2         `cnnkit export --format pt2`
runs/<name>/mistakes.png      `cnnkit train`: the most confident wrong predictions on testing/ (or validation)
runs/<name>/predictions.csv   `cnnkit infer` without --output
runs/latest -> <name>         symlink to the newest run
"""

from __future__ import annotations

import os
import time

from cnnkit.errors import ModelError
from cnnkit.files import path_kind, point_symlink

RUNS_DIR = "runs"
LATEST = "latest"
CHECKPOINT_NAME = "checkpoint.pt"  # the latest epoch, written after every epoch
BEST_NAME = "best.pt"  # the epoch selected on validation (what export reads by default)
ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
FP16_NAME = "model.fp16.onnx"
TORCHSCRIPT_NAME = "model.ts"
PT2_NAME = "model.pt2"
# Artifact kind -> the file `cnnkit export` writes beside the checkpoint (and `cnnkit bench` looks for).
ARTIFACT_NAMES = {
    "onnx": ONNX_NAME,
    "onnx-int8": INT8_NAME,
    "onnx-fp16": FP16_NAME,
    "torchscript": TORCHSCRIPT_NAME,
    "pt2": PT2_NAME,
}


def fixed_batch_name(name: str, batch: int | None) -> str:
    """The file name of an artifact with a fixed batch axis (`cnnkit export --batch N`): `model.onnx` ->
    `model.bN.onnx`, beside the dynamic one and never replacing it; `name` itself when `batch` is None."""
    if batch is None:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.b{batch}.{ext}" if dot else f"{name}.b{batch}"


PREDICTIONS_NAME = "predictions.csv"
MISTAKES_NAME = "mistakes.png"  # train's grid of its most confident wrong predictions (`cnnkit.mistakes`)
REPORT_SUFFIX = ".parity.json"  # `cnnkit export`'s report beside each artifact (stays on this machine)


def new_run_dir(runs_dir: str = RUNS_DIR, name: str | None = None) -> str:
    """Create a fresh run folder (`train-YYYYmmdd-HHMMSS`, suffixed if taken) and return it."""
    os.makedirs(runs_dir, exist_ok=True)
    base = name or time.strftime("train-%Y%m%d-%H%M%S")
    for i in range(1000):
        path = os.path.join(runs_dir, base if i == 0 else f"{base}-{i + 1}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ModelError(f"cannot create a new run folder under {runs_dir}")


def _latest_link(run_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(run_dir)), LATEST)


def latest_note(run_dir: str) -> str | None:
    """Why `mark_latest(run_dir)` will leave `latest` beside `run_dir` alone, or None when it may point it.

    cnnkit replaces `latest` only when it is absent or a symlink to a sibling folder's name (what
    `mark_latest` makes): a user's own file, folder or symlink elsewhere of that name is never touched.
    """
    link = _latest_link(run_dir)
    if not os.path.lexists(link):
        return None
    if os.path.islink(link):
        target = os.readlink(link)
        if target and os.sep not in target and target not in (".", ".."):
            return None
        kind = f"a symlink to {target}"
    else:
        kind = "a folder" if os.path.isdir(link) else "a file"
    return f"{link} is {kind}, not cnnkit's `latest` symlink: left alone, so it will not point at this run"


def mark_latest(run_dir: str) -> bool:
    """Point `latest` beside `run_dir` at it (a relative symlink, replaced atomically), unless
    `latest_note` says it is not cnnkit's. Returns whether it points there now."""
    if latest_note(run_dir) is not None:
        return False
    point_symlink(_latest_link(run_dir), os.path.basename(os.path.abspath(run_dir)))
    return True


def latest_run(runs_dir: str = RUNS_DIR) -> str:
    path = os.path.join(runs_dir, LATEST)
    if not os.path.isdir(path):
        raise ModelError(f"no {path}: train a model first (`cnnkit train`) or pass the path explicitly")
    return path


def latest_file(name: str, hint: str, runs_dir: str = RUNS_DIR) -> str:
    """`runs/latest/<name>`, or a ModelError whose message says which command makes it."""
    path = os.path.join(latest_run(runs_dir), name)
    if not os.path.isfile(path):
        there = path_kind(path)
        raise ModelError(f"no {path}: {hint}" if there == "nothing" else f"{path}: is {there}, not a file; {hint}")
    return path
