"""Hardening (issue 15): resource limits on untrusted metadata and IDX files, many classes, non-UTF-8
class names in plots, damaged checkpoints on `--resume`, odd model paths, and what exports reveal."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import ModelError

torch = pytest.importorskip("torch")

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# --resume with a damaged checkpoint (item 11)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, tiny_tree) -> str:
    from cnnkit.trainer.loop import TrainConfig, train

    runs = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(data=tiny_tree, runs_dir=os.fspath(runs), workers=0, epochs=1)).run_dir


def _damaged_run(run: str, dest: str, damage) -> str:
    from cnnkit.runs import CHECKPOINT_NAME

    shutil.copytree(run, dest)
    path = os.path.join(dest, CHECKPOINT_NAME)
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    return dest


@pytest.mark.parametrize(
    "key", ["rng", "optimizer", "epoch", "best_epoch", "rng.batches", "rng.dropout", "config.epochs"]
)
def test_resume_names_the_missing_checkpoint_key(one_epoch_run, tmp_path, key):
    from cnnkit.trainer.loop import TrainConfig, train

    def drop(ckpt):
        *parents, last = key.split(".")
        d = ckpt
        for p in parents:
            d = d[p]
        del d[last]

    run = _damaged_run(one_epoch_run, os.fspath(tmp_path / "run"), drop)
    with pytest.raises(ModelError, match=f"no usable '{key}'"):
        train(TrainConfig(epochs=2, workers=0), resume=run)


def test_resume_cli_damaged_checkpoint_is_one_line(one_epoch_run, tmp_path):
    run = _damaged_run(one_epoch_run, os.fspath(tmp_path / "run"), lambda c: c.pop("rng"))
    result = runner.invoke(app, ["train", "--resume", run, "--epochs", "2"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "'rng'" in result.output


def test_resume_with_garbage_optimizer_state_is_a_model_error(one_epoch_run, tmp_path):
    from cnnkit.trainer.loop import TrainConfig, train

    run = _damaged_run(one_epoch_run, os.fspath(tmp_path / "run"), lambda c: c.update(optimizer={"state": 1}))
    with pytest.raises(ModelError, match="'optimizer'"):
        train(TrainConfig(epochs=2, workers=0), resume=run)


# --------------------------------------------------------------------------------------------
# IDX gzip bombs (item 12)


def _idx_gz(path, dims: tuple[int, ...], n_bytes: int) -> str:
    import gzip
    import struct

    with gzip.open(path, "wb") as f:
        f.write(b"\0\0\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
        f.write(bytes(n_bytes))
    return os.fspath(path)


def test_idx_declaring_more_than_the_cap_is_refused_before_decompressing(tmp_path, monkeypatch):
    from cnnkit.datasets import idx
    from cnnkit.errors import DataError

    # 4,000,000 x 28 x 28: the 3.1 GB the bomb of the issue declared.
    path = _idx_gz(tmp_path / "bomb.gz", (4_000_000, 28, 28), 1 << 20)
    read = []
    real = idx._read_upto
    monkeypatch.setattr(idx, "_read_upto", lambda stream, n: read.append(n) or real(stream, n))
    with pytest.raises(DataError, match=r"declares shape \(4000000, 28, 28\), 3,136,000,000 bytes, over the 1,024 MB"):
        idx.read_idx(path)
    assert read == []  # nothing was decompressed past the header


def test_idx_reads_only_the_declared_bytes_and_refuses_the_rest(tmp_path, monkeypatch):
    from cnnkit.datasets import idx
    from cnnkit.errors import DataError

    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 10 * 28 * 28)
    assert idx.read_idx(_idx_gz(tmp_path / "ok.gz", (10, 28, 28), 10 * 28 * 28)).shape == (10, 28, 28)
    with pytest.raises(DataError, match="over the"):
        idx.read_idx(_idx_gz(tmp_path / "big.gz", (11, 28, 28), 11 * 28 * 28))
    with pytest.raises(DataError, match="trailing data"):
        idx.read_idx(_idx_gz(tmp_path / "tail.gz", (10, 28, 28), 50 << 20))
    result = runner.invoke(
        app,
        [
            "data",
            "idx",
            _idx_gz(tmp_path / "i.gz", (11, 28, 28), 0),
            _idx_gz(tmp_path / "l.gz", (11,), 11),
            "--out",
            os.fspath(tmp_path / "o"),
            "--split",
            "training",
        ],
    )
    assert result.exit_code == 2 and "over the" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# Model paths that are folders or FIFOs (item 13)


@pytest.fixture
def odd_paths(tmp_path) -> dict[str, str]:
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    fifo = os.fspath(tmp_path / "fifo.onnx")
    os.mkfifo(fifo)
    return {"a folder": os.fspath(folder), "a FIFO": fifo}


@pytest.mark.parametrize("kind", ["a folder", "a FIFO"])
def test_model_paths_say_what_is_there_without_opening_it(odd_paths, kind):
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.export.pt2 import load_pt2
    from cnnkit.export.torchscript import load_torchscript
    from cnnkit.runtime.session import read_meta

    path = odd_paths[kind]
    for load, what in (
        (read_meta, "model file"),
        (load_checkpoint, "checkpoint"),
        (load_torchscript, "TorchScript file"),
        (load_pt2, "pt2 file"),
    ):
        with pytest.raises(ModelError, match=f"is {kind}, not a {what}"):
            load(path)


@pytest.mark.slow
def test_infer_and_export_cli_on_a_fifo_exit_2_at_once(odd_paths, tmp_path):
    import subprocess
    import sys

    fifo = odd_paths["a FIFO"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for args in (["infer", os.fspath(tmp_path), "--model", fifo], ["export", fifo]):
        # A timeout, not a hang, if anything opened the FIFO (nobody writes to it).
        proc = subprocess.run(
            [sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, timeout=120, env=env
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"error: {fifo}: is a FIFO, not a " + (
            "model file (export one with `cnnkit export --format onnx`)"
            if args[0] == "infer"
            else "checkpoint (train one with `cnnkit train`)"
        )


# --------------------------------------------------------------------------------------------
# Many classes and non-UTF-8 class names in plots and confusion reports (items 2 and 8)

NON_UTF8 = os.fsdecode(b"caf\xe9")  # a latin-1 folder name: Python hands it over surrogate-escaped


def _plot(run_dir: str, classes: list[str], n: int, sigmoid: bool = False) -> dict[str, tuple[int, int]]:
    """write_plots on `n` images of random scores; the pixel size of each PNG written."""
    import numpy as np
    from PIL import Image

    from cnnkit.trainer.plots import write_plots

    gen = torch.Generator().manual_seed(0)
    k = len(classes)
    y = np.arange(n) % k
    out = torch.rand(n, 1, generator=gen) if sigmoid else torch.randn(n, k, generator=gen)
    hist = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5}]
    paths = write_plots(run_dir, hist, {"testing": out}, {"testing": y}, classes, sigmoid, 1)
    return {os.path.basename(p): Image.open(p).size for p in paths}


def test_a_thousand_classes_plot_a_fixed_size_summary_not_a_matrix(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    real = plt.subplots

    def bounded(*args, figsize=(6.4, 4.8), **kw):
        # Fail before drawing: the old 1,000-class matrix (601 x 501 inches) was OOM-killed at 20 GB.
        assert max(figsize) <= 40, f"figure of {figsize} inches"
        return real(*args, figsize=figsize, **kw)

    monkeypatch.setattr(plt, "subplots", bounded)
    sizes = _plot(os.fspath(tmp_path), [f"class{i:04d}" for i in range(1000)], 1000)
    w, h = sizes["confusion.png"]
    assert w < 1500 and h < 1500, sizes  # the matrix would be 60,100 x 50,100 pixels
    few = _plot(os.fspath(tmp_path), [str(i) for i in range(10)], 100)
    assert few["confusion.png"][0] > 400  # ten classes still get their matrix


@pytest.mark.parametrize("sigmoid", [True, False])
def test_plots_draw_class_names_that_are_not_utf8(tmp_path, sigmoid):
    sizes = _plot(os.fspath(tmp_path), [NON_UTF8, "b", "c"][: 2 if sigmoid else 3], 30, sigmoid)
    assert set(sizes) == {"curves.png", "scores_testing.png", "confusion.png"}


def test_train_on_a_non_utf8_class_folder_writes_its_plots(tmp_path, tiny_tree):
    from cnnkit.trainer.loop import TrainConfig, train

    data = tmp_path / "data"
    shutil.copytree(tiny_tree, data)
    for split in ("training", "testing"):
        os.rename(os.path.join(data, split, "0"), os.path.join(os.fsencode(data), split.encode(), b"caf\xe9"))
    result = train(TrainConfig(data=os.fspath(data), runs_dir=os.fspath(tmp_path / "runs"), workers=0, epochs=1))
    assert NON_UTF8 in result.classes and os.path.isfile(os.path.join(result.run_dir, "confusion.png"))


def test_confusion_keeps_pairs_not_a_matrix_past_the_limit():
    import numpy as np

    from cnnkit.confusion import MAX_MATRIX_CLASSES, Confusion, summary_lines
    from cnnkit.console import table

    k = 100_000  # a K x K int64 matrix would be 80 GB
    conf = Confusion(k)
    true = np.array([0, 1, 2, 2, 99_999, 5])
    conf.add(true, np.array([0, 2, 1, 1, 3, 5]))
    assert conf.matrix is None and (conf.n_correct, conf.n_total) == (2, 6)
    assert conf.pairs() == [[2, 1, 2], [1, 2, 1], [99_999, 3, 1]]
    lines = summary_lines([f"c{i}" for i in range(k)], None, conf.pairs(), table)
    assert f"over {MAX_MATRIX_CLASSES}" in lines[0] and "c2" in lines[1] and len(lines) == 2
    small = Confusion(3)
    small.add(np.array([0, 1, 2]), np.array([0, 2, 2]))
    assert small.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]] and small.pairs() == [[1, 2, 1]]


@pytest.fixture(scope="module")
def many_class_run(tmp_path_factory):
    """A 60-class ONNX model (over MAX_MATRIX_CLASSES) and a labeled folder of 6 of its classes."""
    import numpy as np
    from conftest import export_onnx

    from cnnkit.datasets.layout import encode_png

    d = tmp_path_factory.mktemp("many")
    classes = tuple(f"k{i:02d}" for i in range(60))
    model = export_onnx(os.fspath(d / "m.onnx"), classes)
    rng = np.random.default_rng(0)
    for c in classes[:6]:
        os.makedirs(d / "data" / c)
        for i in range(5):
            (d / "data" / c / f"{i}.png").write_bytes(encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    return model, os.fspath(d / "data"), classes


def test_infer_past_the_matrix_limit_reports_top_confusions_and_merges(many_class_run, tmp_path):
    from cnnkit.runtime.infer import format_summary, infer
    from cnnkit.runtime.shard import format_merge, merge

    model, data, classes = many_class_run
    whole = infer(data, model, output=os.fspath(tmp_path / "all.csv"), workers=0, progress=False)
    d = whole.to_dict()
    assert d["confusion"] is None and d["accuracy"] is not None
    wrong = whole.n_images - whole.n_correct
    assert wrong == sum(p["count"] for p in d["top_confused"]) or len(d["top_confused"]) == 20
    assert {p["true"] for p in d["top_confused"]} <= set(classes[:6])
    assert "over 50 so no matrix" in format_summary(whole)
    parts = [
        infer(data, model, output=os.fspath(tmp_path / f"s{k}.csv"), workers=0, progress=False, shard=f"{k}/2").output
        for k in range(2)
    ]
    merged = merge(parts, os.fspath(tmp_path / "merged.csv"))
    assert merged.accuracy == whole.accuracy and merged.confused_pairs == whole.confused_pairs
    assert merged.to_dict()["top_confused"] == d["top_confused"] and "no matrix" in format_merge(merged)


# --------------------------------------------------------------------------------------------
# Untrusted metadata records: bounded before they cost memory or recursion (item 2)


def _record(**changes) -> dict:
    from cnnkit.meta import ModelMeta

    return {
        **ModelMeta(arch="lecture", classes=("a", "b"), input_shape=(1, 28, 28), output="logits").to_dict(),
        **changes,
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes": [f"c{i}" for i in range(100_000)]}, "names 100,000 classes, over the 10,000"),
        ({"input_shape": [1, 100_000, 100_000]}, r"bad input_shape \(1, 100000, 100000\).*H and W from 1 to 4096"),
        ({"input_shape": [1, 28, 5000]}, "H and W from 1 to 4096"),
        ({"extra": {"x": "[" * 10}}, None),  # brackets inside a string are text, not nesting
    ],
)
def test_record_limits(changes, message):
    import json

    from cnnkit.meta import ModelMeta

    text = json.dumps(_record(**changes))
    if message is None:
        assert ModelMeta.from_json(text).extra == changes["extra"]
        return
    for load in (lambda: ModelMeta.from_json(text), lambda: ModelMeta.from_dict(json.loads(text))):
        with pytest.raises(ModelError, match=message):
            load()


def test_deep_or_huge_record_text_is_one_model_error():
    import json

    from cnnkit.meta import ModelMeta

    deep = json.dumps(_record())[:-1] + ', "junk": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ModelError, match="nests 100,001 levels deep, over the 32"):
        ModelMeta.from_json(deep)
    nested: dict = {}
    inner = nested
    for _ in range(5000):  # a checkpoint's dict, never JSON text
        inner["x"] = inner = {}
    with pytest.raises(ModelError, match="levels deep"):
        ModelMeta.from_dict(_record(extra=nested))
    with pytest.raises(ModelError, match="characters is over the"):
        ModelMeta.from_json(json.dumps(_record(extra={"pad": "x" * (5 << 20)})))


def test_infer_with_a_100k_class_record_exits_2(tmp_path):
    import json

    from conftest import export_onnx

    model = export_onnx(
        os.fspath(tmp_path / "m.onnx"), meta=json.dumps(_record(classes=[f"c{i}" for i in range(100_000)]))
    )
    result = runner.invoke(app, ["infer", os.fspath(tmp_path), "--model", model])
    assert result.exit_code == 2 and "over the 10,000" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# What an exported artifact reveals about the training machine (item 14)


def test_exports_record_data_folder_names_not_full_paths(one_epoch_run, tiny_tree, tmp_path):
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.export import export
    from cnnkit.export.torchscript import load_torchscript
    from cnnkit.runs import BEST_NAME
    from cnnkit.runtime.session import read_meta

    ckpt = os.path.join(one_epoch_run, BEST_NAME)
    full = load_checkpoint(ckpt)["meta"]["extra"]["data"]
    assert full["root"] == os.path.abspath(tiny_tree)  # the run on the user's disk keeps full paths
    name = os.path.basename(os.path.abspath(tiny_tree))
    onnx_path = export(ckpt, "onnx", out=os.fspath(tmp_path / "m.onnx"), exporter="torchscript").path
    ts_path = export(ckpt, "torchscript", out=os.fspath(tmp_path / "m.ts")).path
    for record in (read_meta(onnx_path), load_torchscript(ts_path)[1]):
        data = record.extra["data"]
        assert (data["root"], data["train"], data["test"]) == (name, f"{name}/training", f"{name}/testing")
        assert os.path.dirname(os.path.abspath(tiny_tree)) not in record.to_json()
    kept = export(ckpt, "onnx", out=os.fspath(tmp_path / "k.onnx"), exporter="torchscript", keep_paths=True).path
    assert read_meta(kept).extra["data"]["root"] == full["root"]
    result = runner.invoke(
        app, ["export", ckpt, "--out", os.fspath(tmp_path / "c.onnx"), "--exporter", "torchscript", "--keep-paths"]
    )
    assert result.exit_code == 0, result.output
    assert read_meta(os.fspath(tmp_path / "c.onnx")).extra["data"]["test"] == full["test"]


def test_bench_finds_the_testing_folder_through_the_export_report(one_epoch_run, tmp_path):
    from cnnkit.bench import bench
    from cnnkit.export import export
    from cnnkit.runs import BEST_NAME

    run = os.fspath(tmp_path / "run")
    shutil.copytree(one_epoch_run, run)
    export(os.path.join(run, BEST_NAME), "onnx", exporter="torchscript")
    os.remove(os.path.join(run, BEST_NAME))  # the ONNX record alone names folders only
    result = bench(run=run, limit=6, device="cpu")
    assert [r.artifact for r in result.rows if r.backend != "openvino"] == ["onnx"]


def test_training_refuses_more_classes_than_a_record_may_hold(tiny_tree, tmp_path, monkeypatch):
    from cnnkit import meta
    from cnnkit.errors import DataError
    from cnnkit.trainer.loop import TrainConfig, train

    monkeypatch.setattr(meta, "MAX_CLASSES", 2)  # tiny_tree has 3: fail before loading, not at export
    with pytest.raises(DataError, match="3 class folders, over the 2 cnnkit supports"):
        train(TrainConfig(data=tiny_tree, runs_dir=os.fspath(tmp_path / "runs"), workers=0, epochs=1))
