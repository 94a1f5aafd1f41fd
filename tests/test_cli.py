"""End to end through the CLI, as a user runs it: train -> export both formats -> infer."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.export.torchscript import load_torchscript
from cnnkit.images import read_image
from cnnkit.listing import list_pngs

runner = CliRunner()


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def run_in(tmp_path_factory, tiny_tree):
    """A working folder where `cnnkit train` has run once (1 epoch, tiny data)."""
    cwd = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        out = _json(runner.invoke(app, ["train", tiny_tree, "--epochs", "1", "--workers", "0", "--json"]))
        yield cwd, out
    finally:
        os.chdir(old)


def test_train_json_has_the_contract_keys(run_in):
    _, out = run_in
    for key in (
        "run_dir",
        "checkpoint",
        "classes",
        "epochs",
        "device",
        "train_seconds",
        "train_images_per_second",
        "test_accuracy",
        "val_accuracy",
        "best_epoch",
        "selection",
    ):
        assert key in out, key
    assert out["selection"]["split"] == "validation" and out["selection"]["epoch"] == out["best_epoch"] == 1
    assert out["classes"] == ["0", "1", "2"] and out["epochs"] == 1
    assert out["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # the default is auto


@pytest.mark.slow
def test_export_and_infer_with_defaults_agree(run_in, tiny_tree, monkeypatch):
    cwd, trained = run_in
    monkeypatch.chdir(cwd)
    exports = {}
    for fmt in ("onnx", "torchscript"):
        out = _json(runner.invoke(app, ["export", "--format", fmt, "--json"]))
        assert out["format"] == fmt and os.path.isfile(out["path"])
        assert out["parity"]["passed"] is True and out["parity"]["argmax_agreement"] == 1.0
        assert out["parity"]["max_abs_diff"] <= 1e-4 and out["parity"]["n_images"] > 0
        assert {"exporter", "mean_abs_diff"} <= set(out) | set(out["parity"])
        exports[fmt] = out
    testing = os.path.join(tiny_tree, "testing")
    res = _json(runner.invoke(app, ["infer", testing, "--json"]))
    for key in ("model", "provider", "n_images", "n_failed", "seconds", "images_per_second", "accuracy", "output"):
        assert key in res, key
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider"
    auto = cuda if cuda in ort.get_available_providers() else "CPUExecutionProvider"  # the default is auto
    assert res["provider"] == auto and res["n_images"] == 60 and res["n_failed"] == 0
    assert os.path.samefile(res["model"], exports["onnx"]["path"])
    # The ONNX runtime's answers match the TorchScript model's, file by file.
    module, meta = load_torchscript(exports["torchscript"]["path"])
    rows = list(csv.DictReader(open(res["output"], newline="")))
    files = list_pngs(testing).files
    assert [r["path"] for r in rows] == files
    x = np.stack([read_image(os.path.join(testing, f), (1, 28, 28))[0] for f in files])
    with torch.no_grad():
        ts_pred = module(torch.from_numpy(x)).argmax(1).numpy()
    assert [r["predicted"] for r in rows] == [meta.classes[i] for i in ts_pred]
    accuracy = np.mean([r["predicted"] == r["label"] for r in rows])
    assert res["accuracy"] == pytest.approx(accuracy)
    assert res["accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-6)


def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["train", "missing-folder"], ["export"], ["infer", "nowhere"], ["infer", str(tmp_path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and result.stderr.startswith("error: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["infer", ".", "--batch-size", "99999999999999999999"],
        ["infer", ".", "--workers", "-1"],
        ["bench", "--threads", "99999999999999999999"],
        ["train", ".", "--batch-size", "99999999999999999999"],
    ],
)
def test_numbers_past_any_machine_are_usage_errors(args):
    """A mistyped huge number overflowed inside islice / torch (a traceback, exit 1): exit 2, one message."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output


def test_paths_with_control_characters_are_printed_escaped_on_success(run_in, tiny_tree, tmp_path):
    """Error lines escaped control characters, but a successful run printed its paths raw."""
    import shutil

    cwd, trained = run_in
    folder = tmp_path / "e\x1b[31mvil\rdir"
    shutil.copytree(os.path.join(tiny_tree, "testing"), folder)
    model = _json(runner.invoke(app, ["export", os.path.join(cwd, trained["checkpoint"]), "--json"]))["path"]
    res = runner.invoke(
        app, ["infer", os.fspath(folder), "--model", model, "--output", os.fspath(folder / "p\x1b.csv")]
    )
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stderr and "\r" not in res.stderr and "\\x1b" in res.stderr
