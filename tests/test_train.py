from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from cnnkit.errors import DataError, DeviceError, ModelError
from cnnkit.trainer import loop
from cnnkit.trainer.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from cnnkit.trainer.loop import Interrupted, TrainConfig, train
from cnnkit.trainer.models import build_model, count_parameters


def test_lecture_arch_is_the_lectures_network():
    model, output = build_model("lecture", 2, 28, 28)
    layers = list(model.net)
    assert output == "sigmoid"
    assert [type(m) for m in layers] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.Sigmoid]
    conv, lin = layers[0], layers[4]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 16, (5, 5))
    assert (lin.in_features, lin.out_features) == (2304, 1)
    ten, output10 = build_model("lecture", 10, 28, 28)
    assert output10 == "logits" and list(ten.net)[-1].out_features == 10


def test_models_scale_uint8_inside_and_stay_small():
    for arch in ("lecture", "small"):
        model, _ = build_model(arch, 10, 28, 28)
        assert count_parameters(model) < 100_000
        x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
        torch.testing.assert_close(model.eval()(x), model.net(x.float() / 255.0))


def _cfg(tmp_path, data, **kw) -> TrainConfig:
    kw.setdefault("epochs", 1)
    return TrainConfig(data=data, runs_dir=os.fspath(tmp_path / "runs"), workers=0, **kw)


def test_train_writes_a_complete_run(tmp_path, tiny_tree):
    result = train(_cfg(tmp_path, tiny_tree, epochs=2))
    run = result.run_dir
    for name in (CHECKPOINT_NAME, BEST_NAME, "metrics.json", "curves.png", "scores_training.png",
                 "scores_testing.png", "confusion.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    raw = torch.load(os.path.join(run, BEST_NAME), weights_only=True)  # plain tensors and data only
    assert raw["meta"]["classes"] == ["0", "1", "2"] and raw["meta"]["input_shape"] == [1, 28, 28]
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert os.path.realpath(tmp_path / "runs" / "latest") == os.path.realpath(run)
    assert result.classes == ["0", "1", "2"] and result.epochs == 2
    assert 0.0 <= result.test_accuracy <= 1.0 and result.train_images_per_second > 0
    model, meta, _ = model_from_checkpoint(result.checkpoint)
    assert meta.output == "logits" and not model.training


def _interrupt_after_epoch(monkeypatch, k: int) -> None:
    """Make the first batch after epoch k's checkpoint raise KeyboardInterrupt, as Ctrl-C would."""
    real_save = loop.save_checkpoint

    def save(path, state):
        real_save(path, state)
        if state["epoch"] == k and path.endswith(CHECKPOINT_NAME):
            monkeypatch.setattr(loop, "_loss", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))

    monkeypatch.setattr(loop, "save_checkpoint", save)


def test_same_seed_same_metrics_and_resume_continues_exactly(tmp_path, tiny_tree, monkeypatch):
    a = train(_cfg(tmp_path, tiny_tree, epochs=3, seed=3, batch_size=32))
    b = train(_cfg(tmp_path, tiny_tree, epochs=3, seed=3, batch_size=32))
    key = [(r["train_loss"], r["val_loss"]) for r in a.history]
    assert key == [(r["train_loss"], r["val_loss"]) for r in b.history]

    _interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(Interrupted, match="--resume") as info:
        train(_cfg(tmp_path, tiny_tree, epochs=3, seed=3, batch_size=32))
    monkeypatch.undo()
    assert load_checkpoint(os.path.join(info.value.run_dir, CHECKPOINT_NAME))["epoch"] == 1  # loadable
    resumed = train(TrainConfig(epochs=3, workers=0), resume=info.value.run_dir)
    assert [(r["train_loss"], r["val_loss"]) for r in resumed.history] == key


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such folder"),
        ("empty", "class"),
        ("one_class", "at least two classes"),
        ("mixed_sizes", "one size"),
    ],
)
def test_bad_training_data_is_one_clear_error(tmp_path, layout, message):
    import numpy as np

    from cnnkit.datasets.layout import write_tree

    root = tmp_path / "d"
    if layout == "empty":
        (root / "training").mkdir(parents=True)
    elif layout == "one_class":
        write_tree(os.fspath(root), "training", np.zeros((3, 28, 28), np.uint8), np.zeros(3, int), ["a"])
    elif layout == "mixed_sizes":
        write_tree(os.fspath(root), "training", np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 1]), ["a", "b"])
        write_tree(os.fspath(root), "testing", np.zeros((2, 20, 20), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(DataError, match=message):
        train(_cfg(tmp_path, os.fspath(root)))
    assert not os.path.exists(tmp_path / "runs" / "latest")


def test_testing_classes_must_match_training(tmp_path, tiny_tree):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_tree, root)
    shutil.rmtree(root / "testing" / "2")
    with pytest.raises(DataError, match="differ"):
        train(_cfg(tmp_path, os.fspath(root)))


def test_unknown_classes_and_cuda_without_gpu(tmp_path, tiny_tree):
    with pytest.raises(DataError, match="not found"):
        train(_cfg(tmp_path, tiny_tree, classes=("0", "7")))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            train(_cfg(tmp_path, tiny_tree, device="cuda"))
    with pytest.raises(ModelError, match="unknown arch"):
        train(_cfg(tmp_path, tiny_tree, arch="resnet"))


@pytest.mark.slow
def test_the_lectures_run_reaches_99_percent(tmp_path, binary_tree):
    """The lecture's own run: --arch lecture --classes 0,1, batch 128, Adam, 5 epochs."""
    result = train(_cfg(tmp_path, binary_tree, arch="lecture", classes=("0", "1"), epochs=5))
    assert result.test_accuracy >= 0.99
