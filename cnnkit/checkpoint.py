"""Checkpoints: tensors and plain data only, so `torch.load(weights_only=True)` reads them.

A run writes two (names in `cnnkit.runs`): `checkpoint.pt` after every epoch, and `best.pt` whenever
validation selects the epoch (`cnnkit export` reads `best.pt`).

Layout (a dict):
    format:     "cnnkit.checkpoint/1"
    meta:       the model record (`cnnkit.meta.ModelMeta.to_dict()`)
    model:      the model's state_dict (keys `net.<i>.<param>`, no `module.` prefixes)
    epoch:      epochs completed
    optimizer:  the optimizer's state_dict (for `--resume`)
    history:    list of per-epoch metric dicts
    config:     the training config as a plain dict
    rng:        {"batches": [ByteTensor], "dropout": [ByteTensor]} generator states, one per process,
                so a resumed run draws the same batches
    best_epoch, best_model (checkpoint.pt only), scaler, world_size: what `--resume` continues from
"""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import torch

from cnnkit.errors import ModelError
from cnnkit.files import atomic_path, check_model_file
from cnnkit.meta import ModelMeta
from cnnkit.models import Classifier, build_model, check_arch_trusted

FORMAT = "cnnkit.checkpoint/1"


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    # Written by Python, not by torch's own writer, whose full-disk error is a RuntimeError
    # (`atomic_path` turns an OSError into one line naming the path).
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def is_checkpoint(path: str) -> bool:
    """Whether `path` is a cnnkit checkpoint, by a look at its pickle only (no tensors loaded)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and FORMAT.encode() in z.read(name)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load and validate a cnnkit checkpoint (never unpickles objects).

    Raises:
        ModelError: missing, truncated, foreign or unsafe file.
    """
    check_model_file(path, "checkpoint", "train one with `cnnkit train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; keep the line that names what the file wanted to unpickle.
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "global" in ln.lower()]
        why = lines[0].split(" was not")[0] if lines else "it holds Python objects"
        raise ModelError(f"{path}: refused to load, it is not plain tensors and data ({why})") from None
    except Exception as e:  # untrusted bytes: torch raises KeyError, EOFError, RuntimeError, ...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: not a readable checkpoint (truncated or not a torch file: {why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{path}: not a cnnkit checkpoint (expected format {FORMAT!r})")
    for key in ("meta", "model"):
        if key not in ckpt:
            raise ModelError(f"{path}: cnnkit checkpoint without {key!r}; it may be truncated")
    try:
        ModelMeta.from_dict(ckpt["meta"])  # validate now, not at first use
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return ckpt


# What `cnnkit train --resume` reads beyond `load_checkpoint`'s keys (`scaler` and `history` may be empty).
RESUME_KEYS = ("config", "epoch", "best_epoch", "best_model", "optimizer", "rng")
RNG_KEYS = ("batches", "dropout")


def check_resumable(ckpt: dict[str, Any], path: str) -> None:
    """Refuse, in one line naming the key, a checkpoint that `--resume` cannot continue from.

    Raises:
        ModelError: a key is missing or is not the plain data `cnnkit train` writes.
    """
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise _unresumable(path, "config")
    if config.get("val_split") is None or "best_model" not in ckpt:
        raise ModelError(
            f"{path} was written by cnnkit before 0.4, which validated on testing/; "
            "start a new run (its checkpoints still export)"
        )
    for key in RESUME_KEYS:
        if key not in ckpt:
            raise _unresumable(path, key)
    rng = ckpt["rng"]
    for key in RNG_KEYS:
        if not isinstance(rng, dict) or not isinstance(rng.get(key), list | tuple) or not rng[key]:
            raise _unresumable(path, f"rng.{key}")
    if "epochs" not in config:
        raise _unresumable(path, "config.epochs")


def _unresumable(path: str, key: str) -> ModelError:
    return ModelError(
        f"{path}: cannot resume, the checkpoint has no usable {key!r} (damaged, or not written by "
        "`cnnkit train`); start a new run, or export it as it is"
    )


def model_from_checkpoint(
    path: str, trust_arch: str | None = None, how: str = "--trust-arch"
) -> tuple[Classifier, ModelMeta, dict[str, Any]]:
    """Rebuild the eval-mode model a checkpoint describes.

    A checkpoint of a user arch (`module.path:ClassName`) is rebuilt only when `trust_arch` is that same
    import string: importing the module runs its code, and the checkpoint may come from anyone
    (`cnnkit.models.check_arch_trusted`; `how` names the option that allows it, for the error).

    Returns:
        (model on the CPU in eval mode, its metadata record, the raw checkpoint dict).

    Raises:
        ModelError: `load_checkpoint`'s errors, an untrusted user arch, weights that do not fit the arch.
    """
    ckpt = load_checkpoint(path)
    meta = ModelMeta.from_dict(ckpt["meta"])
    check_arch_trusted(meta.arch, trust_arch, path, how)
    c, h, w = meta.input_shape
    model, _ = build_model(meta.arch, meta.num_classes, h, w, c)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ModelError(f"{path}: weights do not match arch {meta.arch!r}: {' '.join(lines[1:3])}") from None
    return model.eval(), meta, ckpt
