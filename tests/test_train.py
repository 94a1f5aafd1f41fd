from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from cnnkit.checkpoint import load_checkpoint, model_from_checkpoint
from cnnkit.errors import DataError, DeviceError, ModelError
from cnnkit.models import build_model, count_parameters
from cnnkit.runs import BEST_NAME, CHECKPOINT_NAME
from cnnkit.trainer import loop
from cnnkit.trainer.loop import Interrupted, TrainConfig, train


def _lecture_reference(num_outputs: int) -> nn.Sequential:
    """The lecture's network, layer for layer as the lecture writes it."""
    head = [nn.Linear(2304, num_outputs)] + ([nn.Sigmoid()] if num_outputs == 1 else [])
    return nn.Sequential(nn.Conv2d(1, 16, (5, 5)), nn.ReLU(), nn.MaxPool2d((2, 2)), nn.Flatten(), *head)


@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lecture_arch_computes_the_lectures_network(classes, channels_last):
    """Same parameters, same outputs and same gradients as the lecture's layers, in either layout."""
    model, output = build_model("lecture", classes, 28, 28)
    assert output == ("sigmoid" if classes == 2 else "logits")
    conv, lin = model.net[0], model.net[3]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 16, (5, 5))
    assert (lin.in_features, lin.out_features) == (2304, 1 if classes == 2 else classes)
    ref = _lecture_reference(lin.out_features)
    ref.load_state_dict({"0.weight": conv.weight, "0.bias": conv.bias, "4.weight": lin.weight, "4.bias": lin.bias})
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    ours, theirs = model(x), ref(x.float() / 255.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for a, b in [(conv, ref[0]), (lin, ref[4])]:
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-4, atol=1e-6)


def test_models_scale_uint8_inside_and_stay_small():
    for arch in ("lecture", "small"):
        model, _ = build_model(arch, 10, 28, 28)
        assert count_parameters(model) < 100_000
        x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
        torch.testing.assert_close(model.eval()(x), model.net(x.float() / 255.0))


def test_wide_is_small_with_more_channels():
    model, output = build_model("wide", 10, 28, 28)
    assert output == "logits" and count_parameters(model) == 155_626
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert model.eval()(x).shape == (3, 10)
    assert [m.out_channels for m in model.net if isinstance(m, nn.Conv2d)] == [32, 64, 128]


def _cfg(tmp_path, data, **kw) -> TrainConfig:
    kw.setdefault("epochs", 1)
    return TrainConfig(data=data, runs_dir=os.fspath(tmp_path / "runs"), workers=0, **kw)


def test_train_writes_a_complete_run(tmp_path, tiny_tree):
    result = train(_cfg(tmp_path, tiny_tree, epochs=2))
    run = result.run_dir
    for name in (
        CHECKPOINT_NAME,
        BEST_NAME,
        "metrics.json",
        "curves.png",
        "scores_training.png",
        "scores_validation.png",
        "scores_testing.png",
        "confusion.png",
    ):
        assert os.path.isfile(os.path.join(run, name)), name
    raw = torch.load(os.path.join(run, BEST_NAME), weights_only=True)  # plain tensors and data only
    assert raw["meta"]["classes"] == ["0", "1", "2"] and raw["meta"]["input_shape"] == [1, 28, 28]
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    sel = metrics["selection"]
    assert sel["split"] == "validation" and sel["size"] == 18  # 10% of 3 x 60, 6 per class
    assert sel["rule"].startswith("best validation accuracy") and sel["epoch"] == result.best_epoch
    best = metrics["history"][sel["epoch"] - 1]["val_accuracy"]
    assert sel["val_accuracy"] == metrics["val_accuracy"] == result.val_accuracy == best
    assert best == max(r["val_accuracy"] for r in metrics["history"])
    assert metrics["test_accuracy"] == result.test_accuracy and metrics["test_images"] == result.test_images == 60
    assert os.path.realpath(tmp_path / "runs" / "latest") == os.path.realpath(run)
    assert result.classes == ["0", "1", "2"] and result.epochs == 2
    assert 0.0 <= result.test_accuracy <= 1.0 and result.train_images_per_second > 0
    model, meta, _ = model_from_checkpoint(result.checkpoint)
    assert meta.output == "logits" and not model.training


_real_loss = loop._loss


def _interrupt_after_epoch(monkeypatch, k: int) -> None:
    """Make the first batch after epoch k's checkpoint raise KeyboardInterrupt, as Ctrl-C would."""
    real_save = loop.save_checkpoint

    def save(path, state):
        real_save(path, state)
        if state["epoch"] == k and path.endswith(CHECKPOINT_NAME):
            monkeypatch.setattr(loop, "_loss", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))

    monkeypatch.setattr(loop, "save_checkpoint", save)


def _outcome(result) -> tuple:
    """Everything a run reports about the model it selected, and that model's weights."""
    weights = torch.load(result.checkpoint, weights_only=True)["model"]
    return (
        result.best_epoch,
        result.selection,
        result.val_accuracy,
        result.test_accuracy,
        result.test_loss,
        [(r["train_loss"], r["val_loss"]) for r in result.history],
        weights,
    )


def _assert_same_outcome(a: tuple, b: tuple) -> None:
    assert a[:-1] == b[:-1]
    assert a[-1].keys() == b[-1].keys() and all(torch.equal(a[-1][k], b[-1][k]) for k in a[-1])


@pytest.mark.slow
def test_same_seed_same_metrics_and_resume_continues_exactly(tmp_path, tiny_tree, monkeypatch):
    a = train(_cfg(tmp_path, tiny_tree, epochs=3, seed=3, batch_size=32))
    b = train(_cfg(tmp_path, tiny_tree, epochs=3, seed=3, batch_size=32))
    _assert_same_outcome(_outcome(a), _outcome(b))

    _interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(Interrupted, match="--resume") as info:
        train(_cfg(tmp_path, tiny_tree, epochs=3, seed=3, batch_size=32))
    monkeypatch.undo()
    assert load_checkpoint(os.path.join(info.value.run_dir, CHECKPOINT_NAME))["epoch"] == 1  # loadable
    resumed = train(TrainConfig(epochs=3, workers=0), resume=info.value.run_dir)
    _assert_same_outcome(_outcome(resumed), _outcome(a))


def test_resume_reports_the_epoch_selected_before_the_interruption(tmp_path, tiny_tree, monkeypatch):
    """Epoch 1 is selected, the run stops after epoch 2: the resumed run must report and keep epoch 1's
    weights (not the checkpoint's, epoch 2's), exactly as the uninterrupted run does."""
    monkeypatch.setattr(loop, "_is_better", lambda record, best: record["epoch"] == 1)
    whole = train(_cfg(tmp_path, tiny_tree, epochs=3, seed=5, batch_size=32))
    assert whole.best_epoch == 1
    _interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(Interrupted) as info:
        train(_cfg(tmp_path, tiny_tree, epochs=3, seed=5, batch_size=32))
    monkeypatch.setattr(loop, "_loss", _real_loss)  # undo the interruption, keep the selection rule
    resumed = train(TrainConfig(epochs=3, workers=0), resume=info.value.run_dir)
    _assert_same_outcome(_outcome(resumed), _outcome(whole))


def test_testing_folder_cannot_influence_selection(tmp_path, tiny_tree):
    """Same seed and training folder, a different testing/ folder: the same epoch, the same weights."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(os.path.join(tiny_tree, "training"), other / "training")
    shutil.copytree(os.path.join(tiny_tree, "training"), other / "testing")  # a very different test set
    a = train(_cfg(tmp_path, tiny_tree, epochs=4, seed=2, batch_size=32))
    b = train(_cfg(tmp_path, os.fspath(other), epochs=4, seed=2, batch_size=32))
    assert a.test_images == 60 and b.test_images == 180 and a.test_loss != b.test_loss
    _assert_same_outcome(_outcome(a)[:3] + _outcome(a)[5:], _outcome(b)[:3] + _outcome(b)[5:])


def test_val_split_zero_keeps_the_last_epoch_and_says_so(tmp_path, tiny_tree):
    result = train(_cfg(tmp_path, tiny_tree, epochs=2, val_split=0.0))
    assert result.best_epoch == 2 and result.val_accuracy is None
    assert result.selection["split"] is None and result.selection["rule"] == "last epoch (no selection)"
    assert all(r["val_accuracy"] is None for r in result.history)
    assert "kept the last epoch" in loop.format_summary(result)
    for bad in (1.0, float("nan"), -0.1):
        with pytest.raises(DataError, match="val-split"):
            train(_cfg(tmp_path, tiny_tree, val_split=bad))
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(DataError, match="--lr must be a positive number"):
            train(_cfg(tmp_path, tiny_tree, lr=bad))


def test_recipe_gives_small_datasets_enough_steps():
    from cnnkit.models import Recipe

    r = Recipe(epochs=12, batch_size=256, lr=5e-3, schedule="cosine", min_steps=450)
    assert r.epochs_for(211) == 12  # Fashion-MNIST's 54,000 training images: the recipe's epochs
    assert r.epochs_for(15) == 30  # the bundled digits' 3,600: enough epochs for 450 steps
    assert Recipe(epochs=5, batch_size=128, lr=1e-3, schedule="constant").epochs_for(1) == 5


def test_validation_split_is_stratified_and_seeded():
    import numpy as np

    from cnnkit.trainer.data import split_validation

    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    tr, va = split_validation(labels, 0.1, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    assert np.bincount(labels[va], minlength=3).tolist() == [9, 1, 0]  # a lone image stays in training
    again = split_validation(labels, 0.1, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((tr, va), again, strict=True))
    assert not np.array_equal(split_validation(labels, 0.1, seed=1)[1], va)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "no such folder"),
        ("empty", "class"),
        ("one_class", "at least two classes"),
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


def test_augment_shift_moves_each_image_within_two_pixels_and_flip_mirrors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 1, 12, 10), dtype=torch.uint8)  # no zeros: fill is visible
    y = loop.augment(x, "shift", gen)
    assert y.shape == x.shape and y.dtype == torch.uint8
    seen = set()
    for a, b in zip(x[:, 0], y[:, 0], strict=True):
        # the single (dy, dx) with |d| <= 2 that explains b: a moved by it, zeros where it came from outside
        fits = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.nn.functional.pad(a, (2, 2, 2, 2))
                if torch.equal(padded[2 + dy : 2 + dy + 12, 2 + dx : 2 + dx + 10], b):
                    fits.append((dy, dx))
        assert len(fits) == 1
        seen.add(fits[0])
    assert len(seen) > 10  # offsets vary between images
    again = loop.augment(x, "shift", torch.Generator().manual_seed(0))
    assert torch.equal(again, y)  # drawn from the generator: runs and resumes repeat exactly

    both = loop.augment(x, "flip+shift", torch.Generator().manual_seed(1))
    flips = loop.augment(x, "flip", torch.Generator().manual_seed(1))
    mirrored = [torch.equal(f, a.flip(-1)) for f, a in zip(flips, x, strict=True)]
    assert 10 < sum(mirrored) < 54 and all(torch.equal(f, a) or m for f, a, m in zip(flips, x, mirrored, strict=True))
    assert not torch.equal(both, flips)


def test_unusable_training_files_are_reported_not_dropped(tmp_path, tiny_tree, capsys):
    """Dangling symlinks, FIFOs (never opened: reading one would block) and corrupt PNGs in the splits
    are counted and named on stderr, in metrics.json and in the result, as `cnnkit infer` does."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_tree, root)
    os.symlink("nowhere.png", root / "training" / "0" / "dangling.png")
    os.mkfifo(root / "training" / "1" / "fifo.png")
    (root / "training" / "2" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    os.symlink("gone.png", root / "testing" / "1" / "=gone\x1b.png")
    os.mkfifo(root / "training" / "elsewhere.png")  # in no class folder: not the split's, not listed
    (root / "training" / "0" / "notes.txt").write_text("a non-image file: counted as ignored")
    result = train(_cfg(tmp_path, os.fspath(root)))
    expected = [
        {"split": "training", "path": "0/dangling.png", "reason": "dangling symlink"},
        {"split": "training", "path": "1/fifo.png", "reason": "not a regular file (a FIFO)"},
        {"split": "testing", "path": "1/=gone\x1b.png", "reason": "dangling symlink"},
    ]
    assert result.n_skipped == 4 and result.skipped[:2] + result.skipped[3:] == expected
    assert result.skipped[2]["path"] == "2/corrupt.png" and result.skipped[2]["reason"].startswith("truncated")
    metrics = json.load(open(os.path.join(result.run_dir, "metrics.json")))
    assert metrics["n_skipped"] == 4 and metrics["skipped"] == result.skipped
    assert metrics["ignored"] == result.ignored == {"training": {"other_files": 1}}
    err = capsys.readouterr().err
    assert f"warning: skipped 3 file(s) under {root / 'training'} that could not be used" in err
    assert f"note: {root / 'training'}: ignored 1 non-image file" in err
    assert "  1/fifo.png: not a regular file (a FIFO)" in err and "  1/=gone\\x1b.png: dangling symlink" in err
    assert "skipped 4 file(s) that could not be used" in loop.format_summary(result)
