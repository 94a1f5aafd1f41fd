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

from cnnkit import __version__
from cnnkit import meta as meta_mod
from cnnkit.console import Progress, log, table
from cnnkit.errors import DataError, ModelError
from cnnkit.files import check_writable, write_json
from cnnkit.meta import OUTPUT_SIGMOID, ModelMeta
from cnnkit.runs import RUNS_DIR, latest_note, mark_latest, new_run_dir
from cnnkit.trainer.checkpoint import BEST_NAME, CHECKPOINT_NAME, check_resumable, load_checkpoint, save_checkpoint
from cnnkit.trainer.data import SKIPPED_KEPT, LoadedSplit, class_names, load_split, split_validation
from cnnkit.trainer.distributed import Dist, amp_for, setup, teardown
from cnnkit.trainer.models import DEFAULT_ARCH, RECIPES, build_model, count_parameters


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Stored in the checkpoint; `--resume` reuses it.

    `epochs`, `batch_size`, `lr` and `augment` left as None take the arch's recipe (`models.RECIPES`).
    `val_split` is the stratified, seeded fraction of training held out for validation, which alone
    selects the checkpoint; 0 trains on all of it and keeps the last epoch. `testing/` never takes
    part in training or selection: it is evaluated once, at the end, on the selected weights.
    `augment="flip"` mirrors a random half of each batch left-right (right for clothes, wrong for
    digits: off by default).
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

    def resolved(self) -> TrainConfig:
        """This config with the arch's recipe filled in where a value was left as None."""
        if self.arch not in RECIPES:
            raise ModelError(f"unknown arch {self.arch!r}; choose one of: {', '.join(RECIPES)}")
        if self.augment is not None and self.augment not in AUGMENTS:
            raise DataError(f"unknown --augment {self.augment!r}; choose one of: {', '.join(AUGMENTS)}")
        if self.val_split is None or not 0.0 <= self.val_split < 1.0:  # also refuses NaN
            raise DataError(f"--val-split must be at least 0 and below 1, got {self.val_split}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise DataError(f"--lr must be a positive number, got {self.lr}")
        r = RECIPES[self.arch]
        return replace(
            self,
            epochs=self.epochs if self.epochs is not None else r.epochs,
            batch_size=self.batch_size if self.batch_size is not None else r.batch_size,
            lr=self.lr if self.lr is not None else r.lr,
            augment=self.augment if self.augment is not None else r.augment,
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
        dy, dx = (torch.randint(0, 2 * SHIFT + 1, (2, n), generator=gen).to(x.device))
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
    ignored: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> kind -> count (non-PNG, hidden, ...)

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

    Batches of 512: on the CPU here 1.5x faster than 2048, whose activations fall out of cache.
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
        raise DataError(f"{train_dir}: {len(classes):,} class folders, over the {meta_mod.MAX_CLASSES:,} cnnkit "
                        "supports; pick some with --classes")
    kw = {"workers": cfg.workers, "shard": (d.rank, d.world), "progress": d.main}
    train = load_split(train_dir, classes, desc="loading training", **kw)
    test = None
    if test_dir is not None:
        test_classes = class_names(test_dir)
        if cfg.classes is None and test_classes != list(classes):
            raise DataError(
                f"{test_dir}: classes {', '.join(test_classes)} differ from training's {', '.join(classes)}"
            )
        size = (train.images.shape[2], train.images.shape[3])
        test = load_split(test_dir, classes, size=size, desc="loading testing", **kw)
    n_loaded = len(train.labels) + (len(test.labels) if test is not None else 0)
    skipped = [{"split": name, "path": path, "reason": reason}
               for name, split in (("training", train), ("testing", test)) if split is not None
               for path, reason in split.skipped]
    ignored = {name: split.ignored for name, split in (("training", train), ("testing", test))
               if split is not None and split.ignored}
    val = None
    if cfg.val_split > 0:  # carved from training only: testing/ never takes part in selection
        tr_idx, va_idx = split_validation(train.labels, cfg.val_split, cfg.seed + d.rank)
        val = _subset(train, va_idx)
        train = _subset(train, tr_idx)
    data_info = {"root": os.path.abspath(root), "train": train_dir, "test": test_dir, "val_split": cfg.val_split,
                 "n_loaded": n_loaded, "skipped": skipped, "ignored": ignored}
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


def _train(cfg: TrainConfig, resume: str | None, d: Dist, device: torch.device) -> TrainResult:
    state = None
    if resume is not None:
        state = load_checkpoint(os.path.join(resume, CHECKPOINT_NAME))
        check_resumable(state, os.path.join(resume, CHECKPOINT_NAME))
        saved = _saved_config(state["config"], resume)
        epochs = cfg.epochs if cfg.epochs is not None else saved["epochs"]
        cfg = TrainConfig(**{**saved, "epochs": epochs, "device": cfg.device, "workers": cfg.workers})
        if len(state["rng"]["batches"]) != d.world:
            raise ModelError(f"{resume} was trained with {len(state['rng']['batches'])} process(es); "
                             f"resume it with the same number (this job has {d.world})")
    recipe_epochs = cfg.epochs is None  # then the data's size may add epochs (Recipe.min_steps)
    cfg = cfg.resolved()
    assert cfg.epochs is not None and cfg.batch_size is not None and cfg.lr is not None
    if cfg.batch_size % d.world:
        raise DataError(f"--batch-size {cfg.batch_size} is the global batch: make it a multiple of {d.world} processes")
    say = log if d.main else (lambda *_: None)
    _check_run_folder(resume or cfg.out, cfg.runs_dir, say)
    t_load = time.perf_counter()
    train_split, val_split, test_split, data_info = _load_data(cfg, d)
    load_seconds = time.perf_counter() - t_load
    images_loaded = int(d.all_sum(data_info.pop("n_loaded"))[0])
    skipped = data_info.pop("skipped")  # not part of the model's record: it describes this run's folders
    n_skipped = int(d.all_sum(len(skipped))[0])
    skipped_info = {"n_skipped": n_skipped, "skipped": skipped[:SKIPPED_KEPT], "ignored": data_info.pop("ignored")}
    classes = train_split.classes
    _, _, h, w = train_split.images.shape
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if state is not None and (state["meta"]["classes"] != list(classes) or state["meta"]["arch"] != cfg.arch):
        raise ModelError(f"{resume}: the data's classes or the arch no longer match the checkpoint")
    net, opt, output = build_for_training(cfg, len(classes), h, w, device, state)
    sigmoid = output == OUTPUT_SIGMOID
    meta = ModelMeta(
        arch=cfg.arch,
        classes=classes,
        input_shape=(1, h, w),
        output=output,
        versions={"cnnkit": __version__, "torch": str(torch.__version__)},
        extra={"data": data_info},
    )
    lr, constant_lr = cfg.lr, RECIPES[cfg.arch].schedule == "constant"
    history: list[dict[str, Any]] = []
    start_epoch, best_epoch = 0, 0
    torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ between ranks
    gen = torch.Generator().manual_seed(cfg.seed + d.rank)
    if state is not None:
        try:
            gen.set_state(state["rng"]["batches"][d.rank])
            torch.set_rng_state(state["rng"]["dropout"][d.rank])
        except (TypeError, RuntimeError, IndexError):
            raise ModelError(f"{resume}: the checkpoint's 'rng' is not a generator state; start a new run") from None
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
        best_epoch = int(state["best_epoch"])
        run_dir = resume
    else:
        run_dir = d.broadcast(_run_folder(cfg) if d.main else None)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    amp = amp_for(device)  # None on the CPU; bf16 on GPUs that have it natively, else fp16
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    model: torch.nn.Module = net
    if d.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    x_train = torch.from_numpy(train_split.images).to(device)
    y_train = torch.from_numpy(train_split.labels).to(device)
    x_val = torch.from_numpy(val_split.images).to(device) if val_split is not None else None
    y_val = torch.from_numpy(val_split.labels).to(device) if val_split is not None else None

    # Every rank takes the same number of equal-sized steps: shards differ by at most one image,
    # and the smaller ones wrap around. One process: plain epochs with a partial last batch.
    n_local = len(x_train)
    n_max = d.all_max(n_local)
    n_total = int(d.all_sum(n_local)[0])
    per_rank = cfg.batch_size // d.world
    steps_per_epoch = math.ceil(n_max / per_rank)
    if recipe_epochs:
        cfg = replace(cfg, epochs=RECIPES[cfg.arch].epochs_for(steps_per_epoch))
    total_steps = steps_per_epoch * cfg.epochs
    say(
        f"training {cfg.arch} ({count_parameters(net):,} parameters) on {n_total:,} images, "
        f"{len(classes)} classes, {cfg.epochs} epochs, batch {cfg.batch_size}"
        f"{f' ({d.world} processes x {per_rank})' if d.active else ''}, device {device} -> {run_dir}"
    )
    train_seconds = sum(r["seconds"] for r in history)
    # The selected epoch's weights so far; a resumed run continues from the same selection.
    best_state = state["best_model"] if state is not None else {k: v.detach().cpu().clone()
                                                                for k, v in net.state_dict().items()}
    epoch = start_epoch
    model.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(n_local, generator=gen).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            progress = Progress(n_total, f"epoch {epoch + 1}/{cfg.epochs}", unit="img", enabled=d.main)
            with progress as bar:
                for i in range(steps_per_epoch):
                    lo, hi = i * per_rank, min((i + 1) * per_rank, n_max)
                    idx = perm[torch.arange(lo, hi, device=device) % n_local] if d.active else perm[lo:hi]
                    xb, yb = x_train[idx], y_train[idx]
                    if cfg.augment != "none":
                        xb = augment(xb, cfg.augment, gen)
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(epoch * steps_per_epoch + i, total_steps, lr, constant_lr)
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        out = model(xb)
                    loss = _loss(out, yb, sigmoid)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    loss_sum += loss.detach() * len(idx)
                    correct += (_predict_labels(out.detach(), sigmoid) == yb).sum()
                    if d.main and (i % 20 == 0 or i == steps_per_epoch - 1):  # .item() syncs a GPU
                        seen = hi
                        bar.update(seen * d.world - bar.n, loss=loss_sum.item() / seen, acc=correct.item() / seen)
            seconds = time.perf_counter() - t0
            seen_loss, seen_correct, seen = d.all_sum(loss_sum.item(), correct.item(), n_max if d.active else n_local)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": seen_loss / seen,
                "train_accuracy": seen_correct / seen,
                "val_loss": None,
                "val_accuracy": None,
                "seconds": seconds,
                "images_per_second": seen / seconds,
                "lr": opt.param_groups[0]["lr"],
            }
            if x_val is not None:
                record["val_loss"], record["val_accuracy"], _ = evaluate(net, x_val, y_val, sigmoid, d)
            history.append(record)
            train_seconds += seconds
            # best.pt: the highest validation accuracy, ties broken by the lower validation loss;
            # with --val-split 0, the last epoch. testing/ plays no part (it is not even on the device).
            improved = _is_better(record, history[best_epoch - 1] if best_epoch else None)
            best_epoch = epoch + 1 if improved else best_epoch
            weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if improved:
                best_state = weights
            rng = {"batches": d.gather(gen.get_state()), "dropout": d.gather(torch.get_rng_state())}
            if d.main:
                ckpt = {
                    "meta": meta.to_dict(),
                    "model": weights,  # the bare module's: no DDP `module.` prefixes
                    "epoch": epoch + 1,
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "history": history,
                    "config": _plain_config(cfg),
                    "rng": rng,
                    "best_epoch": best_epoch,
                    "world_size": d.world,
                }
                if improved:
                    save_checkpoint(os.path.join(run_dir, BEST_NAME), ckpt)
                # checkpoint.pt also carries the selected weights, so --resume reports the same model.
                save_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME), {**ckpt, "best_model": best_state})
                write_json(os.path.join(run_dir, "metrics.json"),
                           {"config": ckpt["config"], "history": history, **skipped_info})
                mark_latest(run_dir)
    except KeyboardInterrupt:
        raise Interrupted(run_dir, epoch) from None

    # Report on the selected epoch's weights (what best.pt holds and export reads); testing/ is
    # evaluated here, once.
    net.load_state_dict(best_state)
    selection = _selection(cfg, history, best_epoch, len(y_val) if y_val is not None else 0, d)
    report, (test_loss, test_accuracy) = _final_evaluation(net, sigmoid, d, device, x_train, y_train, x_val, y_val,
                                                           test_split)
    n_test = int(d.all_sum(len(test_split.labels) if test_split is not None else 0)[0])
    plots: list[str] = []
    if d.main:
        from cnnkit.trainer.plots import write_plots

        scores = {name: out for name, (out, _) in report.items()}
        labels = {name: lab for name, (_, lab) in report.items()}
        plots = write_plots(run_dir, history, scores, labels, classes, sigmoid, selected_epoch=best_epoch)
        write_json(
            os.path.join(run_dir, "metrics.json"),
            {"config": _plain_config(cfg), "history": history, "selection": selection, "best_epoch": best_epoch,
             "val_accuracy": selection["val_accuracy"], "test_accuracy": test_accuracy, "test_loss": test_loss,
             "test_images": n_test, "world_size": d.world, **skipped_info},
        )
    d.barrier()  # rank 0's files exist before anyone returns
    total_images = sum(r["images_per_second"] * r["seconds"] for r in history)
    return TrainResult(
        run_dir=run_dir,
        checkpoint=os.path.join(run_dir, BEST_NAME),
        classes=list(classes),
        epochs=len(history),
        device=str(device),
        train_seconds=train_seconds,
        train_images_per_second=total_images / train_seconds if train_seconds else 0.0,
        test_accuracy=test_accuracy,
        best_epoch=best_epoch,
        val_accuracy=selection["val_accuracy"],
        load_seconds=load_seconds,
        images_loaded=images_loaded,
        parameters=count_parameters(net),
        plots=plots,
        history=history,
        selection=selection,
        test_loss=test_loss,
        test_images=n_test,
        world_size=d.world,
        rank=d.rank,
        **skipped_info,
    )


def _selection(cfg: TrainConfig, history: list[dict[str, Any]], best_epoch: int, n_val: int, d: Dist) -> dict:
    """How the reported checkpoint was chosen: the split, its size, the rule and the chosen epoch."""
    chosen = history[best_epoch - 1] if best_epoch else {}
    if cfg.val_split > 0:
        source = f"{cfg.val_split:g} of training/, stratified by class, seed {cfg.seed}"
        return {"split": "validation", "source": source,
                "size": int(d.all_sum(n_val)[0]), "rule": "best validation accuracy (ties: lower validation loss)",
                "epoch": best_epoch, "val_accuracy": chosen.get("val_accuracy"), "val_loss": chosen.get("val_loss")}
    return {"split": None, "source": "--val-split 0: all of training/ trains, nothing is held out", "size": 0,
            "rule": "last epoch (no selection)", "epoch": best_epoch, "val_accuracy": None, "val_loss": None}


def _final_evaluation(net, sigmoid, d, device, x_train, y_train, x_val, y_val, test_split) -> tuple[dict, tuple]:
    """({split: (outputs, labels)} gathered from every rank, for the plots; (test loss, test accuracy),
    testing/'s one and only evaluation, or (None, None)), all on the selected weights."""
    n_plot = min(len(x_train), 20000 // d.world)  # plenty for the label-vs-score plot
    parts = [("training", x_train[:n_plot], y_train[:n_plot])]
    if x_val is not None:
        parts.append(("validation", x_val, y_val))
    if test_split is not None:
        parts.append(("testing", torch.from_numpy(test_split.images).to(device),
                      torch.from_numpy(test_split.labels).to(device)))
    report: dict[str, Any] = {}
    test: tuple[float | None, float | None] = (None, None)
    for name, x, y in parts:
        loss, acc, out = evaluate(net, x, y, sigmoid, d)
        if name == "testing":
            test = (loss, acc)
        gathered = d.gather((out, y.cpu().numpy()))
        report[name] = (torch.cat([o for o, _ in gathered]), np.concatenate([lab for _, lab in gathered]))
    return report, test


def build_for_training(
    cfg: TrainConfig, num_classes: int, h: int, w: int, device: torch.device, state: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """(model, optimizer, output kind), the model on `device` in channels_last, and for a resume both
    restored from the checkpoint `state`.

    Order matters: the model moves to its device before the optimizer exists, and the optimizer's
    state is loaded after, so Adam's moments sit on the device (and in the dtype) of their parameters.
    Moving a module after its optimizer was built leaves that state behind: on a GPU the first step
    after a resume would mix devices.
    """
    net, output = build_model(cfg.arch, num_classes, h, w)
    if state is not None:
        net.load_state_dict(state["model"])
    # NHWC lets oneDNN (CPU) and cuDNN (GPU) pick faster convolution kernels.
    net.to(device, memory_format=torch.channels_last)
    # fused: one kernel per step instead of a dozen small ops per parameter (same numbers).
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=device.type in ("cpu", "cuda"))
    if state is not None:
        try:
            opt.load_state_dict(state["optimizer"])  # casts each state tensor to its parameter's device
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelError(f"the checkpoint's 'optimizer' does not fit arch {cfg.arch!r} ({e}); "
                             "start a new run") from None
    return net, opt, output


def _check_run_folder(out: str | None, runs_dir: str, say: Any) -> None:
    """Before any work: the run folder can hold its files, and whether `latest` beside it is cnnkit's."""
    run = out or os.path.join(runs_dir, "new")  # a new run goes under runs_dir
    if out and os.path.lexists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: is a file, not a folder; --out takes a run folder (choose another path)")
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
        raise ModelError(f"{resume}: the checkpoint's config has keys this cnnkit does not know "
                         f"({', '.join(unknown)}); resume it with the cnnkit that wrote it, or start a new run")
    return {**config, "classes": tuple(config["classes"]) if config.get("classes") else None}


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    return {**asdict(cfg), "classes": list(cfg.classes) if cfg.classes else None}


def format_summary(result: TrainResult) -> str:
    def opt(v: float | None) -> float | str:
        return "-" if v is None else v

    rows = [
        [r["epoch"], r["train_loss"], r["train_accuracy"], opt(r["val_loss"]), opt(r["val_accuracy"]),
         round(r["images_per_second"]), r["seconds"]]
        for r in result.history
    ]
    lines = [table(["epoch", "train loss", "train acc", "val loss", "val acc", "img/s", "s"], rows), ""]
    sel = result.selection
    if sel.get("split"):
        lines.append(f"selected epoch {result.best_epoch} by {sel['rule']} on {sel['size']:,} validation images "
                     f"({sel['source']}): {result.checkpoint}")
        lines.append(f"validation accuracy {result.val_accuracy:.4f} (selected epoch)")
    else:
        lines.append(f"kept the last epoch, {result.best_epoch} ({sel.get('source', 'no validation')}): "
                     f"{result.checkpoint}")
    if result.test_accuracy is not None:
        lines.append(f"test accuracy       {result.test_accuracy:.4f} (testing/, {result.test_images:,} images, "
                     "measured once on the selected weights)")
    else:
        lines.append("test accuracy       - (no testing/ folder)")
    lines.append(f"trained {result.train_seconds:.1f} s at {result.train_images_per_second:,.0f} img/s "
                 f"on {result.device} (data loaded in {result.load_seconds:.1f} s)")
    if result.n_skipped:
        lines.append(f"skipped {result.n_skipped:,} file(s) that could not be used (listed above and in "
                     "metrics.json)")
    if result.plots:
        lines.append(f"plots: {', '.join(result.plots)}")
    return "\n".join(lines)
