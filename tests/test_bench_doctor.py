"""`cnnkit bench` over a run with every artifact kind, and `cnnkit doctor` (real and simulated installs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import cnnkit.doctor as doctor_mod  # noqa: E402
from cnnkit.bench import ARTIFACTS, TABLE_HEADERS, bench, format_table  # noqa: E402
from cnnkit.checkpoint import save_checkpoint  # noqa: E402
from cnnkit.cli import app  # noqa: E402
from cnnkit.errors import DeviceError  # noqa: E402
from cnnkit.export import ARTIFACT_NAMES, export  # noqa: E402
from cnnkit.meta import ModelMeta  # noqa: E402
from cnnkit.models import build_model  # noqa: E402

runner = CliRunner()
KINDS = ["eager", "onnx", "onnx-int8", "torchscript", "pt2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tree) -> str:
    """A run folder with best.pt (random init: bench needs no accuracy) and onnx, int8, ts, pt2 files."""
    folder = str(tmp_path_factory.mktemp("bench") / "run")
    torch.manual_seed(0)
    model, output = build_model("small", 3, 28, 28)
    meta = ModelMeta(
        arch="small",
        classes=("0", "1", "2"),
        input_shape=(1, 28, 28),
        output=output,
        extra={
            "data": {
                "root": tiny_tree,
                "train": os.path.join(tiny_tree, "training"),
                "test": os.path.join(tiny_tree, "testing"),
            }
        },
    )
    os.makedirs(folder)
    ckpt = os.path.join(folder, "best.pt")
    save_checkpoint(ckpt, {"meta": meta.to_dict(), "model": model.state_dict(), "epoch": 1})
    export(ckpt, exporter="torchscript", n_images=8)
    # a random model's accuracy is chance: the INT8 gate is tested in test_quantize.py, not here
    export(ckpt, quantize="int8", exporter="torchscript", n_images=8, max_accuracy_drop=100, calibration_size=32)
    export(ckpt, fmt="torchscript", n_images=8)
    export(ckpt, fmt="pt2", n_images=8)
    return folder


def test_artifact_names_match_the_exporter() -> None:
    names = {kind: name for kind, name, _ in ARTIFACTS if kind != "eager"}
    assert names == ARTIFACT_NAMES


def test_bench_gives_one_row_per_artifact_and_device(run_dir, tiny_tree) -> None:
    result = bench(run=run_dir, limit=30)
    cpu = [r for r in result.rows if r.device == "cpu" and r.backend != "openvino"]
    assert [r.artifact for r in cpu] == KINDS
    assert result.n_images == 30 and result.labeled and result.threads == 1
    assert result.data == os.path.join(tiny_tree, "testing")
    for r in result.rows:
        assert r.error is None, r
        assert r.bytes == os.path.getsize(r.path) > 0
        assert 0 <= r.accuracy <= 1 and r.accuracy_change is not None
        assert r.max_abs_diff is not None and 0 <= r.argmax_agreement <= 1
        assert r.load_ms > 0 and r.cold_ms > 0 and r.p50_ms > 0 and r.images_per_second > 0
    rows = {r.artifact: r for r in cpu}
    assert rows["eager"].max_abs_diff == 0 and rows["eager"].accuracy_change == 0
    for kind in ("onnx", "torchscript", "pt2"):  # fp32 artifacts answer like the eager model
        assert rows[kind].max_abs_diff < 1e-4 and rows[kind].argmax_agreement == 1.0, kind
    assert rows["onnx-int8"].bytes < 0.6 * rows["onnx"].bytes
    assert rows["onnx"].runtime == "onnxruntime CPU" and rows["pt2"].runtime.startswith("torch")
    ov = {r.artifact: r for r in result.rows if r.backend == "openvino"}
    if ov:  # openvino installed: a CPU row for each ONNX file, at f32 (as close to eager as onnxruntime)
        assert sorted(ov) == ["onnx", "onnx-int8"] and ov["onnx"].runtime.endswith("CPU (f32)")
        assert ov["onnx"].max_abs_diff < 1e-4 and ov["onnx"].argmax_agreement == 1.0

    text = format_table(result)
    for header in TABLE_HEADERS:
        assert header in text
    assert len(text.splitlines()) >= 2 + len(result.rows)


def test_bench_cli_json_and_table(run_dir) -> None:
    res = runner.invoke(app, ["bench", "--run", run_dir, "--limit", "12", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert {"run_dir", "data", "n_images", "rows", "notes", "reference", "batch_size", "threads"} <= set(d)
    assert [r["artifact"] for r in d["rows"] if r["backend"] != "openvino"] == KINDS
    assert {
        "bytes",
        "accuracy",
        "accuracy_change",
        "max_abs_diff",
        "argmax_agreement",
        "cold_ms",
        "p50_ms",
        "images_per_second",
    } <= set(d["rows"][0])
    assert "artifact" in res.stderr and "img/s" in res.stderr


def test_bench_latency_and_cold_start_options(run_dir) -> None:
    args = ["bench", "--run", run_dir, "--limit", "6", "--device", "cpu", "--latency-calls", "12"]
    res = runner.invoke(app, [*args, "--throughput-batches", "2,4", "--cold-starts", "0", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["latency_calls"] == 12 and d["throughput_batches"] == [2, 4, 256] and d["cold_starts"] == 0
    for r in d["rows"]:
        assert r["latency_calls"] == 12 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["best_batch"] in (2, 4, 256) and r["cold_start_ms"] is None and r["peak_rss_mb"] is None
    for bad in ("0", "x,2"):
        res = runner.invoke(app, [*args, "--throughput-batches", bad])
        assert res.exit_code == 2 and "--throughput-batches" in res.stderr


def test_bench_skips_fp16_without_cuda_and_refuses_missing_cuda(run_dir, tmp_path) -> None:
    fp16 = os.path.join(run_dir, "model.fp16.onnx")
    with open(os.path.join(run_dir, "model.onnx"), "rb") as f:
        data = f.read()
    with open(fp16, "wb") as f:  # a stand-in: only whether it is benchmarked matters here
        f.write(data)
    try:
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() or torch.cuda.is_available()
        if not cuda:
            result = bench(run=run_dir, limit=6, device="cpu")
            assert "onnx-fp16" not in [r.artifact for r in result.rows]
            assert any("model.fp16.onnx: skipped" in n for n in result.notes)
            with pytest.raises(DeviceError, match="device cuda"):
                bench(run=run_dir, limit=6, device="cuda")
    finally:
        os.unlink(fp16)


@pytest.mark.gpu
def test_bench_on_cuda_compares_against_the_cpu_reference(run_dir) -> None:
    result = bench(run=run_dir, limit=30, device="cuda")
    assert result.rows and all(r.device == "cuda" for r in result.rows)
    assert {r.artifact for r in result.rows} >= {"eager", "onnx"}, result.notes  # torch and the CUDA provider
    for r in result.rows:  # every row ran: an error is a failure, never skipped
        assert r.error is None, f"{r.artifact} on {r.device}: {r.error}"
        tol = {"onnx-int8": 0.5, "onnx-fp16": 5e-2}.get(r.artifact, 1e-2)  # fp32: TF32 convs at most
        assert r.max_abs_diff is not None and r.max_abs_diff < tol, r
        assert r.images_per_second > 0 and r.argmax_agreement is not None


@pytest.fixture
def planted(run_dir, tmp_path, monkeypatch):
    """A copy of the run folder, and loaders that fail the test if bench ever calls them."""
    import shutil

    import cnnkit.export.pt2 as pt2_mod
    import cnnkit.export.torchscript as ts_mod

    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    calls: list[str] = []
    for mod, name in ((pt2_mod, "load_pt2"), (ts_mod, "load_torchscript")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda path, *a, _real=real, **k: (calls.append(path), _real(path, *a, **k))[1])
    return folder, calls


def test_bench_loads_code_bearing_files_only_when_cnnkit_wrote_them(planted) -> None:
    from cnnkit.provenance import MANIFEST_NAME

    folder, calls = planted
    result = bench(run=str(folder), limit=6, device="cpu")  # as exported: proven, loaded
    assert {"torchscript", "pt2"} <= {r.artifact for r in result.rows} and len(calls) == 2

    # A planted .pt2 (any bytes: here the TorchScript file's), a TorchScript file changed after
    # export, and a manifest entry forged without the key: none is loaded, each says why.
    (folder / "model.pt2").write_bytes((folder / "model.ts").read_bytes())
    with open(folder / "model.ts", "ab") as f:
        f.write(b"\0")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    calls.clear()
    result = bench(run=str(folder), limit=6, device="cpu")
    assert calls == [] and {r.artifact for r in result.rows} == {"eager", "onnx", "onnx-int8"}
    notes = " ".join(result.notes)
    assert "model.pt2: skipped, not loaded" in notes and "changed since `cnnkit export`" in notes
    assert "--trust-model" in notes

    import hashlib

    forged = hashlib.sha256((folder / "model.pt2").read_bytes()).hexdigest()
    manifest["files"]["model.pt2"] = {"sha256": forged, "bytes": 1, "hmac": "0" * 64}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = bench(run=str(folder), limit=6, device="cpu")
    assert calls == [] and "not made with this user's cnnkit key" in " ".join(result.notes)

    res = runner.invoke(app, ["bench", "--run", str(folder), "--limit", "6", "--device", "cpu", "--json"])
    assert res.exit_code == 0 and calls == [] and json.loads(res.stdout)["rows"]  # --json stays clean


def test_trust_model_loads_them_anyway(planted) -> None:
    folder, calls = planted
    (folder / "model.pt2").unlink()
    with open(folder / "model.ts", "ab") as f:
        f.write(b"\0")  # a zip tolerates trailing bytes: still a valid TorchScript file
    result = bench(run=str(folder), limit=6, device="cpu", trust_model=True)
    assert "torchscript" in [r.artifact for r in result.rows] and calls == [str(folder / "model.ts")]


def test_bench_runs_onnx_rows_without_torch(run_dir) -> None:
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from cnnkit.bench import bench\n"
        f"r = bench(run={run_dir!r}, limit=6, device='cpu')\n"
        "assert sys.modules.get('torch') is None and 'onnx' not in sys.modules\n"
        "print(json.dumps({'rows': [x.artifact for x in r.rows if x.backend != 'openvino'], 'notes': r.notes}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["rows"] == ["onnx", "onnx-int8"]
    assert any("torch is not installed" in n for n in d["notes"])


# --------------------------------------------------------------------------------------------
# doctor


def test_doctor_on_this_machine(monkeypatch) -> None:
    res = runner.invoke(app, ["doctor", "--json"])
    d = json.loads(res.stdout)
    assert res.exit_code == (0 if d["healthy"] else 1)
    assert {"healthy", "problems", "checks", "onnxruntime", "torch", "gpu"} <= set(d)
    for c in d["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"} and c["status"] in ("ok", "note", "problem")
        assert c["status"] != "problem" or c["fix"]
    assert "CPUExecutionProvider" in d["onnxruntime"]["working"]
    assert d["onnxruntime"]["distributions"] and d["onnxruntime"]["version"] == ort.__version__
    assert d["torch"]["cuda"] == torch.version.cuda  # read from torch/version.py without importing torch


def _fake(monkeypatch, dists, gpu=None, torch_info=None, providers=None, requires=()):
    monkeypatch.setattr(doctor_mod, "ort_distributions", lambda: dict(dists))
    monkeypatch.setattr(doctor_mod, "nvidia_smi", lambda: gpu)
    monkeypatch.setattr(doctor_mod, "torch_build", lambda: torch_info)
    monkeypatch.setattr(doctor_mod, "ort_requires", lambda name: list(requires))
    if providers is not None:
        monkeypatch.setattr(doctor_mod, "probe_providers", lambda: providers)


H100 = {"name": "NVIDIA H100 80GB HBM3", "driver": "580.65.06", "memory": "81559 MiB", "cuda": "13.0", "count": 1}
CPU_ONLY = {
    "version": "1.32.0",
    "available": ["CPUExecutionProvider"],
    "working": ["CPUExecutionProvider"],
    "errors": {},
}


def test_doctor_detects_both_onnxruntime_packages(monkeypatch) -> None:
    _fake(
        monkeypatch,
        {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"},
        gpu=H100,
        torch_info={"version": "2.14.1", "cuda": "13.0"},
        providers=CPU_ONLY,
    )
    report = doctor_mod.doctor()
    assert not report.healthy
    both = [c for c in report.checks if c.name == "onnxruntime distribution"][0]
    assert both.status == "problem" and "installed together" in both.detail
    assert both.fix == "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'cnnkit[gpu]'"

    res = runner.invoke(app, ["doctor"])
    assert res.exit_code == 1
    assert "PROBLEM onnxruntime distribution" in res.stderr
    assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'cnnkit[gpu]'" in res.stderr


def test_doctor_flags_cuda_major_mismatch_and_a_provider_that_does_not_load(monkeypatch) -> None:
    providers = {
        "version": "1.26.0",
        "available": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "working": ["CPUExecutionProvider"],
        "errors": {"CUDAExecutionProvider": "session fell back to CPUExecutionProvider"},
    }
    _fake(
        monkeypatch,
        {"onnxruntime-gpu": "1.26.0"},
        gpu=H100,
        torch_info={"version": "2.14.1", "cuda": "13.0"},
        providers=providers,
    )
    report = doctor_mod.doctor()
    by_name = {c.name: c for c in report.checks}
    assert not report.healthy
    assert by_name["CUDA major"].status == "problem" and "needs CUDA 12" in by_name["CUDA major"].detail
    assert by_name["CUDA major"].fix.startswith("pip install -U 'onnxruntime-gpu>=1.27'")
    assert by_name["CUDA provider"].status == "problem" and "silently run on the CPU" in by_name["CUDA provider"].detail
    assert "onnxruntime-gpu[cuda,cudnn]" in by_name["CUDA provider"].fix


def test_doctor_healthy_gpu_install_and_old_driver(monkeypatch) -> None:
    providers = {
        "version": "1.31.1",
        "available": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "working": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "errors": {},
    }
    requires = ['nvidia-cuda-runtime~=13.0; extra == "cuda"', 'nvidia-cudnn-cu13~=9.0; extra == "cudnn"']
    _fake(
        monkeypatch,
        {"onnxruntime-gpu": "1.31.1"},
        gpu=H100,
        torch_info={"version": "2.14.1", "cuda": "13.0"},
        providers=providers,
        requires=requires,
    )
    report = doctor_mod.doctor()
    assert report.healthy, doctor_mod.format_report(report)
    assert runner.invoke(app, ["doctor"]).exit_code == 0

    _fake(
        monkeypatch,
        {"onnxruntime-gpu": "1.31.1"},
        gpu={**H100, "driver": "550.54", "cuda": "12.4"},
        torch_info={"version": "2.14.1", "cuda": "13.0"},
        providers=providers,
        requires=requires,
    )
    report = doctor_mod.doctor()
    driver = [c for c in report.checks if c.name == "GPU driver"][0]
    assert driver.status == "problem" and "580" in driver.fix


def test_doctor_without_torch_or_onnxruntime(monkeypatch) -> None:
    _fake(monkeypatch, {}, gpu=None, torch_info=None)
    report = doctor_mod.doctor()
    by_name = {c.name: c for c in report.checks}
    assert by_name["torch"].status == "note" and "not installed" in by_name["torch"].detail
    assert by_name["onnxruntime distribution"].status == "problem"
    assert by_name["onnxruntime distribution"].fix == "pip install 'cnnkit[cpu]'"


def test_ort_gpu_cuda_major_rule() -> None:
    rule = doctor_mod.ort_gpu_cuda_major
    assert rule("1.31.1", ['nvidia-cuda-runtime~=13.0; extra == "cuda"']) == 13
    assert rule("1.22.0", ['nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"']) == 12
    assert rule("1.27.0", []) == 13 and rule("1.26.2", []) == 12 and rule("1.9.0", []) == 12


def test_doctor_is_torch_free() -> None:
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from cnnkit.doctor import doctor\n"
        "r = doctor()\n"
        "assert sys.modules.get('torch') is None and 'onnx' not in sys.modules\n"
        "print(json.dumps(r.to_dict()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert "CPUExecutionProvider" in d["onnxruntime"]["working"]
