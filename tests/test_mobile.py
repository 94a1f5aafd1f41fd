"""Mobile-ready exports: `cnnkit export --batch N` (a fixed batch axis, padded at inference), BatchNorm
folded into the convolutions, and onnxruntime's mobile usability verdict in the export's JSON."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cnnkit.checkpoint import save_checkpoint  # noqa: E402
from cnnkit.cli import app  # noqa: E402
from cnnkit.errors import ModelError  # noqa: E402
from cnnkit.export import export  # noqa: E402
from cnnkit.export.fold import fold_batchnorm  # noqa: E402
from cnnkit.meta import ModelMeta  # noqa: E402
from cnnkit.models import build_model  # noqa: E402
from cnnkit.runtime.predictor import Predictor  # noqa: E402
from cnnkit.runtime.session import run_fixed  # noqa: E402

runner = CliRunner()
CLASSES = ("0", "1", "2")


def _checkpoint(folder: str, tree: str, negative: bool = False) -> str:
    """A random-init `small` checkpoint with non-trivial BatchNorm statistics and scales (one negative
    gamma in the first BN with `negative`)."""
    torch.manual_seed(0)
    model, output = build_model("small", len(CLASSES), 28, 28)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        if negative:
            model.net[2].weight[0] = -0.7
    data = {"root": tree, "train": os.path.join(tree, "training"), "test": os.path.join(tree, "testing")}
    meta = ModelMeta(arch="small", classes=CLASSES, input_shape=(1, 28, 28), output=output, extra={"data": data})
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "best.pt")
    save_checkpoint(path, {"meta": meta.to_dict(), "model": model.state_dict(), "epoch": 1})
    return path


def _ops(path: str) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def _batch_dim(path: str) -> int | str:
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param if dim.HasField("dim_param") else dim.dim_value


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(path: str) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        return {r["path"]: [r["predicted"], r["label"], r["score"]] for r in csv.DictReader(f)}


def test_run_fixed_pads_the_last_batch_and_drops_its_rows():
    calls = []

    def once(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :1].astype(np.float32)

    batch = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    out = run_fixed(once, batch, 4)
    assert calls == [4, 4] and out.ravel().tolist() == [0, 1, 2, 3, 4]


def test_batch_1_cli_export_is_fixed_gated_and_fully_mobile(tmp_path, tiny_tree):
    ckpt = _checkpoint(str(tmp_path / "run"), tiny_tree)
    out = _json(runner.invoke(app, ["export", ckpt, "--batch", "1", "--json"]))
    assert out["path"].endswith("model.b1.onnx") and out["batch"] == 1
    assert not os.path.exists(tmp_path / "run" / "model.onnx")  # the dynamic model's name is left alone
    assert _batch_dim(out["path"]) == 1
    assert out["parity"]["passed"] and out["parity"]["batch_sizes"] == [1]
    assert "BatchNormalization" not in _ops(out["path"])
    for ep in ("nnapi", "coreml"):
        v = out["mobile"][ep]
        assert v["supported"] == v["nodes"] > 0 and v["partitions"] == 1, (ep, v)
    with open(out["report_path"]) as f:
        assert json.load(f)["batch"] == 1


def test_fixed_batch_infers_any_count_like_the_dynamic_model(tmp_path, tiny_tree):
    ckpt = _checkpoint(str(tmp_path / "run"), tiny_tree)
    fixed = export(ckpt, exporter="torchscript", batch=4)
    dynamic = export(ckpt, exporter="torchscript")
    assert _batch_dim(fixed.path) == 4 and isinstance(_batch_dim(dynamic.path), str)
    assert dynamic.mobile["nnapi"]["supported"] < dynamic.mobile["nnapi"]["nodes"]  # the dynamic batch
    testing = os.path.join(tiny_tree, "testing")  # 60 images: not a multiple of 4 with --batch-size 7
    csvs = {}
    for name, model in (("fixed", fixed.path), ("dynamic", dynamic.path)):
        csvs[name] = str(tmp_path / f"{name}.csv")
        args = ["infer", testing, "--model", model, "--output", csvs[name], "--batch-size", "7", "--workers", "0"]
        _json(runner.invoke(app, [*args, "--json"]))
    a, b = _rows(csvs["fixed"]), _rows(csvs["dynamic"])
    assert a.keys() == b.keys() and len(a) == 60
    for key in a:
        assert a[key][:2] == b[key][:2] and abs(float(a[key][2]) - float(b[key][2])) < 1e-5
    files = [os.path.join(testing, k) for k in sorted(a)[:5]]
    with Predictor(fixed.path, device="cpu", workers=0) as p, Predictor(dynamic.path, device="cpu", workers=0) as q:
        got, want = p.predict(files), q.predict(files)
    assert len(got) == 5 and [r.label for r in got] == [r.label for r in want]
    assert np.allclose([r.probabilities for r in got], [r.probabilities for r in want], atol=1e-5)


def test_folding_small_removes_batchnorm_and_matches_eager(tmp_path, tiny_tree):
    ckpt = _checkpoint(str(tmp_path / "run"), tiny_tree)
    from cnnkit.checkpoint import model_from_checkpoint

    model, _, _ = model_from_checkpoint(ckpt)
    folded, info = fold_batchnorm(model)
    assert info == {"folded": ["net.2", "net.6", "net.9"], "unfolded": []}
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-4)
    on = export(ckpt, exporter="torchscript", out=str(tmp_path / "on.onnx"))
    off = export(ckpt, exporter="torchscript", out=str(tmp_path / "off.onnx"), fold=False)
    assert "BatchNormalization" not in _ops(on.path) and on.parity.max_abs_diff <= 1e-4
    assert "BatchNormalization" in _ops(off.path) and off.fold is None  # the test can fail
    assert on.fold == info


def test_negative_scale_is_left_unfolded_and_still_passes(tmp_path, tiny_tree):
    ckpt = _checkpoint(str(tmp_path / "run"), tiny_tree, negative=True)
    result = export(ckpt, exporter="torchscript")
    assert result.fold["folded"] == ["net.6", "net.9"]
    [left] = result.fold["unfolded"]
    assert left["layer"] == "net.2" and "<= 0" in left["why"]
    assert result.parity.passed and _ops(result.path).count("BatchNormalization") == 1


@pytest.mark.parametrize(
    "kwargs", [{"fmt": "torchscript"}, {"quantize": "int8"}, {"half": True}], ids=["torchscript", "int8", "fp16"]
)
def test_batch_is_for_fp32_onnx_only(tmp_path, tiny_tree, kwargs):
    ckpt = _checkpoint(str(tmp_path / "run"), tiny_tree)
    with pytest.raises(ModelError, match="--batch applies to fp32"):
        export(ckpt, batch=2, **kwargs)
    assert sorted(os.listdir(tmp_path / "run")) == ["best.pt"]
