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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cnnkit import __version__
from cnnkit.console import Progress, log, table
from cnnkit.errors import DataError, DeviceError, ModelError
from cnnkit.files import write_json
from cnnkit.meta import OUTPUT_SIGMOID, ModelMeta
from cnnkit.runs import RUNS_DIR, mark_latest, new_run_dir
from cnnkit.trainer.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from cnnkit.trainer.data import LoadedSplit, class_names, load_split, split_validation
from cnnkit.trainer.models import DEFAULT_ARCH, build_model, count_parameters


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Stored in the checkpoint; `--resume` reuses it.

    `lr=None` picks the arch's default: the lecture's Adam default (1e-3, constant) for `lecture`,
    a 3e-3 peak with warm-up and cosine decay for the others. `val_split=None` holds out 10% of
    training for validation only when there is no `testing/` folder; otherwise `testing/` validates.
    """

    data: str | None = None
    out: str | None = None
    arch: str = DEFAULT_ARCH
    epochs: int = 5
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.0
    classes: tuple[str, ...] | None = None
    val_split: float | None = None
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    runs_dir: str = RUNS_DIR


@dataclass
class TrainResult:
    run_dir: str
    checkpoint: str
    classes: list[str]
    epochs: int
    device: str
    train_seconds: float
    train_images_per_second: float
    test_accuracy: float | None
    best_epoch: int
    val_accuracy: float | None
    load_seconds: float
    parameters: int
    plots: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

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


def resolve_device(device: str) -> torch.device:
    """`auto|cpu|cuda[:N]` -> torch.device; an explicit CUDA request without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")


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
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sigmoid: bool, batch: int = 2048):
    """(mean loss, accuracy, scores (N,) or (N, K) on the CPU) of `model` in eval mode."""
    was_training = model.training
    model.eval()
    outs = [model(x[i : i + batch]).float() for i in range(0, len(x), batch)]
    model.train(was_training)
    out = torch.cat(outs)
    loss = _loss(out, y, sigmoid).item()
    acc = (_predict_labels(out, sigmoid) == y).float().mean().item()
    return loss, acc, out.cpu()


def _load_data(cfg: TrainConfig) -> tuple[LoadedSplit, LoadedSplit | None, LoadedSplit | None, dict[str, Any]]:
    train_dir, test_dir, root = resolve_splits(cfg.data)
    available = class_names(train_dir)
    classes = tuple(cfg.classes) if cfg.classes else tuple(available)
    missing = [c for c in classes if c not in available]
    if missing:
        raise DataError(f"--classes {','.join(missing)} not found in {train_dir} (has: {', '.join(available)})")
    if len(classes) < 2:
        raise DataError(f"{train_dir}: training needs at least two classes, found {', '.join(classes)}")
    train = load_split(train_dir, classes, workers=cfg.workers, desc="loading training")
    test = None
    if test_dir is not None:
        test_classes = class_names(test_dir)
        if cfg.classes is None and test_classes != list(classes):
            raise DataError(
                f"{test_dir}: classes {', '.join(test_classes)} differ from training's {', '.join(classes)}"
            )
        size = tuple(train.images.shape[2:])
        test = load_split(test_dir, classes, size=size, workers=cfg.workers, desc="loading testing")  # type: ignore[arg-type]
    val_fraction = cfg.val_split if cfg.val_split is not None else (0.0 if test is not None else 0.1)
    val = test
    if val_fraction > 0:
        tr_idx, va_idx = split_validation(len(train.labels), val_fraction, cfg.seed)
        val = LoadedSplit(train.folder, train.images[va_idx], train.labels[va_idx], classes, [])
        train = LoadedSplit(train.folder, train.images[tr_idx], train.labels[tr_idx], classes, [])
    data_info = {"root": os.path.abspath(root), "train": train_dir, "test": test_dir, "val_split": val_fraction}
    return train, val, test, data_info


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train a model as `cfg` says and write the run folder.

    Args:
        cfg: the configuration (ignored except `epochs`/`device`/`workers` when resuming).
        resume: a run folder whose `checkpoint.pt` to continue from.

    Returns:
        A TrainResult; its `to_dict()` is what `cnnkit train --json` prints.

    Raises:
        CnnkitError subclasses for bad data, devices or checkpoints; Interrupted on SIGINT/SIGTERM.
    """
    state = None
    if resume is not None:
        state = load_checkpoint(os.path.join(resume, CHECKPOINT_NAME))
        saved = dict(state.get("config", {}))
        saved["classes"] = tuple(saved["classes"]) if saved.get("classes") else None
        cfg = TrainConfig(**{**saved, "epochs": cfg.epochs, "device": cfg.device, "workers": cfg.workers})
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    train_split, val_split, test_split, data_info = _load_data(cfg)
    load_seconds = time.perf_counter() - t_load
    classes = train_split.classes
    _, _, h, w = train_split.images.shape
    model, output = build_model(cfg.arch, len(classes), h, w)
    sigmoid = output == OUTPUT_SIGMOID
    meta = ModelMeta(
        arch=cfg.arch,
        classes=classes,
        input_shape=(1, h, w),
        output=output,
        versions={"cnnkit": __version__, "torch": str(torch.__version__)},
        extra={"data": data_info},
    )
    lr = cfg.lr if cfg.lr is not None else (1e-3 if cfg.arch == "lecture" else 3e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    start_epoch, best_epoch = 0, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    if state is not None:
        if state["meta"]["classes"] != list(classes) or state["meta"]["arch"] != cfg.arch:
            raise ModelError(f"{resume}: the data's classes or the arch no longer match the checkpoint")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"]["torch"])
        torch.set_rng_state(state["rng"]["cpu"])
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
        best_epoch = int(state.get("best_epoch", 0))
        run_dir = resume
    else:
        run_dir = cfg.out or new_run_dir(cfg.runs_dir)
        os.makedirs(run_dir, exist_ok=True)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    model.to(device)
    x_train = torch.from_numpy(train_split.images).to(device)
    y_train = torch.from_numpy(train_split.labels).to(device)
    x_val = torch.from_numpy(val_split.images).to(device) if val_split is not None else None
    y_val = torch.from_numpy(val_split.labels).to(device) if val_split is not None else None

    n = len(x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    log(
        f"training {cfg.arch} ({count_parameters(model):,} parameters) on {n:,} images, "
        f"{len(classes)} classes, {cfg.epochs} epochs, batch {cfg.batch_size}, device {device} -> {run_dir}"
    )
    train_seconds = sum(r["seconds"] for r in history)
    epoch = start_epoch
    model.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            with Progress(n, f"epoch {epoch + 1}/{cfg.epochs}", unit="img") as bar:
                for i in range(steps_per_epoch):
                    idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                    xb, yb = x_train[idx], y_train[idx]
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(epoch * steps_per_epoch + i, total_steps, lr, cfg.arch == "lecture")
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        out = model(xb)
                    loss = _loss(out, yb, sigmoid)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    loss_sum += loss.detach() * len(idx)
                    correct += (_predict_labels(out.detach(), sigmoid) == yb).sum()
                    if i % 20 == 0 or i == steps_per_epoch - 1:  # .item() syncs a GPU: not every step
                        seen = min(n, (i + 1) * cfg.batch_size)
                        bar.update(seen - bar.n, loss=loss_sum.item() / seen, acc=correct.item() / seen)
            seconds = time.perf_counter() - t0
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": loss_sum.item() / n,
                "train_accuracy": correct.item() / n,
                "val_loss": None,
                "val_accuracy": None,
                "seconds": seconds,
                "images_per_second": n / seconds,
                "lr": opt.param_groups[0]["lr"],
            }
            if x_val is not None:
                record["val_loss"], record["val_accuracy"], _ = evaluate(model, x_val, y_val, sigmoid)
            history.append(record)
            train_seconds += seconds
            # best.pt: the highest validation accuracy, ties broken by the lower validation loss;
            # without validation data, the last epoch.
            improved = _is_better(record, history[best_epoch - 1] if best_epoch else None)
            best_epoch = epoch + 1 if improved else best_epoch
            ckpt = {
                "meta": meta.to_dict(),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "epoch": epoch + 1,
                "optimizer": opt.state_dict(),
                "history": history,
                "config": {**asdict(cfg), "classes": list(cfg.classes) if cfg.classes else None},
                "rng": {"torch": gen.get_state(), "cpu": torch.get_rng_state()},  # batches, dropout
                "best_epoch": best_epoch,
            }
            save_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME), ckpt)
            if improved:
                save_checkpoint(os.path.join(run_dir, BEST_NAME), ckpt)
            write_json(os.path.join(run_dir, "metrics.json"), {"config": ckpt["config"], "history": history})
            mark_latest(run_dir)
    except KeyboardInterrupt:
        raise Interrupted(run_dir, epoch) from None

    from cnnkit.trainer.plots import write_plots

    # Report on best.pt, the checkpoint that export reads.
    test_accuracy = None
    best_model = model
    best_model.load_state_dict(load_checkpoint(os.path.join(run_dir, BEST_NAME))["model"])
    scores = {}
    x_tr_eval = x_train[:20000]  # plenty for the label-vs-score plot
    _, _, scores["training"] = evaluate(best_model, x_tr_eval, y_train[: len(x_tr_eval)], sigmoid)
    labels = {"training": train_split.labels[: len(x_tr_eval)]}
    if test_split is not None:
        x_test = torch.from_numpy(test_split.images).to(device)
        y_test = torch.from_numpy(test_split.labels).to(device)
        _, test_accuracy, scores["testing"] = evaluate(best_model, x_test, y_test, sigmoid)
        labels["testing"] = test_split.labels
    elif val_split is not None:
        _, _, scores["validation"] = evaluate(best_model, x_val, y_val, sigmoid)
        labels["validation"] = val_split.labels
    plots = write_plots(run_dir, history, scores, labels, classes, sigmoid)
    write_json(
        os.path.join(run_dir, "metrics.json"),
        {"config": ckpt["config"], "history": history, "best_epoch": best_epoch, "test_accuracy": test_accuracy},
    )
    total_images = sum(len(x_train) for _ in history)
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
        val_accuracy=history[best_epoch - 1]["val_accuracy"],
        load_seconds=load_seconds,
        parameters=count_parameters(model),
        plots=plots,
        history=history,
    )


def format_summary(result: TrainResult) -> str:
    rows = [
        [r["epoch"], r["train_loss"], r["train_accuracy"], r["val_loss"] if r["val_loss"] is not None else "-",
         r["val_accuracy"] if r["val_accuracy"] is not None else "-", round(r["images_per_second"]), r["seconds"]]
        for r in result.history
    ]
    lines = [table(["epoch", "train loss", "train acc", "val loss", "val acc", "img/s", "s"], rows), ""]
    lines.append(f"best epoch {result.best_epoch}: {result.checkpoint}")
    if result.test_accuracy is not None:
        lines.append(f"test accuracy {result.test_accuracy:.4f}")
    lines.append(f"trained {result.train_seconds:.1f} s at {result.train_images_per_second:,.0f} img/s "
                 f"on {result.device} (data loaded in {result.load_seconds:.1f} s)")
    if result.plots:
        lines.append(f"plots: {', '.join(result.plots)}")
    return "\n".join(lines)
