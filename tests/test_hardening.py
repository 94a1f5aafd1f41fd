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
