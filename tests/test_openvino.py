"""`--backend openvino`: the same CSV as onnxruntime, the first-use parity verdict recorded once and
reused, a disagreeing backend refused (exit 3), `Predictor(backend=)`, and a torch-free path."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'cnnkit[openvino]')")

from cnnkit.errors import DataError, DeviceError, ParityError  # noqa: E402
from cnnkit.runtime import backends  # noqa: E402
from cnnkit.runtime.infer import format_summary, infer  # noqa: E402
from cnnkit.runtime.openvino import OpenVINOSession, create_openvino_session  # noqa: E402
from cnnkit.runtime.predictor import Predictor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cnnkit cache per test: no verdict recorded yet."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CNNKIT_CACHE", str(folder))
    return folder


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _run(folder: str, model: str, out: str, backend: str):
    return infer(folder, model, device="cpu", output=out, workers=0, progress=False, backend=backend)


def test_both_backends_write_the_same_csv(onnx_model_factory, tiny_tree, tmp_path, cache):
    model, folder = onnx_model_factory(), f"{tiny_tree}/testing"
    ort = _run(folder, model, str(tmp_path / "ort.csv"), "onnxruntime")
    ov = _run(folder, model, str(tmp_path / "ov.csv"), "openvino")
    a, b = _rows(ort.output), _rows(ov.output)
    assert a[0] == b[0] and len(a) == len(b) == 61
    assert [r[:2] + r[3:] for r in a] == [r[:2] + r[3:] for r in b]  # path, label, true label
    assert max(abs(float(x[2]) - float(y[2])) for x, y in zip(a[1:], b[1:], strict=True)) < 1e-4
    d = ov.to_dict()
    assert d["backend"] == "openvino" and d["provider"] == "OpenVINO CPU"
    assert d["backend_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert d["backend_parity"]["passed"] and d["backend_parity"]["file_precision"] == "fp32"
    assert ort.to_dict()["backend"] == "onnxruntime" and ort.to_dict()["backend_parity"] is None
    assert "backend   openvino (precision f32" in format_summary(ov)


def test_parity_is_recorded_once_and_reused(onnx_model_factory, tiny_tree, tmp_path, cache, monkeypatch):
    measured = []
    real = backends._measure
    monkeypatch.setattr(backends, "_measure", lambda *a: measured.append(1) or real(*a))
    model, folder = onnx_model_factory(), f"{tiny_tree}/testing"
    first = _run(folder, model, str(tmp_path / "1.csv"), "openvino").backend_parity
    second = _run(folder, model, str(tmp_path / "2.csv"), "openvino").backend_parity
    assert measured == [1]
    assert first["cached"] is False and second["cached"] is True
    assert first["n_images"] == 60 and first["max_abs_diff"] <= 1e-4 and first["argmax_agreement"] == 1.0
    files = os.listdir(cache / "backend-parity")
    assert len(files) == 1 and first["model_sha256"] in files[0]
    # another model file is another verdict
    _run(folder, onnx_model_factory(1), str(tmp_path / "3.csv"), "openvino")
    assert measured == [1, 1] and len(os.listdir(cache / "backend-parity")) == 2


def test_a_disagreeing_backend_is_refused_with_exit_3(onnx_model_factory, tiny_tree, tmp_path, cache, monkeypatch):
    model, folder, out = onnx_model_factory(), f"{tiny_tree}/testing", tmp_path / "p.csv"
    real_run = OpenVINOSession.run
    monkeypatch.setattr(OpenVINOSession, "run", lambda self, batch: real_run(self, batch) + np.float32(1e-3))
    with pytest.raises(ParityError, match=r"max \|diff\| 0\.001.*allowed 0\.0001") as e:
        _run(folder, model, str(out), "openvino")
    assert e.value.exit_code == 3 and not out.exists()
    monkeypatch.setattr(OpenVINOSession, "run", real_run)  # the recorded verdict still refuses
    with pytest.raises(ParityError, match="does not agree"):
        _run(folder, model, str(out), "openvino")
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "cnnkit", "infer", folder, "--model", model, "--output", str(out)]
    proc = subprocess.run([*cmd, "--backend", "openvino"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3 and "does not agree" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_int8_tier_gates_on_agreement_not_diff(onnx_model_factory, tiny_tree, cache, monkeypatch):
    session = create_openvino_session(onnx_model_factory(), device="cpu", threads=1)
    session.precision = "int8"
    real_run = OpenVINOSession.run
    monkeypatch.setattr(OpenVINOSession, "run", lambda self, batch: real_run(self, batch) + np.float32(0.05))
    from cnnkit.batches import load_images

    images = load_images(f"{tiny_tree}/testing", session.meta).images
    verdict = backends.check_backend_parity(session, images)
    assert verdict["passed"] and verdict["tolerance"] is None and verdict["max_abs_diff"] > 0.04


def test_predictor_backend(onnx_model_factory, tiny_tree, cache):
    from cnnkit.listing import list_pngs

    folder = f"{tiny_tree}/testing"
    paths = [os.path.join(folder, p) for p in list_pngs(folder).files]
    with (
        Predictor(onnx_model_factory(), device="cpu", workers=0) as ort,
        Predictor(onnx_model_factory(), device="cpu", workers=0, backend="openvino") as ov,
    ):
        a, b = ort.predict(paths), ov.predict(paths)
        assert ov.backend == "openvino" and ov.provider == "OpenVINO CPU" and ort.backend_parity is None
        assert ov.backend_parity["passed"] and ov.backend_parity["n_images"] == len(paths)
    assert [p.label for p in a] == [p.label for p in b]
    assert np.allclose([p.probabilities for p in a], [p.probabilities for p in b], atol=1e-4)


def test_clear_errors(onnx_model_factory, monkeypatch):
    with pytest.raises(DataError, match="unknown backend 'tensorrt'"):
        backends.create_session(onnx_model_factory(), backend="tensorrt")
    with pytest.raises(DeviceError, match="CPU only"):
        backends.create_session(onnx_model_factory(), device="cuda", backend="openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(DeviceError, match=r"pip install 'cnnkit\[openvino\]'"):
        backends.create_session(onnx_model_factory(), device="cpu", backend="openvino")


def test_openvino_backend_imports_no_torch(onnx_model_factory, tiny_tree, tmp_path):
    code = f"""
import sys
from cnnkit.cli import main
sys.argv = ["cnnkit", "infer", {tiny_tree + "/testing"!r}, "--model", {onnx_model_factory()!r},
            "--output", {str(tmp_path / "p.csv")!r}, "--backend", "openvino", "--json"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript"))
print("HEAVY", heavy, file=sys.stderr)
"""
    env = dict(os.environ, PYTHONPATH=ROOT, CNNKIT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["backend_parity"]["passed"] is True


def test_bench_plans_an_openvino_row_per_onnx_file_on_the_cpu(monkeypatch):
    from cnnkit import bench

    found = {"eager": "best.pt", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "onnx-fp16": "model.fp16.onnx"}
    plan = bench._plan(found, ["cpu"], ["cpu"], "cuda", [])
    assert [(k, d, b) for k, _, d, b in plan] == [
        ("eager", "cpu", "torch"),
        ("onnx", "cpu", "onnxruntime"),
        ("onnx", "cpu", "openvino"),
        ("onnx-int8", "cpu", "onnxruntime"),
        ("onnx-int8", "cpu", "openvino"),
    ]
    monkeypatch.setattr(bench, "_have_openvino", lambda: False)
    assert all(b != "openvino" for *_, b in bench._plan(found, ["cpu"], ["cpu"], "cuda", []))


def test_a_verdict_covers_the_weights_kept_beside_the_model(onnx_model_factory, tmp_path) -> None:
    """The verdict's key hashes the external weights too: new weights beside the same .onnx bytes are
    checked again, not run on the old verdict."""
    import onnx
    from onnx import numpy_helper

    from cnnkit.runtime.backends import model_sha256

    source = onnx_model_factory()
    for name, scale in (("a", 1), ("b", 2)):
        proto = onnx.load(source)
        init = proto.graph.initializer[0]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, init.name))
        (tmp_path / name).mkdir()
        onnx.save_model(
            proto, str(tmp_path / name / "m.onnx"), save_as_external_data=True, size_threshold=0, location="m.data"
        )
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    assert a.read_bytes() == b.read_bytes()  # the same .onnx bytes, other weights beside them
    assert model_sha256(str(a)) != model_sha256(str(b))


def test_a_fixed_batch_file_runs_padded_on_openvino(onnx_model_factory, tiny_tree, tmp_path, cache):
    """`cnnkit export --batch N` files have a static batch axis: OpenVINO runs them in padded chunks, as
    onnxruntime does, with the dynamic file's answers."""
    import onnx

    proto = onnx.load(onnx_model_factory())
    for value in (*proto.graph.input, *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 4
    fixed = str(tmp_path / "model.b4.onnx")
    onnx.save(proto, fixed)
    folder = f"{tiny_tree}/testing"
    dynamic = _rows(_run(folder, onnx_model_factory(), str(tmp_path / "d.csv"), "onnxruntime").output)
    padded = _rows(_run(folder, fixed, str(tmp_path / "f.csv"), "openvino").output)
    assert len(padded) == 61 and [r[1] for r in padded] == [r[1] for r in dynamic]
