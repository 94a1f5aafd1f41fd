"""`cnnkit diff`: the layer-by-layer comparison names the layer an export breaks, and the export gate
names it on a failure.

One small model is trained once for the module (3 digit classes, 2 epochs); the ONNX files are then
corrupted in one weight of one layer, which `diff` must name (and no layer before it).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import cnnkit.export.onnx as onnx_export  # noqa: E402
from cnnkit.cli import app  # noqa: E402
from cnnkit.errors import ModelError, ParityError  # noqa: E402
from cnnkit.export import export  # noqa: E402
from cnnkit.export.diff import INT8_MIN_SQNR_DB, OUTPUT_ROW, compare, diff  # noqa: E402

LEGACY = "torchscript"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tree) -> str:
    from cnnkit.trainer.loop import TrainConfig, train

    out = str(tmp_path_factory.mktemp("diff") / "run")
    return train(TrainConfig(data=tiny_tree, out=out, epochs=2, batch_size=32, workers=0)).checkpoint


@pytest.fixture(scope="module", params=[LEGACY, "dynamo"])
def exported(request, trained, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp(f"onnx-{request.param}") / "model.onnx")
    return export(trained, out=out, exporter=request.param, n_images=16).path


def _corrupt(src: str, dst: str, layer: str = "net.4") -> str:
    """A copy of `src` with one value of `layer`'s convolution weight (the second convolution's; folded
    or not, its initializer's name holds the layer's) moved by 1.0."""
    proto = onnx.load(src)
    init = next(t for t in proto.graph.initializer if layer + "." in t.name + "." and len(t.dims) == 4)
    weight = init.name
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(values, weight))
    onnx.save(proto, dst)
    return dst


def test_compare_numbers() -> None:
    ref = np.array([3.0, 4.0])
    assert compare(ref, ref)[0] == 0 and compare(ref, ref)[3] == float("inf")
    max_abs, rel, cos, sqnr = compare(ref, np.array([3.0, 4.5]))
    assert max_abs == 0.5 and rel == 0.125 and 0.99 < cos < 1
    assert sqnr == pytest.approx(10 * np.log10(25 / 0.25))


def test_a_correct_export_is_within_tolerance_at_every_layer(exported, trained) -> None:
    result = diff(trained, exported, n_images=16)
    assert result.per_layer and result.first_bad is None and result.precision == "fp32"
    modules = [r.module for r in result.layers]
    assert {"prep", "net.0", "net.4", OUTPUT_ROW} <= set(modules) and modules[-1] == OUTPUT_ROW
    assert all(r.within and r.max_abs < 1e-4 for r in result.layers)


def test_a_corrupted_weight_is_found_in_its_layer(exported, trained, tmp_path) -> None:
    bad = _corrupt(exported, str(tmp_path / "model.onnx"))
    result = diff(trained, bad, n_images=16)
    assert result.first_bad == "net.4"
    rows = {r.module: r for r in result.layers}
    assert all(rows[m].within for m in ("prep", "net.0", "net.1", "net.3"))
    assert not rows["net.4"].within and not rows[OUTPUT_ROW].within
    assert "net.4" in result.summary()


def test_int8_reports_sqnr_per_layer(trained, tmp_path) -> None:
    out = str(tmp_path / "model.int8.onnx")
    export(trained, out=out, quantize="int8", exporter=LEGACY, n_images=16, calibration_size=32, max_accuracy_drop=100)
    result = diff(trained, out, n_images=16)
    assert result.precision == "int8" and result.min_sqnr_db == INT8_MIN_SQNR_DB and result.tolerance is None
    assert len(result.layers) >= 5 and all(np.isfinite(r.sqnr_db) for r in result.layers[1:])
    assert all(r.within == (r.sqnr_db >= INT8_MIN_SQNR_DB) for r in result.layers)


def test_cli_json_and_table(exported, trained) -> None:
    got = CliRunner().invoke(app, ["diff", trained, exported, "--images", "8", "--json"])
    assert got.exit_code == 0, got.output
    doc = json.loads(got.stdout)
    assert {"artifact", "format", "precision", "per_layer", "n_images", "layers", "first_bad", "seconds"} <= set(doc)
    assert doc["n_images"] == 8 and doc["first_bad"] is None
    assert set(doc["layers"][0]) == {
        "module",
        "kind",
        "tensor",
        "shape",
        "max_abs",
        "relative",
        "cosine",
        "sqnr_db",
        "within",
    }
    assert "max |diff|" in got.stderr and "cosine" in got.stderr


def test_torchscript_compares_the_final_output_and_needs_proof(trained, tmp_path) -> None:
    ts = export(trained, fmt="torchscript", out=str(tmp_path / "model.ts"), n_images=8).path
    result = diff(trained, ts, n_images=8)
    assert not result.per_layer and [r.module for r in result.layers] == [OUTPUT_ROW]
    assert result.first_bad is None and "not available" in result.note
    elsewhere = str(tmp_path / "copy" / "model.ts")
    os.makedirs(os.path.dirname(elsewhere))
    shutil.copy(ts, elsewhere)
    with pytest.raises(ModelError, match="--trust-model"):
        diff(trained, elsewhere, n_images=8)
    assert diff(trained, elsewhere, n_images=8, trust_model=True).first_bad is None


def test_the_export_gate_names_the_broken_layer(trained, tmp_path, monkeypatch) -> None:
    real = onnx_export.export_onnx

    def broken(model, meta, path, exporter="dynamo", opset=None, batch=None):
        info = real(model, meta, path, exporter, opset, batch)
        _corrupt(path, path)
        return info

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    out = tmp_path / "model.onnx"
    with pytest.raises(ParityError) as caught:
        export(trained, out=str(out), exporter=LEGACY, n_images=16)
    assert "first layer out of tolerance: net.4" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.diff is not None and caught.value.diff["first_bad"] == "net.4"
    assert not out.exists() and os.listdir(tmp_path) == []


def test_tensorless_layers_after_a_tensor_are_its_fused_candidates() -> None:
    """After folding, conv -> pool -> Identity (the folded BatchNorm) -> ReLU: the INT8 graph's pool tensor
    is already clipped by the ReLU the quantizer dropped, so both following layers are candidates."""
    from cnnkit.export.diff import _fused_into

    order = ["prep", "net.0", "net.1", "net.2", "net.3", "net.4", "net.5", "net"]
    have = {"prep", "net.0", "net.1", "net.4"}
    assert _fused_into("net.1", order, have) == ["net.2", "net.3"]
    assert _fused_into("net.0", order, have) == []  # the pool has its own tensor
    assert _fused_into("net.4", order, have) == ["net.5"]  # not the container that ends after it
