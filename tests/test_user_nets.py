"""`--arch module.path:ClassName`: a user's own network trained, exported through the gates and run
by `cnnkit infer`; `export_module` for a trained module without a checkpoint; every mistake one line
with exit 2; and a checkpoint naming a module is never imported without the caller's permission."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from typer.testing import CliRunner

from cnnkit.bench import bench
from cnnkit.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cnnkit.cli import app
from cnnkit.errors import ModelError
from cnnkit.export import export_module
from cnnkit.models import USER_RECIPE, Classifier, build_model, recipe_for
from cnnkit.runtime.infer import infer
from cnnkit.runtime.session import read_meta

runner = CliRunner()
ARCH = "usernets:TinyNet"


def _ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _one_line_error(result) -> str:
    """The error a command stopped with: exit 2, one `error:` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, tiny_tree) -> str:
    """A run folder where `cnnkit train --arch usernets:TinyNet` trained one epoch."""
    run = str(tmp_path_factory.mktemp("user-run"))
    args = ["train", tiny_tree, "--arch", ARCH, "--epochs", "1", "--workers", "0", "--out", run, "--json"]
    out = _ok(runner.invoke(app, args))
    assert out["run_dir"] == run
    return run


def test_trains_exports_through_the_gates_and_infers(user_run, tiny_tree, tmp_path):
    ckpt = os.path.join(user_run, "best.pt")
    assert load_checkpoint(ckpt)["meta"]["arch"] == ARCH
    assert load_checkpoint(ckpt)["config"]["batch_size"] == USER_RECIPE.batch_size  # the user arch's recipe
    for fmt in ("onnx", "torchscript"):
        res = _ok(runner.invoke(app, ["export", ckpt, "-f", fmt, "--trust-arch", ARCH, "--json"]))
        assert res["parity"]["passed"] and os.path.isfile(res["path"])
    model = os.path.join(user_run, "model.onnx")
    meta = read_meta(model)
    assert (meta.arch, meta.classes, meta.input_shape, meta.output) == (ARCH, ("0", "1", "2"), (1, 28, 28), "logits")
    result = infer(os.path.join(tiny_tree, "testing"), model, device="cpu", output=str(tmp_path / "p.csv"), workers=0)
    assert result.n_images == 60 and result.accuracy is not None
    # bench: the eager reference only with the arch named; without, a note and no eager row.
    rows = bench(run=user_run, limit=30, device="cpu").rows
    assert "eager" not in {r.artifact for r in rows}
    trusted = bench(run=user_run, limit=30, device="cpu", trust_arch=ARCH)
    assert "eager" in {r.artifact for r in trusted.rows} and not any("--trust-arch" in n for n in trusted.notes)


def test_export_of_a_user_arch_needs_its_import_string(user_run):
    ckpt = os.path.join(user_run, "best.pt")
    line = _one_line_error(runner.invoke(app, ["export", ckpt]))
    assert "'usernets'" in line and f"--trust-arch {ARCH}" in line
    line = _one_line_error(runner.invoke(app, ["export", ckpt, "--trust-arch", "usernets:PoolNet"]))
    assert f"records arch '{ARCH}', not 'usernets:PoolNet'" in line


def test_a_checkpoint_naming_a_module_never_imports_it_unasked(user_run, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    monkeypatch.setenv("USERNETS_MARKER", str(marker))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "checkpoint.pt"):
        state = load_checkpoint(os.path.join(user_run, name))
        state["meta"] = {**state["meta"], "arch": "usernets_marker:Net"}
        state["config"] = {**state["config"], "arch": "usernets_marker:Net"}
        save_checkpoint(str(run / name), state)
    line = _one_line_error(runner.invoke(app, ["export", str(run / "best.pt")]))
    assert "module 'usernets_marker'" in line and "--trust-arch usernets_marker:Net" in line
    line = _one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--workers", "0"]))
    assert "--arch usernets_marker:Net" in line
    with pytest.raises(ModelError, match="usernets_marker"):
        model_from_checkpoint(str(run / "best.pt"))
    assert not marker.exists() and "usernets_marker" not in sys.modules
    model_from_checkpoint(str(run / "best.pt"), trust_arch="usernets_marker:Net")  # named: imported, and loads
    assert marker.exists()


@pytest.mark.parametrize(
    ("arch", "says"),
    [
        ("no_such_module_xyz:Net", "cannot import module 'no_such_module_xyz'"),
        ("usernets:Missing", "has no attribute 'Missing'"),
        ("usernets:NotAModule", "is not an nn.Module subclass"),
        ("usernets:BadConstructor", "must take the keyword arguments in_channels and num_classes"),
        ("usernets:WrongOutput", "expected float logits of shape (2, 3)"),
        ("usernets:", "expected a built-in name or an import string module.path:ClassName"),
    ],
)
def test_a_wrong_arch_is_one_line_before_training(arch, says, tiny_tree, tmp_path):
    args = ["train", tiny_tree, "--arch", arch, "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "r")]
    line = _one_line_error(runner.invoke(app, args))
    assert says in line and arch in line
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")


def test_height_and_width_only_when_the_constructor_names_them():
    import usernets

    model, output = build_model("usernets:PoolNet", 4, 20, 24, 3)
    assert output == "logits" and usernets.PoolNet.seen == {"in_channels": 3, "num_classes": 4}
    assert model(torch.zeros((2, 3, 20, 24), dtype=torch.uint8)).shape == (2, 4)
    assert recipe_for("usernets:PoolNet") == USER_RECIPE


def test_export_module_exports_a_trained_module(tiny_tree, tmp_path):
    import usernets

    torch.manual_seed(0)
    net = usernets.TinyNet(in_channels=1, num_classes=3, height=28, width=28)
    testing = os.path.join(tiny_tree, "testing")
    results = export_module(net, data=testing, out=str(tmp_path / "m"), formats=("onnx", "torchscript"))
    assert [r.format for r in results] == ["onnx", "torchscript"]
    assert all(r.parity is not None and r.parity.passed and r.checkpoint == "" for r in results)
    meta = read_meta(results[0].path)
    assert (meta.arch, meta.classes, meta.input_shape) == (ARCH, ("0", "1", "2"), (1, 28, 28))
    assert meta.extra["data"] == {"root": "testing"}  # the folder's name, not this machine's path
    assert infer(testing, results[0].path, device="cpu", output=str(tmp_path / "p.csv"), workers=0).n_images == 60
    # A Classifier is taken as it is; the module passed in is left as it was (train mode).
    wrapped = Classifier(net.train())
    (again,) = export_module(wrapped, data=testing, out=str(tmp_path / "c"), classes=["0", "1", "2"])
    assert again.parity is not None and again.parity.passed and net.training


def test_export_module_refuses_a_wrong_module_in_one_line(tiny_tree, tmp_path):
    import usernets

    testing = os.path.join(tiny_tree, "testing")
    net = usernets.WrongOutput(in_channels=1, num_classes=3, height=28, width=28)
    with pytest.raises(ModelError, match=r"usernets:WrongOutput.*expected float logits of shape \(2, 3\)"):
        export_module(net, data=testing, out=str(tmp_path))
    with pytest.raises(ModelError, match="takes a torch.nn.Module"):
        export_module(object(), data=testing, out=str(tmp_path))
    assert os.listdir(tmp_path) == []
