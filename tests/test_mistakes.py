"""The most confident mistakes: the bounded collector against a brute-force sort, its PNG grid, and
train and infer end to end on the bundled digits."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from conftest import export_onnx
from PIL import Image

from cnnkit.mistakes import MIN_CELL, Mistakes


def _random_batch(rng: np.random.Generator, n: int, channels: int = 1, ties: bool = False):
    images = rng.integers(0, 256, (n, channels, 28, 28), dtype=np.uint8)
    true = rng.integers(-1, 4, n)  # -1: unlabelled
    pred = rng.integers(0, 4, n)
    score = rng.random(n).astype(np.float32)
    if ties:  # a saturated model: many equal scores
        score = np.round(score, 1).astype(np.float32)
    return images, true, pred, score


def _brute_force(true: np.ndarray, pred: np.ndarray, score: np.ndarray, k: int) -> list[int]:
    """The k wrong labelled predictions of highest score, earlier first among equal scores."""
    wrong = [i for i in range(len(true)) if true[i] >= 0 and true[i] != pred[i]]
    return sorted(wrong, key=lambda i: (-score[i], i))[:k]


@pytest.mark.parametrize("k", [1, 5, 25, 400])
@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
@pytest.mark.parametrize("ties", [False, True])
def test_keeps_exactly_the_k_most_confident_wrong_ones_across_batches(k, batch, ties):
    rng = np.random.default_rng(k * 1000 + batch)
    images, true, pred, score = _random_batch(rng, 1000, ties=ties)
    ids = [f"img{i}.png" for i in range(1000)]
    kept = Mistakes(k)
    for s in range(0, 1000, batch):
        rows = np.arange(s, min(s + batch, 1000))
        kept.add(images[rows], true[rows], pred[rows], score[rows], ids, rows)
    want = _brute_force(true, pred, score, k)
    assert kept.ids == [ids[i] for i in want]
    assert np.array_equal(kept.images, images[want])
    assert [m["score"] for m in kept.to_json("abcd")] == [float(f"{score[i]:.9g}") for i in want]
    assert all(m["true"] != m["predicted"] for m in kept.to_json("abcd"))


def test_right_and_unlabelled_predictions_are_ignored(tmp_path):
    rng = np.random.default_rng(0)
    images, _, pred, score = _random_batch(rng, 100)
    kept = Mistakes()
    kept.add(images, pred, pred, score, list(range(100)))  # all right
    kept.add(images, np.full(100, -1), pred, score, list(range(100)))  # all unlabelled
    assert len(kept) == 0 and kept.to_json("abcd") == []
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an earlier run's grid")
    assert kept.write_grid(os.fspath(grid), "abcd") is None and not grid.exists()


def test_merging_collectors_equals_one_collector():
    rng = np.random.default_rng(1)
    images, true, pred, score = _random_batch(rng, 600, ties=True)
    one, parts = Mistakes(10), [Mistakes(10) for _ in range(3)]
    one.add(images, true, pred, score, list(range(600)))
    for n, part in enumerate(parts):
        rows = np.arange(n * 200, (n + 1) * 200)
        part.add(images[rows], true[rows], pred[rows], score[rows], list(range(600)), rows)
    merged = Mistakes(10)
    for part in parts:
        merged.merge(part)
    assert merged.ids == one.ids and np.array_equal(merged.score, one.score)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n", [1, 7, 25])
def test_grid_decodes_with_one_cell_per_mistake(tmp_path, channels, n):
    """White images on the dark grid: the white pixels are exactly n images scaled up to MIN_CELL."""
    kept = Mistakes()
    white = np.full((n, channels, 28, 28), 255, dtype=np.uint8)
    kept.add(white, np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64), np.linspace(0.9, 0.5, n), range(n))
    path = kept.write_grid(os.fspath(tmp_path / "grid.png"), ["zero", "one"])
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels == 255).all(axis=2).sum() == n * MIN_CELL * MIN_CELL
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_odd_class_names_cannot_break_or_widen_the_grid():
    rng = np.random.default_rng(2)
    images, _, _, score = _random_batch(rng, 4, channels=3)
    true, pred = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 0])
    plain, odd = Mistakes(), Mistakes()
    plain.add(images, true, pred, score, range(4))
    odd.add(images, true, pred, score, range(4))
    names = ["line\nbreak", "esc\x1b[2J", "caf\udce9", "x" * 10_000]
    wide = odd.render(names).size  # 2 x 2 cells: each caption at most two cut names wide
    assert wide[0] <= 2 * 260 and odd.render(["\u00e9" * 50, "a", "b", "c"]).size[0] <= 2 * 260
    assert plain.render(["a", "b", "c", "d"]).size[1] == wide[1]  # no line break got through
    assert odd.to_json(names)[0]["true"] in names  # the JSON keeps the real names


def test_images_of_another_shape_are_refused():
    kept = Mistakes()
    kept.add(np.zeros((1, 1, 28, 28), np.uint8), np.array([0]), np.array([1]), np.array([0.9]), ["a"])
    with pytest.raises(ValueError, match="cannot join"):
        kept.add(np.zeros((1, 3, 28, 28), np.uint8), np.array([0]), np.array([1]), np.array([0.95]), ["b"])


# --------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def digit_model(tmp_path_factory) -> str:
    """An untrained lecture CNN for the digit classes of `tiny_tree` (0, 1, 2): plenty of mistakes."""
    return export_onnx(os.fspath(tmp_path_factory.mktemp("model") / "model.onnx"), classes=("0", "1", "2"))


def test_infer_lists_the_most_confident_mistakes_of_its_csv(digit_model, tiny_tree, tmp_path):
    from cnnkit.runtime.infer import infer

    out = os.fspath(tmp_path / "predictions.csv")
    result = infer(os.path.join(tiny_tree, "testing"), digit_model, output=out, workers=0, progress=False)
    report = json.loads(json.dumps(result.to_dict()))
    with open(out, newline="", encoding="utf-8") as f:
        wrong = {r["path"]: float(r["score"]) for r in csv.DictReader(f) if r["label"] != r["predicted"]}
    listed = report["mistakes"]
    assert len(listed) == min(25, len(wrong)) > 0
    assert all(wrong[m["path"]] == m["score"] for m in listed)  # the CSV's own number
    assert [m["score"] for m in listed] == sorted((m["score"] for m in listed), reverse=True)
    others = [s for p, s in wrong.items() if p not in {m["path"] for m in listed}]
    assert min(m["score"] for m in listed) >= max(others, default=0.0)
    assert report["mistakes_png"] == out + ".mistakes.png"
    with Image.open(report["mistakes_png"]) as im:
        assert im.format == "PNG" and min(im.size) >= MIN_CELL


def test_unlabelled_infer_writes_no_grid_and_removes_a_stale_one(digit_model, tiny_tree, tmp_path):
    from cnnkit.runtime.infer import infer

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in sorted(os.listdir(os.path.join(tiny_tree, "testing", "0")))[:5]:
        shutil.copy(os.path.join(tiny_tree, "testing", "0", name), flat / name)
    out = tmp_path / "predictions.csv"
    stale = tmp_path / "predictions.csv.mistakes.png"
    stale.write_bytes(b"an earlier run's grid")
    result = infer(os.fspath(flat), digit_model, output=os.fspath(out), workers=0, progress=False)
    assert result.accuracy is None and result.to_dict()["mistakes"] == []
    assert result.to_dict()["mistakes_png"] is None and not stale.exists()


def test_infer_output_among_the_images_draws_no_grid(digit_model, tiny_tree, tmp_path):
    """A CSV may be written inside the folder, but a PNG there would be read as an image next time."""
    from cnnkit.runtime.infer import infer

    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_tree, "testing"), data)
    out = os.fspath(data / "predictions.csv")
    result = infer(os.fspath(data), digit_model, output=out, workers=0, progress=False)
    assert result.accuracy is not None and result.mistakes and result.mistakes_png is None
    assert not os.path.exists(out + ".mistakes.png")


@pytest.mark.parametrize("with_testing", [True, False])
def test_train_draws_its_mistakes(tiny_tree, tmp_path, with_testing):
    from cnnkit.trainer.loop import TrainConfig, train

    data = tmp_path / "data"
    shutil.copytree(tiny_tree, data)
    if not with_testing:
        shutil.rmtree(data / "testing")
    cfg = TrainConfig(data=os.fspath(data), runs_dir=os.fspath(tmp_path / "runs"), workers=0, epochs=1, arch="lecture")
    result = train(cfg)
    metrics = json.load(open(os.path.join(result.run_dir, "metrics.json"), encoding="utf-8"))
    split = "testing" if with_testing else "validation"
    assert result.mistakes_split == metrics["mistakes_split"] == split
    assert metrics["mistakes"] == json.loads(json.dumps(result.mistakes))
    n_wrong = round((1 - result.test_accuracy) * result.test_images) if with_testing else None
    if n_wrong is not None:
        assert len(result.mistakes) == min(25, n_wrong)
    assert result.mistakes, "an epoch on 180 images should leave some mistakes"
    key = "path" if with_testing else "index"
    assert all(key in m and m["true"] != m["predicted"] for m in result.mistakes)
    assert [m["score"] for m in result.mistakes] == sorted((m["score"] for m in result.mistakes), reverse=True)
    assert result.mistakes_png == metrics["mistakes_png"] == os.path.join(result.run_dir, "mistakes.png")
    with Image.open(result.mistakes_png) as im:
        assert im.format == "PNG"
