"""`cnnkit train`: load a PNG tree, train, checkpoint every epoch, plot, report.

Data path: the whole split is decoded once into a uint8 tensor (MNIST-sized data is small: 60,000
images are 47 MB) that lives on the training device, and batches are drawn from it by index. This
skips the per-sample DataLoader collation that dominates small-image training, on the CPU and even
more on a GPU. The scaling to [0, 1] is inside the model, so uint8 is what crosses the bus.

Determinism: batches come from a seeded `torch.Generator`, the model from `torch.manual_seed`, and
the learning rate is a pure function of the step, so the same seed on the CPU gives the same
metrics, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import cnnkit.meta as meta_mod
from cnnkit.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from cnnkit.console import Progress, log, table
from cnnkit.errors import DataError, ModelError
from cnnkit.files import check_outside, check_writable, write_json
from cnnkit.meta import OUTPUT_SIGMOID, ModelMeta
from cnnkit.mistakes import Mistakes
from cnnkit.models import DEFAULT_ARCH, build_model, check_arch_trusted, count_parameters, recipe_for
from cnnkit.runs import BEST_NAME, CHECKPOINT_NAME, MISTAKES_NAME, RUNS_DIR, latest_note, mark_latest, new_run_dir
from cnnkit.trainer.data import SKIPPED_KEPT, LoadedSplit, class_names, load_split, split_validation
from cnnkit.trainer.distributed import Dist, amp_for, setup, teardown
from cnnkit.version import __version__


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Stored in the checkpoint; `--resume` reuses it.

    `epochs`, `batch_size`, `lr` and `augment` left as None take the arch's recipe (`models.recipe_for`).
    `val_split` is the stratified, seeded fraction of training held out for validation, which alone
    selects the checkpoint; 0 trains on all of it and keeps the last epoch. `testing/` never takes
    part in training or selection: it is evaluated once, at the end, on the selected weights.
    `augment="flip"` mirrors a random half of each batch left-right (right for clothes, wrong for
    digits: off by default). `color` (`auto`, `gray`, `rgb`) and `size` ((H, W), None: auto) set the
    input the model takes (`cnnkit.trainer.data.input_shape`); testing is decoded to the same.
    """

    data: str | None = None
    out: str | None = None
    arch: str = DEFAULT_ARCH
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    augment: str | None = None
    classes: tuple[str, ...] | None = None
    val_split: float = 0.1
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    runs_dir: str = RUNS_DIR
    color: str = "auto"
    size: tuple[int, int] | None = None

    def resolved(self) -> TrainConfig:
        """This config with the arch's recipe filled in where a value was left as None."""
        r = recipe_for(self.arch)  # a ModelError for an unknown arch
        if self.augment is not None and self.augment not in AUGMENTS:
            raise DataError(f"unknown --augment {self.augment!r}; choose one of: {', '.join(AUGMENTS)}")
        if self.val_split is None or not 0.0 <= self.val_split < 1.0:  # also refuses NaN
            raise DataError(f"--val-split must be at least 0 and below 1, got {self.val_split}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise DataError(f"--lr must be a positive number, got {self.lr}")
        if self.color not in ("auto", "gray", "rgb"):
            raise DataError(f"unknown --color {self.color!r}; choose one of: auto, gray, rgb")
        size = tuple(self.size) if self.size is not None else None  # a list, from a checkpoint's JSON-like config
        if size is not None and (len(size) != 2 or not all(1 <= v <= meta_mod.MAX_SIDE for v in size)):
            raise DataError(f"--size must be HxW with sides from 1 to {meta_mod.MAX_SIDE}, got {self.size}")
        return replace(
            self,
            epochs=self.epochs if self.epochs is not None else r.epochs,
            batch_size=self.batch_size if self.batch_size is not None else r.batch_size,
            lr=self.lr if self.lr is not None else r.lr,
            augment=self.augment if self.augment is not None else r.augment,
            size=size,
        )


AUGMENTS = ("none", "flip", "shift", "flip+shift")
SHIFT = 2  # pixels, at most, in each direction


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A randomly changed copy of the uint8 batch `x` (N, C, H, W), drawn from `gen` (on the CPU).

    flip: mirror a random half left-right. shift: move each image by up to SHIFT pixels in each
    direction, filling with 0 (the background of MNIST-like data). Both: flip first, then shift.
    """
    n, _, h, w = x.shape
    if "flip" in kind:
        flip = torch.rand(n, generator=gen).to(x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if "shift" in kind:
        dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=gen).to(x.device)
        padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], chans, rows, cols]
    return x


@dataclass
class TrainResult:
    run_dir: str
    checkpoint: str
    classes: list[str]
    epochs: int
    device: str
    train_seconds: float
    train_images_per_second: float
    test_accuracy: float | None  # the selected weights on testing/, measured once after training
    best_epoch: int  # the selected epoch (see `selection`)
    val_accuracy: float | None  # the selected epoch's validation accuracy (None without validation)
    load_seconds: float
    images_loaded: int
    parameters: int
    plots: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    test_loss: float | None = None
    test_images: int = 0
    world_size: int = 1
    rank: int = 0  # under torchrun, which process this is (only rank 0 reports)
    n_skipped: int = 0  # files of the splits that could not be used (all processes)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {split, path, reason}, this process's first
    ignored: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> kind -> count (non-image, hidden, ...)
    input_shape: list[int] = field(default_factory=list)  # (C, H, W) the model takes
    color: str = "L"  # its input mode: L (C = 1) or RGB (C = 3)
    mistakes: list[dict[str, Any]] = field(default_factory=list)  # most confident wrong first (`_mistakes`)
    mistakes_split: str | None = None  # where they were found: "testing", else "validation", else None
    mistakes_png: str | None = None  # <run>/mistakes.png, None when there were none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM; the last completed epoch's checkpoint is intact."""

    def __init__(self, run_dir: str, epoch: int):
        super().__init__(
            f"interrupted during epoch {epoch + 1}; the checkpoint of epoch {epoch} in {run_dir} is intact "
            f"(continue with `cnnkit train --resume {run_dir}`)"
        )
        self.run_dir = run_dir


def resolve_splits(data: str | None) -> tuple[str, str | None, str]:
    """(training folder, testing folder or None, data root); the bundled digits by default."""
    from cnnkit.datasets.layout import find_splits
    from cnnkit.datasets.sample import ensure_sample

    root = data if data is not None else ensure_sample()
    splits = find_splits(root)
    return os.path.abspath(splits.train), (os.path.abspath(splits.test) if splits.test else None), root


def _lr_at(step: int, total: int, peak: float, constant: bool) -> float:
    if constant:
        return peak
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loss(out: torch.Tensor, y: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    # binary_cross_entropy is not autocast-safe: compute every loss in float32.
    if sigmoid:
        return F.binary_cross_entropy(out.float(), y.float().unsqueeze(1))
    return F.cross_entropy(out.float(), y)


def _is_better(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    if best is None or record["val_accuracy"] is None:
        return True
    return (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def _predict_labels(out: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return (out[:, 0] >= 0.5).long() if sigmoid else out.argmax(1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sigmoid: bool, d: Dist, batch: int = 512
) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy) over every process's shard, and this shard's outputs (on the CPU).

    Batches of 512: faster on the CPU than 2048, whose activations fall out of cache (docs/benchmarks.md).
    """
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])
    model.train(was_training)
    loss_sum = _loss(out, y, sigmoid).item() * len(y)
    correct = (_predict_labels(out, sigmoid) == y).sum().item()
    loss_sum, correct, count = d.all_sum(loss_sum, correct, len(y))
    return loss_sum / count, correct / count, out.cpu()


def _load_data(cfg: TrainConfig, d: Dist) -> tuple[LoadedSplit, LoadedSplit | None, LoadedSplit | None, dict]:
    """(train, validation, test) splits of this process's shard, and where they came from."""
    train_dir, test_dir, root = resolve_splits(cfg.data)
    available = class_names(train_dir)
    classes = tuple(cfg.classes) if cfg.classes else tuple(available)
    missing = [c for c in classes if c not in available]
    if missing:
        raise DataError(f"--classes {','.join(missing)} not found in {train_dir} (has: {', '.join(available)})")
    if len(classes) < 2:
        raise DataError(f"{train_dir}: training needs at least two classes, found {', '.join(classes)}")
    if len(classes) > meta_mod.MAX_CLASSES:  # its checkpoint would not load (cnnkit.meta bounds records)
        raise DataError(
            f"{train_dir}: {len(classes):,} class folders, over the {meta_mod.MAX_CLASSES:,} cnnkit "
            "supports; pick some with --classes"
        )
    kw = {"workers": cfg.workers, "shard": (d.rank, d.world), "progress": d.main}
    train = load_split(train_dir, classes, color=cfg.color, size=cfg.size, desc="loading training", **kw)
    test = None
    if test_dir is not None:
        test_classes = class_names(test_dir)
        if cfg.classes is None and test_classes != list(classes):
            raise DataError(
                f"{test_dir}: classes {', '.join(test_classes)} differ from training's {', '.join(classes)}"
            )
        test = load_split(test_dir, classes, shape=train.images.shape[1:], desc="loading testing", **kw)
    n_loaded = len(train.labels) + (len(test.labels) if test is not None else 0)
    skipped = [
        {"split": name, "path": path, "reason": reason}
        for name, split in (("training", train), ("testing", test))
        if split is not None
        for path, reason in split.skipped
    ]
    ignored = {
        name: split.ignored
        for name, split in (("training", train), ("testing", test))
        if split is not None and split.ignored
    }
    val = None
    if cfg.val_split > 0:  # carved from training only: testing/ never takes part in selection
        tr_idx, va_idx = split_validation(train.labels, cfg.val_split, cfg.seed + d.rank)
        val = _subset(train, va_idx)
        train = _subset(train, tr_idx)
    data_info = {
        "root": os.path.abspath(root),
        "train": train_dir,
        "test": test_dir,
        "val_split": cfg.val_split,
        "n_loaded": n_loaded,
        "skipped": skipped,
        "ignored": ignored,
    }
    return train, val, test, data_info


def _subset(split: LoadedSplit, idx: np.ndarray) -> LoadedSplit:
    paths = [split.paths[i] for i in idx] if len(split.paths) == len(split.labels) else []
    return LoadedSplit(split.folder, split.images[idx], split.labels[idx], split.classes, paths)


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train a model as `cfg` says and write the run folder.

    Runs as one process, or as one rank of a `torchrun` job (DistributedDataParallel; each rank
    loads its own shard, `batch_size` is the global batch, only rank 0 writes).

    Args:
        cfg: the configuration (only `epochs`, `device` and `workers` are used when resuming).
        resume: a run folder whose `checkpoint.pt` to continue from.

    Returns:
        A TrainResult; its `to_dict()` is what `cnnkit train --json` prints.

    Raises:
        CnnkitError subclasses for bad data, devices or checkpoints; Interrupted on SIGINT/SIGTERM.
    """
    d, device = setup(cfg.device)
    try:
        return _train(cfg, resume, d, device)
    finally:
        teardown(d)


@dataclass
class _Run:
    """What a run holds fixed from its first epoch to its last (built by `_set_up_run`)."""

    cfg: TrainConfig  # resolved: every recipe value filled in
    d: Dist
    device: torch.device
    run_dir: str
    meta: ModelMeta
    net: torch.nn.Module  # the bare model: its state_dict has no DDP `module.` prefixes
    model: torch.nn.Module  # what the steps call: `net`, or DistributedDataParallel around it
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    gen: torch.Generator  # draws batches and augmentations; saved in every checkpoint
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    test_split: LoadedSplit | None
    steps_per_epoch: int
    total_steps: int
    per_rank: int
    n_max: int
    n_total: int
    load_seconds: float
    images_loaded: int
    skipped_info: dict[str, Any]

    @property
    def sigmoid(self) -> bool:
        return self.meta.output == OUTPUT_SIGMOID


@dataclass
class _SoFar:
    """What one epoch hands the next: the history so far and the selected epoch's weights."""

    history: list[dict[str, Any]]
    best_epoch: int  # 0 before the first epoch
    best_state: dict[str, torch.Tensor]
    train_seconds: float = 0  # an int 0 until an epoch adds its seconds, as the sum of no epochs is


def _train(cfg: TrainConfig, resume: str | None, d: Dist, device: torch.device) -> TrainResult:
    cfg, state, recipe_epochs = _resolve_config(cfg, resume, d)
    say = log if d.main else (lambda *_: None)
    _check_run_folder(resume or cfg.out, cfg.runs_dir, say, cfg.data)
    run, so_far, start_epoch = _set_up_run(cfg, resume, state, recipe_epochs, d, device)
    say(
        f"training {run.cfg.arch} ({count_parameters(run.net):,} parameters) on {run.n_total:,} images, "
        f"{len(run.meta.classes)} classes, {run.cfg.epochs} epochs, batch {run.cfg.batch_size}"
        f"{f' ({d.world} processes x {run.per_rank})' if d.active else ''}, device {device} -> {run.run_dir}"
    )
    epoch = start_epoch
    run.model.train()
    try:
        for epoch in range(start_epoch, run.cfg.epochs):
            record = train_one_epoch(run, epoch)
            improved, weights = _validate_and_select(run, so_far, record)
            _save_checkpoints(run, so_far, epoch, improved, weights)
    except KeyboardInterrupt:
        raise Interrupted(run.run_dir, epoch) from None
    return _finish(run, so_far)


def _resolve_config(cfg: TrainConfig, resume: str | None, d: Dist) -> tuple[TrainConfig, dict[str, Any] | None, bool]:
    """(the resolved config, the checkpoint to resume or None, whether the recipe picks the epochs).

    A resumed run takes its config from the checkpoint; only `epochs`, `device` and `workers` come
    from `cfg`.
    """
    state = None
    if resume is not None:
        state = load_checkpoint(os.path.join(resume, CHECKPOINT_NAME))
        check_resumable(state, os.path.join(resume, CHECKPOINT_NAME))
        saved = _saved_config(state["config"], resume)
        check_arch_trusted(str(saved.get("arch")), cfg.arch, resume, how="--arch")  # a user arch runs code
        epochs = cfg.epochs if cfg.epochs is not None else saved["epochs"]
        cfg = TrainConfig(**{**saved, "epochs": epochs, "device": cfg.device, "workers": cfg.workers})
        if len(state["rng"]["batches"]) != d.world:
            raise ModelError(
                f"{resume} was trained with {len(state['rng']['batches'])} process(es); "
                f"resume it with the same number (this job has {d.world})"
            )
    recipe_epochs = cfg.epochs is None  # then the data's size may add epochs (Recipe.min_steps)
    cfg = cfg.resolved()
    assert cfg.epochs is not None and cfg.batch_size is not None and cfg.lr is not None
    if cfg.batch_size % d.world:
        raise DataError(f"--batch-size {cfg.batch_size} is the global batch: make it a multiple of {d.world} processes")
    return cfg, state, recipe_epochs


def _set_up_run(
    cfg: TrainConfig,
    resume: str | None,
    state: dict[str, Any] | None,
    recipe_epochs: bool,
    d: Dist,
    device: torch.device,
) -> tuple[_Run, _SoFar, int]:
    """Load the data, build (or restore) the model and optimizer: (the run, the selection so far, first epoch).

    The order of the seeding calls is part of the result: a resumed run must draw what an
    uninterrupted one would have drawn.
    """
    t_load = time.perf_counter()
    train_split, val_split, test_split, data_info = _load_data(cfg, d)
    load_seconds = time.perf_counter() - t_load
    images_loaded, skipped_info = _loading_report(data_info, d)
    net, opt, meta = _build_model(cfg, resume, state, train_split, data_info, device)
    gen, so_far, start_epoch, run_dir = _restore_progress(cfg, resume, state, net, d)
    model, scaler, amp = _for_device(net, state, device, d)

    # Every rank takes the same number of equal-sized steps: shards differ by at most one image,
    # and the smaller ones wrap around. One process: plain epochs with a partial last batch.
    n_max = d.all_max(len(train_split.labels))
    n_total = int(d.all_sum(len(train_split.labels))[0])
    per_rank = cfg.batch_size // d.world
    steps_per_epoch = math.ceil(n_max / per_rank)
    if recipe_epochs:
        cfg = replace(cfg, epochs=recipe_for(cfg.arch).epochs_for(steps_per_epoch))
    x_train, y_train = _on_device(train_split, device)
    x_val, y_val = _on_device(val_split, device) if val_split is not None else (None, None)
    run = _Run(
        cfg,
        d,
        device,
        run_dir,
        meta,
        net,
        model,
        opt,
        scaler,
        amp,
        gen,
        x_train,
        y_train,
        x_val,
        y_val,
        test_split,
        steps_per_epoch,
        steps_per_epoch * cfg.epochs,
        per_rank,
        n_max,
        n_total,
        load_seconds,
        images_loaded,
        skipped_info,
    )
    return run, so_far, start_epoch


def _on_device(split: LoadedSplit, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images and labels as tensors on the training device (the whole split fits: small images)."""
    return torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)


def _loading_report(data_info: dict[str, Any], d: Dist) -> tuple[int, dict[str, Any]]:
    """Take this run's loading counts out of `data_info` (they are not part of the model's record):
    (images loaded on every rank, the skipped-file report)."""
    images_loaded = int(d.all_sum(data_info.pop("n_loaded"))[0])
    skipped = data_info.pop("skipped")
    n_skipped = int(d.all_sum(len(skipped))[0])
    return images_loaded, {
        "n_skipped": n_skipped,
        "skipped": skipped[:SKIPPED_KEPT],
        "ignored": data_info.pop("ignored"),
    }


def _for_device(
    net: torch.nn.Module, state: dict[str, Any] | None, device: torch.device, d: Dist
) -> tuple[torch.nn.Module, torch.amp.GradScaler, torch.dtype | None]:
    """(what the steps call: `net` or DDP around it, the loss scaler restored on resume, the autocast dtype)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    amp = amp_for(device)  # None on the CPU; bf16 on GPUs that have it natively, else fp16
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if not d.active:
        return net, scaler, amp
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None), scaler, amp


def _build_model(
    cfg: TrainConfig,
    resume: str | None,
    state: dict[str, Any] | None,
    train_split: LoadedSplit,
    data_info: dict[str, Any],
    device: torch.device,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, ModelMeta]:
    """(model, optimizer, the model's record), both restored from `state` when resuming."""
    classes = train_split.classes
    _, c, h, w = train_split.images.shape
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if state is not None and (state["meta"]["classes"] != list(classes) or state["meta"]["arch"] != cfg.arch):
        raise ModelError(f"{resume}: the data's classes or the arch no longer match the checkpoint")
    net, opt, output = build_for_training(cfg, len(classes), (c, h, w), device, state)
    meta = ModelMeta(
        arch=cfg.arch,
        classes=classes,
        input_shape=(c, h, w),
        output=output,
        color="RGB" if c == 3 else "L",
        versions={"cnnkit": __version__, "torch": str(torch.__version__)},
        extra={"data": data_info},
    )
    return net, opt, meta


def _restore_progress(
    cfg: TrainConfig, resume: str | None, state: dict[str, Any] | None, net: torch.nn.Module, d: Dist
) -> tuple[torch.Generator, _SoFar, int, str]:
    """(batch generator, selection so far, first epoch, run folder): fresh, or where `state` stopped."""
    torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ between ranks
    gen = torch.Generator().manual_seed(cfg.seed + d.rank)
    if state is None:
        run_dir = d.broadcast(_run_folder(cfg) if d.main else None)
        # The selected epoch's weights so far: the initial ones until an epoch is selected.
        best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return gen, _SoFar([], 0, best_state), 0, run_dir
    assert resume is not None
    try:
        gen.set_state(state["rng"]["batches"][d.rank])
        torch.set_rng_state(state["rng"]["dropout"][d.rank])
    except (TypeError, RuntimeError, IndexError):
        raise ModelError(f"{resume}: the checkpoint's 'rng' is not a generator state; start a new run") from None
    history = list(state.get("history", []))
    # A resumed run continues from the same selection.
    so_far = _SoFar(history, int(state["best_epoch"]), state["best_model"], sum(r["seconds"] for r in history))
    return gen, so_far, int(state["epoch"]), resume


def train_one_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One pass over this rank's shard; the epoch's record (training numbers, no validation yet)."""
    cfg, d, device = run.cfg, run.d, run.device
    constant_lr = recipe_for(cfg.arch).schedule == "constant"
    n_local = len(run.x_train)
    t0 = time.perf_counter()
    perm = torch.randperm(n_local, generator=run.gen).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    progress = Progress(run.n_total, f"epoch {epoch + 1}/{cfg.epochs}", unit="img", enabled=d.main)
    with progress as bar:
        for i in range(run.steps_per_epoch):
            lo, hi = i * run.per_rank, min((i + 1) * run.per_rank, run.n_max)
            idx = perm[torch.arange(lo, hi, device=device) % n_local] if d.active else perm[lo:hi]
            xb, yb = run.x_train[idx], run.y_train[idx]
            if cfg.augment != "none":
                xb = augment(xb, cfg.augment, run.gen)
            for group in run.opt.param_groups:
                group["lr"] = _lr_at(epoch * run.steps_per_epoch + i, run.total_steps, cfg.lr, constant_lr)
            with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
                out = run.model(xb)
            loss = _loss(out, yb, run.sigmoid)
            run.opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.opt)
            run.scaler.update()
            loss_sum += loss.detach() * len(idx)
            correct += (_predict_labels(out.detach(), run.sigmoid) == yb).sum()
            if d.main and (i % 20 == 0 or i == run.steps_per_epoch - 1):  # .item() syncs a GPU
                seen = hi
                bar.update(seen * d.world - bar.n, loss=loss_sum.item() / seen, acc=correct.item() / seen)
    seconds = time.perf_counter() - t0
    seen_loss, seen_correct, seen = d.all_sum(loss_sum.item(), correct.item(), run.n_max if d.active else n_local)
    return {
        "epoch": epoch + 1,
        "train_loss": seen_loss / seen,
        "train_accuracy": seen_correct / seen,
        "val_loss": None,
        "val_accuracy": None,
        "seconds": seconds,
        "images_per_second": seen / seconds,
        "lr": run.opt.param_groups[0]["lr"],
    }


def _validate_and_select(run: _Run, so_far: _SoFar, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Validate the epoch, add it to the history and select it if it is the best so far.

    Returns (whether it was selected, its weights on the CPU).
    """
    if run.x_val is not None:
        assert run.y_val is not None
        record["val_loss"], record["val_accuracy"], _ = evaluate(run.net, run.x_val, run.y_val, run.sigmoid, run.d)
    so_far.history.append(record)
    so_far.train_seconds += record["seconds"]
    # best.pt: the highest validation accuracy, ties broken by the lower validation loss;
    # with --val-split 0, the last epoch. testing/ plays no part (it is not even on the device).
    improved = _is_better(record, so_far.history[so_far.best_epoch - 1] if so_far.best_epoch else None)
    so_far.best_epoch = record["epoch"] if improved else so_far.best_epoch
    weights = {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
    if improved:
        so_far.best_state = weights
    return improved, weights


def _save_checkpoints(run: _Run, so_far: _SoFar, epoch: int, improved: bool, weights: dict[str, Any]) -> None:
    """checkpoint.pt every epoch, best.pt when the epoch was selected, and metrics.json so far (rank 0)."""
    d = run.d
    rng = {"batches": d.gather(run.gen.get_state()), "dropout": d.gather(torch.get_rng_state())}  # every rank
    if not d.main:
        return
    ckpt = {
        "meta": run.meta.to_dict(),
        "model": weights,  # the bare module's: no DDP `module.` prefixes
        "epoch": epoch + 1,
        "optimizer": run.opt.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "history": so_far.history,
        "config": _plain_config(run.cfg),
        "rng": rng,
        "best_epoch": so_far.best_epoch,
        "world_size": d.world,
    }
    if improved:
        save_checkpoint(os.path.join(run.run_dir, BEST_NAME), ckpt)
    # checkpoint.pt also carries the selected weights, so --resume reports the same model.
    save_checkpoint(os.path.join(run.run_dir, CHECKPOINT_NAME), {**ckpt, "best_model": so_far.best_state})
    write_json(
        os.path.join(run.run_dir, "metrics.json"),
        {"config": ckpt["config"], "history": so_far.history, **run.skipped_info},
    )
    mark_latest(run.run_dir)


def _finish(run: _Run, so_far: _SoFar) -> TrainResult:
    """Evaluate the selected weights (testing/ once), write plots and metrics.json, and report."""
    # Report on the selected epoch's weights (what best.pt holds and export reads); testing/ is
    # evaluated here, once.
    cfg, d = run.cfg, run.d
    run.net.load_state_dict(so_far.best_state)
    selection = _selection(cfg, so_far.history, so_far.best_epoch, len(run.y_val) if run.y_val is not None else 0, d)
    report, (test_loss, test_accuracy) = _final_evaluation(
        run.net, run.sigmoid, d, run.device, run.x_train, run.y_train, run.x_val, run.y_val, run.test_split
    )
    n_test = int(d.all_sum(len(run.test_split.labels) if run.test_split is not None else 0)[0])
    reported = {**run.skipped_info, **_mistakes(run, report)}  # in metrics.json and the result
    plots = (
        _write_reports(run, so_far, report, selection, (test_loss, test_accuracy, n_test), reported) if d.main else []
    )
    d.barrier()  # rank 0's files exist before anyone returns
    total_images = sum(r["images_per_second"] * r["seconds"] for r in so_far.history)
    return TrainResult(
        run_dir=run.run_dir,
        checkpoint=os.path.join(run.run_dir, BEST_NAME),
        classes=list(run.meta.classes),
        epochs=len(so_far.history),
        device=str(run.device),
        train_seconds=so_far.train_seconds,
        train_images_per_second=total_images / so_far.train_seconds if so_far.train_seconds else 0.0,
        test_accuracy=test_accuracy,
        best_epoch=so_far.best_epoch,
        val_accuracy=selection["val_accuracy"],
        load_seconds=run.load_seconds,
        images_loaded=run.images_loaded,
        parameters=count_parameters(run.net),
        plots=plots,
        history=so_far.history,
        selection=selection,
        test_loss=test_loss,
        test_images=n_test,
        world_size=d.world,
        rank=d.rank,
        **reported,
        input_shape=list(run.meta.input_shape),
        color=run.meta.color,
    )


def _write_reports(
    run: _Run,
    so_far: _SoFar,
    report: dict[str, Any],
    selection: dict[str, Any],
    test: tuple[float | None, float | None, int],
    reported: dict[str, Any],
) -> list[str]:
    """Rank 0's files of a finished run: the plots and metrics.json (with `reported`: skipped files and
    mistakes); returns the plots' paths. `test`: (loss, accuracy, images) on testing/."""
    from cnnkit.trainer.plots import write_plots

    test_loss, test_accuracy, n_test = test
    scores = {name: out for name, (out, _) in report.items()}
    labels = {name: lab for name, (_, lab) in report.items()}
    plots = write_plots(
        run.run_dir, so_far.history, scores, labels, run.meta.classes, run.sigmoid, selected_epoch=so_far.best_epoch
    )
    metrics = {
        "config": _plain_config(run.cfg),
        "history": so_far.history,
        "selection": selection,
        "best_epoch": so_far.best_epoch,
        "val_accuracy": selection["val_accuracy"],
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "test_images": n_test,
        "world_size": run.d.world,
        "images_loaded": run.images_loaded,
        **reported,
    }
    write_json(os.path.join(run.run_dir, "metrics.json"), metrics)
    return plots


def _selection(cfg: TrainConfig, history: list[dict[str, Any]], best_epoch: int, n_val: int, d: Dist) -> dict:
    """How the reported checkpoint was chosen: the split, its size, the rule and the chosen epoch."""
    chosen = history[best_epoch - 1] if best_epoch else {}
    if cfg.val_split > 0:
        source = f"{cfg.val_split:g} of training/, stratified by class, seed {cfg.seed}"
        return {
            "split": "validation",
            "source": source,
            "size": int(d.all_sum(n_val)[0]),
            "rule": "best validation accuracy (ties: lower validation loss)",
            "epoch": best_epoch,
            "val_accuracy": chosen.get("val_accuracy"),
            "val_loss": chosen.get("val_loss"),
        }
    return {
        "split": None,
        "source": "--val-split 0: all of training/ trains, nothing is held out",
        "size": 0,
        "rule": "last epoch (no selection)",
        "epoch": best_epoch,
        "val_accuracy": None,
        "val_loss": None,
    }


def _final_evaluation(net, sigmoid, d, device, x_train, y_train, x_val, y_val, test_split) -> tuple[dict, tuple]:
    """({split: (outputs, labels)} gathered from every rank, for the plots; (test loss, test accuracy),
    testing/'s one and only evaluation, or (None, None)), all on the selected weights."""
    n_plot = min(len(x_train), 20000 // d.world)  # plenty for the label-vs-score plot
    parts = [("training", x_train[:n_plot], y_train[:n_plot])]
    if x_val is not None:
        parts.append(("validation", x_val, y_val))
    if test_split is not None:
        parts.append(
            ("testing", torch.from_numpy(test_split.images).to(device), torch.from_numpy(test_split.labels).to(device))
        )
    report: dict[str, Any] = {}
    test: tuple[float | None, float | None] = (None, None)
    for name, x, y in parts:
        loss, acc, out = evaluate(net, x, y, sigmoid, d)
        if name == "testing":
            test = (loss, acc)
        gathered = d.gather((out, y.cpu().numpy()))
        report[name] = (torch.cat([o for o, _ in gathered]), np.concatenate([lab for _, lab in gathered]))
    return report, test


def _mistakes(run: _Run, report: dict[str, Any]) -> dict[str, Any]:
    """The most confident wrong predictions of the final evaluation, on testing/ (else validation), from
    every rank; rank 0 draws them into mistakes.png. Every rank calls it (it gathers); only rank 0's
    answer lists them."""
    split = "testing" if run.test_split is not None else "validation" if run.x_val is not None else None
    if split is None:  # --val-split 0 and no testing/: nothing was evaluated
        return {"mistakes": [], "mistakes_split": None, "mistakes_png": None}
    mine = _rank_mistakes(run, split, report[split][0])
    kept = Mistakes(key=mine.key)
    for part in run.d.gather(mine):
        kept.merge(part)
    if not run.d.main:
        return {"mistakes": [], "mistakes_split": split, "mistakes_png": None}
    png = kept.write_grid(os.path.join(run.run_dir, MISTAKES_NAME), run.meta.classes)
    if png is not None:
        log(f"mistakes: {png} (the {len(kept)} most confident wrong predictions on {split})")
    return {"mistakes": kept.to_json(run.meta.classes), "mistakes_split": split, "mistakes_png": png}


def _rank_mistakes(run: _Run, split: str, gathered: torch.Tensor) -> Mistakes:
    """This rank's mistakes on `split`, its outputs taken from `gathered` (every rank's, in rank order).
    testing/'s are named by their path under it; validation's (which keeps no paths) by their index."""
    if split == "testing":
        assert run.test_split is not None
        images, labels, paths = run.test_split.images, run.test_split.labels, run.test_split.paths
    else:
        assert run.x_val is not None and run.y_val is not None
        images, labels, paths = run.x_val.cpu().numpy(), run.y_val.cpu().numpy(), []
    start = sum(run.d.gather(len(labels))[: run.d.rank])
    pred, prob = meta_mod.predict(gathered[start : start + len(labels)].numpy(), run.meta.output)
    mistakes = Mistakes(key="path" if len(paths) == len(labels) else "index")
    ids = paths if len(paths) == len(labels) else range(start, start + len(labels))
    mistakes.add(images, labels, pred, prob, ids)
    return mistakes


def build_for_training(
    cfg: TrainConfig,
    num_classes: int,
    shape: tuple[int, int, int],
    device: torch.device,
    state: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """(model, optimizer, output kind), the model on `device` in channels_last, and for a resume both
    restored from the checkpoint `state`.

    Order matters: the model moves to its device before the optimizer exists, and the optimizer's
    state is loaded after, so Adam's moments sit on the device (and in the dtype) of their parameters.
    Moving a module after its optimizer was built leaves that state behind: on a GPU the first step
    after a resume would mix devices.
    """
    c, h, w = shape
    net, output = build_model(cfg.arch, num_classes, h, w, c)
    if state is not None:
        net.load_state_dict(state["model"])
    # NHWC lets oneDNN (CPU) and cuDNN (GPU) pick faster convolution kernels.
    net.to(device, memory_format=torch.channels_last)
    # fused: one kernel per step instead of a dozen small ops per parameter (same numbers).
    opt = torch.optim.Adam(
        net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda")
    )
    if state is not None:
        try:
            opt.load_state_dict(state["optimizer"])  # casts each state tensor to its parameter's device
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelError(
                f"the checkpoint's 'optimizer' does not fit arch {cfg.arch!r} ({e}); start a new run"
            ) from None
    return net, opt, output


def _check_run_folder(out: str | None, runs_dir: str, say: Any, data: str | None) -> None:
    """Before any work: the run folder can hold its files, lies outside the data, and whether `latest`
    beside it is cnnkit's."""
    run = out or os.path.join(runs_dir, "new")  # a new run goes under runs_dir
    if out and os.path.lexists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: is a file, not a folder; --out takes a run folder (choose another path)")
    if data and os.path.isdir(data):
        check_outside([run], data, "the data this run trains on")
    check_writable(os.path.join(run, CHECKPOINT_NAME))
    note = latest_note(run)
    if note:
        say(f"note: {note}")


def _run_folder(cfg: TrainConfig) -> str:
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        return cfg.out
    return new_run_dir(cfg.runs_dir)


def _saved_config(config: dict[str, Any], resume: str) -> dict[str, Any]:
    """The checkpoint's config as TrainConfig keyword arguments; an unknown key is a ModelError."""
    unknown = sorted(set(config) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ModelError(
            f"{resume}: the checkpoint's config has keys this cnnkit does not know "
            f"({', '.join(unknown)}); resume it with the cnnkit that wrote it, or start a new run"
        )
    return {**config, "classes": tuple(config["classes"]) if config.get("classes") else None}


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    return {**asdict(cfg), "classes": list(cfg.classes) if cfg.classes else None}


def format_summary(result: TrainResult) -> str:
    def opt(v: float | None) -> float | str:
        return "-" if v is None else v

    rows = [
        [
            r["epoch"],
            r["train_loss"],
            r["train_accuracy"],
            opt(r["val_loss"]),
            opt(r["val_accuracy"]),
            round(r["images_per_second"]),
            r["seconds"],
        ]
        for r in result.history
    ]
    lines = [table(["epoch", "train loss", "train acc", "val loss", "val acc", "img/s", "s"], rows), ""]
    sel = result.selection
    if sel.get("split"):
        lines.append(
            f"selected epoch {result.best_epoch} by {sel['rule']} on {sel['size']:,} validation images "
            f"({sel['source']}): {result.checkpoint}"
        )
        lines.append(f"validation accuracy {result.val_accuracy:.4f} (selected epoch)")
    else:
        lines.append(
            f"kept the last epoch, {result.best_epoch} ({sel.get('source', 'no validation')}): {result.checkpoint}"
        )
    if result.test_accuracy is not None:
        lines.append(
            f"test accuracy       {result.test_accuracy:.4f} (testing/, {result.test_images:,} images, "
            "measured once on the selected weights)"
        )
    else:
        lines.append("test accuracy       - (no testing/ folder)")
    lines.append(
        f"trained {result.train_seconds:.1f} s at {result.train_images_per_second:,.0f} img/s "
        f"on {result.device} (data loaded in {result.load_seconds:.1f} s)"
    )
    if result.n_skipped:
        lines.append(f"skipped {result.n_skipped:,} file(s) that could not be used (listed above and in metrics.json)")
    if result.plots:
        lines.append(f"plots: {', '.join(result.plots)}")
    return "\n".join(lines)
