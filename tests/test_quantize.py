"""INT8 (accuracy gate), FP16 (fp16 parity tier) and pt2 (torch.export) exports, and their gates failing.

One small model is trained once for the module (3 digit classes, 3 epochs, ~5 s) so that the INT8
accuracy gate compares meaningful accuracies; every gate is also shown to reject a deliberately
broken artifact and to leave nothing behind.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import cnnkit.export.onnx as onnx_export  # noqa: E402
import cnnkit.export.parity as parity_mod  # noqa: E402
import cnnkit.export.pt2 as pt2_mod  # noqa: E402
import cnnkit.export.quantize as quantize_mod  # noqa: E402
from cnnkit.cli import app  # noqa: E402
from cnnkit.errors import DataError, DeviceError, ModelError, ParityError  # noqa: E402
from cnnkit.export import export  # noqa: E402
from cnnkit.export.parity import TIERS, run_parity  # noqa: E402
from cnnkit.export.pt2 import load_pt2  # noqa: E402
from cnnkit.meta import EXTRA_FILE, METADATA_KEY, ModelMeta  # noqa: E402
from cnnkit.provenance import MANIFEST_NAME  # noqa: E402

LEGACY = "torchscript"  # the legacy ONNX exporter: 0.1 s per export instead of 2-5 s; the gates are the same


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tree) -> str:
    """A run folder with a model trained on digits 0, 1, 2 (test accuracy ~90%)."""
    from cnnkit.trainer.loop import TrainConfig, train

    out = str(tmp_path_factory.mktemp("int8") / "run")
    # 36 steps: BatchNorm's running statistics, which evaluation uses, need a few dozen to settle.
    result = train(TrainConfig(data=tiny_tree, out=out, epochs=6, batch_size=32, workers=0))
    assert result.test_accuracy is not None and result.test_accuracy > 0.7
    return result.checkpoint


def _record(path: str) -> ModelMeta:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return ModelMeta.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


def _listing(folder: str) -> set[str]:
    return set(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# INT8


@pytest.fixture(scope="module")
def int8_result(trained):
    # 60 testing images: one image is 1.67 points, so the test allows 5 (the default limit is 0.5).
    return export(trained, quantize="int8", exporter=LEGACY, n_images=32, max_accuracy_drop=5)


def test_int8_export_passes_gate_and_reports(int8_result, trained, tiny_tree) -> None:
    result = int8_result
    folder = os.path.dirname(trained)
    assert result.path == os.path.join(folder, "model.int8.onnx") and os.path.isfile(result.path)
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temp files or folders
    assert result.precision == "int8" and result.verified and result.opset == 18
    assert result.parity is not None and result.parity.passed  # the fp32 graph it started from

    a = result.accuracy
    assert a is not None and a["passed"] and a["n_images"] == 60
    assert a["data"] == os.path.join(tiny_tree, "testing")
    assert a["fp32_accuracy"] > 0.7 and a["drop_points"] <= 5
    assert a["drop_points"] == pytest.approx((a["fp32_accuracy"] - a["int8_accuracy"]) * 100)
    assert 0.9 <= a["argmax_agreement"] <= 1.0
    assert a["int8_bytes"] < 0.6 * a["fp32_bytes"] and a["size_ratio"] < 0.6
    assert a["int8_images_per_second"] > 0 and a["fp32_images_per_second"] > 0 and a["threads"] == 1

    with open(result.report_path) as f:
        report = json.load(f)
    assert report["accuracy"]["int8_accuracy"] == a["int8_accuracy"] and report["precision"] == "int8"


def test_int8_file_keeps_the_contract_and_records_quantization(int8_result, tiny_tree) -> None:
    proto = onnx.load(int8_result.path)
    ops = [n.op_type for n in proto.graph.node]
    assert ops[0] == "Cast" and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}  # unused domains dropped
    weights = {i.name: i for i in proto.graph.initializer}
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in weights.values())

    session = ort.InferenceSession(int8_result.path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.type == "tensor(uint8)" and isinstance(inp.shape[0], str) and out.type == "tensor(float)"

    exp = _record(int8_result.path).extra["export"]
    assert exp["precision"] == "int8" and exp["opset"] == 18 and exp["ir_version"] == proto.ir_version
    q = exp["quantization"]
    assert (q["format"], q["per_channel"], q["weights"], q["activations"]) == ("QDQ", True, "int8", "uint8")
    # The file names its folders only (`--keep-paths` records full paths): it may leave this machine.
    name = os.path.basename(tiny_tree)
    assert q["calibration"]["n_images"] == 180 and q["calibration"]["data"] == f"{name}/training"
    assert q["accuracy_gate"]["data"] == f"{name}/testing"
    assert q["input_scale"].startswith("1/255") and "Conv" in q["quantized_ops"]
    assert q["accuracy_gate"]["int8_accuracy"] == int8_result.accuracy["int8_accuracy"]

    # `cnnkit infer` (the torch-free runtime) reads it like any cnnkit ONNX file
    from cnnkit.runtime.infer import infer

    out_csv = os.path.join(os.path.dirname(int8_result.path), "int8.csv")
    res = infer(os.path.join(tiny_tree, "testing"), model=int8_result.path, output=out_csv, workers=0, progress=False)
    assert res.accuracy == pytest.approx(int8_result.accuracy["int8_accuracy"])


def _destroy_int8_weights(path: str) -> None:
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            arr = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(arr), init.name))
    onnx.save(proto, path)


def test_broken_int8_fails_accuracy_gate_and_leaves_nothing(int8_result, trained, monkeypatch) -> None:
    folder = os.path.dirname(trained)
    before = _listing(folder)
    kept = open(int8_result.path, "rb").read()
    monkeypatch.setattr(quantize_mod, "quantize_int8", _broken_quantizer(quantize_mod.quantize_int8))
    with pytest.raises(ParityError, match=r"int8 accuracy gate FAILED: .*nothing was written") as err:
        export(trained, quantize="int8", exporter=LEGACY, n_images=16, max_accuracy_drop=5)
    assert "\n" not in str(err.value)
    assert _listing(folder) == before  # no temp files; the earlier model.int8.onnx is untouched
    assert open(int8_result.path, "rb").read() == kept


def test_int8_options_and_data_are_checked_before_work(trained, tmp_path) -> None:
    with pytest.raises(ModelError, match="unknown quantization"):
        export(trained, quantize="int4")
    with pytest.raises(ModelError, match="--format onnx only"):
        export(trained, fmt="torchscript", quantize="int8")
    with pytest.raises(ModelError, match="choose one of --quantize int8 and --half"):
        export(trained, quantize="int8", half=True)
    with pytest.raises(Exception, match="accuracy points"):
        export(trained, quantize="int8", max_accuracy_drop=-1)
    folder = os.path.dirname(trained)
    before = _listing(folder)
    with pytest.raises(DataError, match="--calibration DIR"):
        export(trained, quantize="int8", calibration=str(tmp_path / "missing"), exporter=LEGACY)
    unlabeled = tmp_path / "flat"
    unlabeled.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8), mode="L").save(unlabeled / f"{i}.png")
    with pytest.raises(DataError, match="needs labeled images"):
        export(trained, quantize="int8", data=str(unlabeled), exporter=LEGACY)
    assert _listing(folder) == before


def test_int8_through_the_cli(trained, tmp_path, monkeypatch) -> None:
    runner = CliRunner()
    out = str(tmp_path / "cli.int8.onnx")
    res = runner.invoke(
        app,
        [
            "export",
            trained,
            "--quantize",
            "int8",
            "--exporter",
            LEGACY,
            "--out",
            out,
            "--max-accuracy-drop",
            "5",
            "--calibration-size",
            "64",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip())
    assert d["precision"] == "int8" and d["path"] == out and d["accuracy"]["passed"] is True
    assert d["info"]["calibration"]["n_images"] == 64
    assert res.stderr.count("int8 accuracy gate passed") == 1 and "on 60 images" in res.stderr  # said once

    monkeypatch.setattr(quantize_mod, "quantize_int8", _broken_quantizer(quantize_mod.quantize_int8))
    res = runner.invoke(
        app, ["export", trained, "--quantize", "int8", "--exporter", LEGACY, "--out", str(tmp_path / "bad.onnx")]
    )
    assert res.exit_code == 3 and "int8 accuracy gate FAILED" in res.stderr
    assert not os.path.exists(tmp_path / "bad.onnx")


def _broken_quantizer(real):
    def broken(src, path, meta, calibration, calibration_data):
        info = real(src, path, meta, calibration, calibration_data)
        _destroy_int8_weights(path)  # every logit becomes the bias: one class for every image
        return info

    return broken


# --------------------------------------------------------------------------------------------
# FP16


def test_fp16_export_keeps_io_types_and_is_gated(trained, tmp_path, capsys) -> None:
    out = str(tmp_path / "m.fp16.onnx")
    result = export(trained, half=True, exporter=LEGACY, out=out, n_images=32)
    err = capsys.readouterr().err
    assert result.precision == "fp16" and result.path == out
    p = result.parity
    if "CUDAExecutionProvider" in ort.get_available_providers() and p is not None and p.provider.startswith("cuda"):
        assert result.verified and result.verified_on == "cuda:0"  # a GPU machine: gated on the CUDA provider
    else:  # this machine: the CPU provider runs the fp16 graph, and the result says it is not the target
        assert not result.verified and result.verified_on == "cpu" and p is not None and p.provider == "cpu"
        assert any("checked on the CPU provider only" in n for n in result.notes) and "CPU provider" in err
        assert "not verified on its target device" in err
        strict_out = str(tmp_path / "strict.fp16.onnx")
        with pytest.raises(ParityError, match="--strict"):
            export(trained, half=True, exporter=LEGACY, out=strict_out, n_images=8, strict=True)
        assert not os.path.exists(strict_out)
        with pytest.raises(DeviceError, match="cuda:1"):
            export(trained, half=True, exporter=LEGACY, out=strict_out, n_images=8, device="cuda:1")
    assert p.passed and p.tolerance == TIERS["fp16"].max_abs and p.min_agreement == TIERS["fp16"].min_agreement
    assert p.max_abs_diff < 5e-2

    proto = onnx.load(out)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    floats = [i for i in proto.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(i.data_type == onnx.TensorProto.FLOAT16 for i in floats)
    exp = _record(out).extra["export"]
    assert exp["precision"] == "fp16" and exp["fp16"]["keep_io_types"] is True and exp["opset"] == 18


def test_fp16_without_any_usable_provider_is_written_but_not_verified(trained, tmp_path, monkeypatch, capsys) -> None:
    real = parity_mod.onnx_runner

    def no_provider(path, device="cpu"):
        if path.endswith("model.fp32.onnx"):  # the fp32 graph fp16 starts from is gated as usual
            return real(path, device)
        if device.startswith("cuda"):
            raise DeviceError("onnxruntime 1.32.0 has no CUDA provider")
        raise RuntimeError("NOT_IMPLEMENTED: Could not find an implementation for Conv(11) float16")

    monkeypatch.setattr(parity_mod, "onnx_runner", no_provider)
    out = str(tmp_path / "unverified.fp16.onnx")
    result = export(trained, half=True, exporter=LEGACY, out=out, n_images=8)
    err = capsys.readouterr().err
    assert os.path.isfile(out) and result.parity is None and result.verified is False and result.verified_on is None
    assert "not verified here: no CUDA provider" in err and "not verified here: no CUDA provider" in result.notes[0]
    with open(result.report_path) as f:
        report = json.load(f)
    assert report["verified"] is False and report["parity"] is None

    res = CliRunner().invoke(app, ["export", trained, "--half", "--exporter", LEGACY, "--out", out, "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("fp16 parity not verified here: no CUDA provider") == 1, res.stderr  # said once
    assert "fp16 parity passed" not in res.stderr and "-> passed" not in res.stderr
    assert json.loads(res.stdout)["verified"] is False


def test_broken_fp16_fails_gate_and_leaves_nothing(trained, tmp_path, monkeypatch) -> None:
    real = onnx_export.convert_fp16

    def broken(src, path, meta):
        info = real(src, path, meta)
        proto = onnx.load(path)
        for init in proto.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT16 and len(init.dims) == 4:
                arr = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array((arr * 1.5).astype(np.float16), init.name))
                break
        onnx.save(proto, path)
        return info

    monkeypatch.setattr(onnx_export, "convert_fp16", broken)
    folder = tmp_path / "out"
    with pytest.raises(ParityError, match=r"fp16 export .* parity FAILED"):
        export(trained, half=True, exporter=LEGACY, out=str(folder / "m.fp16.onnx"), n_images=16)
    assert os.listdir(folder) == []


# --------------------------------------------------------------------------------------------
# pt2 (torch.export)


@pytest.fixture(scope="module")
def pt2_result(trained, tmp_path_factory):
    return export(trained, fmt="pt2", out=str(tmp_path_factory.mktemp("pt2")), n_images=16)


def test_pt2_export_passes_and_round_trips(pt2_result, trained) -> None:
    result = pt2_result
    assert result.path.endswith("model.pt2") and result.exporter == "torch.export" and result.opset is None
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    assert sorted(os.listdir(os.path.dirname(result.path))) == [MANIFEST_NAME, "model.pt2", "model.pt2.parity.json"]
    module, meta = load_pt2(result.path)
    assert meta.extra["export"]["format"] == "pt2" and meta.extra["export"]["torch"] == torch.__version__
    from cnnkit.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(trained)[0]
    for n in (1, 5, 64):  # the batch dimension is symbolic
        x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
        with torch.inference_mode():
            torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=0)


def test_broken_pt2_fails_gate_and_leaves_nothing(trained, tmp_path, monkeypatch) -> None:
    real = pt2_mod.export_pt2

    def broken(model, meta, path):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            next(bad.parameters()).add_(0.05)  # the first conv's weights: small, everywhere
        return real(bad, meta, path)

    monkeypatch.setattr(pt2_mod, "export_pt2", broken)
    with pytest.raises(ParityError, match=r"pt2 export .*parity FAILED.*nothing was written"):
        export(trained, fmt="pt2", out=str(tmp_path / "model.pt2"), n_images=8)
    assert os.listdir(tmp_path) == []


def test_load_pt2_refuses_foreign_files(tmp_path) -> None:
    with pytest.raises(ModelError, match="no such pt2"):
        load_pt2(str(tmp_path / "missing.pt2"))
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable torch.export"):
        load_pt2(str(tmp_path / "junk.pt2"))
    program = torch.export.export(torch.nn.ReLU(), (torch.zeros(2),))
    torch.export.save(program, str(tmp_path / "plain.pt2"))
    with pytest.raises(ModelError, match=f"without {EXTRA_FILE}"):
        load_pt2(str(tmp_path / "plain.pt2"))


# --------------------------------------------------------------------------------------------
# The tolerance tiers


def test_min_agreement_tier_allows_a_few_flips_and_no_more() -> None:
    images = np.zeros((400, 1, 2, 2), dtype=np.uint8)
    ref = np.tile(np.array([[1.0, 0.0]], np.float32), (400, 1))
    cand = ref.copy()
    cand[:1] = [[0.0, 1.0]]  # one flipped decision in 400 (99.75%)
    kw = {"batch_sizes": (400,)}
    strict = run_parity(lambda x: ref[: len(x)], lambda x: cand[: len(x)], images, "logits", 2.0, **kw)
    loose = run_parity(
        lambda x: ref[: len(x)], lambda x: cand[: len(x)], images, "logits", 2.0, min_agreement=0.995, **kw
    )
    assert not strict.passed and loose.passed and "at least 99.5%" in loose.summary()
    cand[:3] = [[0.0, 1.0]]  # 99.25% < 99.5%
    worse = run_parity(
        lambda x: ref[: len(x)], lambda x: cand[: len(x)], images, "logits", 2.0, min_agreement=0.995, **kw
    )
    assert not worse.passed
