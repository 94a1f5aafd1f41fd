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
    from cnnkit.trainer.checkpoint import CHECKPOINT_NAME

    shutil.copytree(run, dest)
    path = os.path.join(dest, CHECKPOINT_NAME)
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    return dest


@pytest.mark.parametrize("key", ["rng", "optimizer", "epoch", "best_epoch", "rng.batches", "rng.dropout",
                                 "config.epochs"])
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
    result = runner.invoke(app, ["data", "idx", _idx_gz(tmp_path / "i.gz", (11, 28, 28), 0),
                                 _idx_gz(tmp_path / "l.gz", (11,), 11), "--out", os.fspath(tmp_path / "o"),
                                 "--split", "training"])
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
    from cnnkit.export.pt2 import load_pt2
    from cnnkit.export.torchscript import load_torchscript
    from cnnkit.runtime.session import read_meta
    from cnnkit.trainer.checkpoint import load_checkpoint

    path = odd_paths[kind]
    for load, what in ((read_meta, "model file"), (load_checkpoint, "checkpoint"),
                       (load_torchscript, "TorchScript file"), (load_pt2, "pt2 file")):
        with pytest.raises(ModelError, match=f"is {kind}, not a {what}"):
            load(path)


def test_infer_and_export_cli_on_a_fifo_exit_2_at_once(odd_paths, tmp_path):
    import subprocess
    import sys

    fifo = odd_paths["a FIFO"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for args in (["infer", os.fspath(tmp_path), "--model", fifo], ["export", fifo]):
        # A timeout, not a hang, if anything opened the FIFO (nobody writes to it).
        proc = subprocess.run([sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, timeout=120,
                              env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"error: {fifo}: is a FIFO, not a " + (
            "model file (export one with `cnnkit export --format onnx`)" if args[0] == "infer"
            else "checkpoint (train one with `cnnkit train`)")
