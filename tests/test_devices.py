"""The GPU paths' invariants, checked without a GPU: device names, the AMP dtype, provider options,
and where a resumed optimizer's state lives."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from cnnkit.devices import DeviceSpec, amp_dtype, parse_device
from cnnkit.errors import DeviceError


@pytest.mark.parametrize(
    "text, spec",
    [
        ("auto", DeviceSpec("auto")),
        ("cpu", DeviceSpec("cpu")),
        ("cuda", DeviceSpec("cuda")),
        ("cuda:0", DeviceSpec("cuda", 0)),
        ("CUDA:3", DeviceSpec("cuda", 3)),
        (" cuda:12 ", DeviceSpec("cuda", 12)),
    ],
)
def test_device_names_parse_in_one_place(text, spec):
    assert parse_device(text) == spec
    assert parse_device(str(spec)) == spec  # round trip
    assert parse_device(spec) is spec


@pytest.mark.parametrize("text", ["nvidia", "cpu:1", "auto:0", "cuda:", "cuda:-1", "cuda:x", "", "cuda 1"])
def test_bad_device_names_are_one_clear_error(text):
    with pytest.raises(DeviceError, match="unknown device") as e:
        parse_device(text)
    assert "\n" not in str(e.value) and "cuda:N" in str(e.value)


@pytest.mark.parametrize(
    "capability, native, dtype",
    [
        ((7, 0), False, "float16"),  # V100
        ((7, 5), True, "float16"),  # T4: torch emulates bf16 there; a native check says False, and 7.5 < 8.0 anyway
        ((7, 5), False, "float16"),
        ((8, 0), True, "bfloat16"),  # A100
        ((8, 6), True, "bfloat16"),  # RTX 30xx
        ((9, 0), True, "bfloat16"),  # H100 / H200
        ((8, 0), False, "float16"),  # whatever the capability, no native bf16 means fp16 + GradScaler
    ],
)
def test_amp_dtype_is_bf16_only_where_native(capability, native, dtype):
    assert amp_dtype(capability, native) == dtype


def _fake_ort(*providers: str) -> SimpleNamespace:
    return SimpleNamespace(get_available_providers=lambda: list(providers), __version__="0.0-test")


def test_cuda_n_reaches_the_provider_options():
    pytest.importorskip("numpy")
    from cnnkit.runtime.session import CPU, CUDA, provider_list

    gpu = _fake_ort(CUDA, CPU)
    assert provider_list("cuda:1", gpu)[0] == (CUDA, {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"})
    assert provider_list("cuda", gpu)[0][1]["device_id"] == 0
    assert provider_list("auto", gpu)[0][1]["device_id"] == 0
    assert provider_list("cpu", gpu) == [CPU]
    assert provider_list("auto", _fake_ort(CPU)) == [CPU]
    with pytest.raises(DeviceError, match="device cuda:2: no CUDA provider"):
        provider_list("cuda:2", _fake_ort(CPU))


def test_fp16_gate_runner_asks_for_the_gpu_it_was_given(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from cnnkit.export import parity

    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options, providers):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_inputs(self):
            return [SimpleNamespace(name="images", shape=["batch", 1, 28, 28])]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    parity.onnx_runner("model.onnx", "cuda:3")
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"use_tf32": 0, "device_id": 3})


def test_a_resumed_optimizer_lives_with_its_parameters(tmp_path, tiny_tree):
    """The GPU resume bug, on the meta device: build the model on its device first, then the optimizer,
    then load the optimizer's state. Every moment tensor must end up on its parameter's device and
    dtype (with the model moved after the optimizer, they would stay on the CPU)."""
    torch = pytest.importorskip("torch")
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.runs import CHECKPOINT_NAME
    from cnnkit.trainer.loop import TrainConfig, build_for_training, train

    run = train(TrainConfig(data=tiny_tree, epochs=1, batch_size=64, workers=0, runs_dir=os.fspath(tmp_path)))
    state = load_checkpoint(os.path.join(run.run_dir, CHECKPOINT_NAME))
    cfg = TrainConfig(arch="small", lr=1e-3)
    meta = torch.device("meta")
    net, opt, _ = build_for_training(cfg, 3, (1, 28, 28), meta, state)
    params = list(net.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    moments = 0
    for p in params:
        for key, value in opt.state[p].items():
            if key == "step" and not opt.param_groups[0]["fused"]:
                continue  # torch keeps an unfused Adam's step counter on the CPU by design
            assert value.device == p.device and value.dtype == p.dtype, (key, value.device, value.dtype)
            moments += key != "step"
    assert moments == 2 * len(params)  # exp_avg and exp_avg_sq of every parameter were restored


def test_train_rejects_a_gpu_this_machine_does_not_have(tmp_path, tiny_tree):
    torch = pytest.importorskip("torch")
    from cnnkit.trainer.loop import TrainConfig, train

    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"cuda:{n + 1}" if n else "torch sees no CUDA device"):
        train(TrainConfig(data=tiny_tree, epochs=1, workers=0, device=f"cuda:{n + 1}", runs_dir=os.fspath(tmp_path)))
    assert not os.path.exists(tmp_path / "latest")


@pytest.mark.slow
def test_gpu_check_script_runs_its_cpu_rows_here(tmp_path, tiny_tree):
    """scripts/gpu_check.py on this machine: every CPU row passes; without CUDA it says so and exits 0;
    with CUDA every GPU row must pass too (the script exits 1 on any failed row)."""
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.py")
    rows = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            script,
            tiny_tree,
            "--work",
            str(tmp_path / "w"),
            "--epochs",
            "1",
            "--min-accuracy",
            "0",
            "--json",
            str(rows),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    got = json.loads(rows.read_text())
    assert [r["check"] for r in got][:4] == ["doctor", "train cpu", "export onnx cpu", "infer cpu"]
    assert all(r["passed"] is not False for r in got)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert len(got) == 4 and "GPU rows skipped" in proc.stdout


def test_export_device_is_for_the_fp16_gate_only(tmp_path, tiny_tree):
    pytest.importorskip("torch")
    from cnnkit.export import export
    from cnnkit.trainer.loop import TrainConfig, train

    run = train(TrainConfig(data=tiny_tree, epochs=1, workers=0, runs_dir=os.fspath(tmp_path)))
    out = tmp_path / "m.onnx"
    with pytest.raises(DeviceError, match="only the --half gate runs on a GPU"):
        export(run.checkpoint, out=os.fspath(out), device="cuda:0")
    assert not out.exists()
