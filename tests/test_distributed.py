"""torchrun with 2 CPU processes on gloo: the same run, the same checkpoint format, the same accuracy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from cnnkit.export import export
from cnnkit.trainer.loop import TrainConfig, train

pytestmark = pytest.mark.slow


def _torchrun(args: list[str], cwd) -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun comes with torch"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "cnnkit", "train", *args, "--json"]
    # A new session, so a timeout can end torchrun's workers too, not only torchrun.
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, stderr[-3000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, stdout  # only rank 0 reports
    return json.loads(lines[0])


def test_two_gloo_processes_train_resume_export(tmp_path, binary_tree):
    common = [
        binary_tree,
        "--arch",
        "lecture",
        "--workers",
        "0",
        "--seed",
        "1",
        "--batch-size",
        "128",
        "--device",
        "cpu",
    ]
    first = _torchrun([*common, "--epochs", "2"], tmp_path)
    assert first["world_size"] == 2 and first["epochs"] == 2
    resumed = _torchrun([*common, "--epochs", "3", "--resume", first["run_dir"]], tmp_path)
    assert resumed["epochs"] == 3 and resumed["run_dir"] == first["run_dir"]

    ckpt = torch.load(tmp_path / resumed["checkpoint"], weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"]), "DDP prefixes leaked into the checkpoint"
    result = export(os.fspath(tmp_path / resumed["checkpoint"]), fmt="onnx", out=os.fspath(tmp_path / "m.onnx"))
    assert result.parity.passed

    single = train(
        TrainConfig(
            data=binary_tree,
            arch="lecture",
            epochs=3,
            seed=1,
            workers=0,
            device="cpu",
            runs_dir=os.fspath(tmp_path / "single"),
        )
    )
    assert abs(resumed["test_accuracy"] - single.test_accuracy) <= 0.01


def test_auto_device_under_torchrun_needs_a_gpu_per_process(monkeypatch):
    """`--device auto` with more local processes than GPUs trains on the CPU everywhere (seen on a
    one-GPU machine: rank 1 failed with 'GPU 1 asked for' while rank 0 waited)."""
    from cnnkit.trainer.distributed import auto_uses_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert auto_uses_cuda(1) and not auto_uses_cuda(2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert auto_uses_cuda(2) and not auto_uses_cuda(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not auto_uses_cuda(1)
