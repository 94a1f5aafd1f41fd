"""The right precision for this CPU: ISA flags and classes (`cnnkit.cpu`), the INT8 speed record export
writes (`cnnkit.meta.int8_speed`), and `cnnkit infer --model RUN_DIR --precision` choosing a run's file."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

import cnnkit.cpu as cpu
from cnnkit.errors import ModelError
from cnnkit.meta import check_speed

X86_VNNI = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512vl
processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse
"""
X86_AVX2 = "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_AMX = (
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni\n"
)
X86_AVX_VNNI = "model name\t: 12th Gen Intel(R) Core(TM) i7-12700\nflags\t\t: avx2 avx_vnni\n"
ARM_DOTPROD = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""
ARM_I8MM = "Features\t: fp asimd asimddp sve i8mm bf16 sve2\n"
ARM_PLAIN = "Features\t: fp asimd evtstrm crc32 cpuid\n"
MACOS_M1 = """machdep.cpu.brand_string: Apple M2
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_SVE: 0
"""


@pytest.mark.parametrize(
    ("text", "klass"),
    [
        (X86_VNNI, "avx512-vnni"),
        (X86_AVX2, "avx2"),
        (X86_AMX, "amx"),
        (X86_AVX_VNNI, "avx-vnni"),
        (ARM_DOTPROD, "arm-dotprod"),
        (ARM_I8MM, "arm-i8mm"),
        (ARM_PLAIN, "none"),
    ],
)
def test_isa_class_from_proc_cpuinfo(text: str, klass: str) -> None:
    assert cpu.isa_class_of(cpu.parse_cpuinfo(text)) == klass


def test_features_and_model_name_are_read_from_the_first_cpu() -> None:
    info = cpu.parse_cpuinfo(X86_VNNI)
    assert info.model == "AMD EPYC 9R14 96-Core Processor" and info.source == "/proc/cpuinfo"
    f = info.features()
    assert f["avx512_vnni"] and f["avx512_bf16"] and f["avx2"] and not f["amx_int8"] and not f["asimddp"]
    amx = cpu.parse_cpuinfo(X86_AMX).features()
    assert amx["amx_tile"] and amx["amx_int8"] and amx["amx_bf16"] and amx["avx_vnni"]
    arm = cpu.parse_cpuinfo(ARM_I8MM).features()
    assert arm["asimddp"] and arm["i8mm"] and arm["bf16"] and arm["sve"] and not arm["avx2"]


def test_macos_sysctl_and_unknown() -> None:
    mac = cpu.parse_sysctl(MACOS_M1)
    assert mac.model == "Apple M2" and cpu.isa_class_of(mac) == "arm-i8mm" and not mac.features()["sve"]
    nothing = cpu.CpuInfo("x", frozenset(), "none")
    assert cpu.isa_class_of(nothing) == "unknown" and set(nothing.features().values()) == {None}
    assert cpu.isa_class() in cpu.ISA_CLASSES


GOOD = {"int8_speedup": 1.5, "isa_class": "avx512-vnni", "cpu": "AMD EPYC", "threads": 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"int8_speedup": math.nan},
        {"int8_speedup": True},
        {"int8_speedup": 1e9},
        {"int8_speedup": 0},
        {"isa_class": "AVX<script>"},
        {"cpu": "x" * 500},
        {"threads": 0},
        {"threads": "1"},
    ],
)
def test_speed_record_is_bounded(bad: dict) -> None:
    assert check_speed(GOOD) == GOOD
    with pytest.raises(ModelError, match="malformed int8 speed record"):
        check_speed({**GOOD, **bad})


# --------------------------------------------------------------------------------------------
# export and infer on a small trained model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tree):
    """A run folder with model.onnx and model.int8.onnx, exported on a CPU said to be avx512-vnni."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from cnnkit.export import export
    from cnnkit.trainer.loop import TrainConfig, train

    out = str(tmp_path_factory.mktemp("prec") / "run")
    result = train(TrainConfig(data=tiny_tree, out=out, epochs=6, batch_size=32, workers=0))
    mp = pytest.MonkeyPatch()
    mp.setattr(cpu, "isa_class", lambda: "avx512-vnni")
    try:
        export(result.checkpoint, exporter="torchscript", n_images=32)
        int8 = export(result.checkpoint, quantize="int8", exporter="torchscript", n_images=32, max_accuracy_drop=5)
    finally:
        mp.undo()
    return out, int8


def test_export_records_the_speedup_and_isa_class(run_dir) -> None:
    from cnnkit.meta import int8_speed
    from cnnkit.runtime.session import read_meta

    folder, result = run_dir
    meta = read_meta(os.path.join(folder, "model.int8.onnx"))
    speed = int8_speed(meta)
    assert speed == result.int8_speed and speed["isa_class"] == "avx512-vnni" and speed["threads"] == 1
    assert speed["int8_speedup"] == result.accuracy["speedup"] > 0 and speed["cpu"] == cpu.cpu_info().model
    assert result.accuracy["isa_class"] == "avx512-vnni"
    assert meta.extra["export"]["quantization"]["accuracy_gate"]["passed"] is True
    report = json.load(open(result.report_path))
    assert report["int8_speed"] == speed


def _run_with_speed(src: str, dst: str, speedup: float, isa: str = "avx512-vnni") -> str:
    """A copy of run `src` whose INT8 file records `speedup` measured on `isa`."""
    import onnx

    from cnnkit.export.onnx import read_record, write_record

    os.makedirs(dst)
    for name in ("model.onnx", "model.int8.onnx"):
        shutil.copy(os.path.join(src, name), dst)
    path = os.path.join(dst, "model.int8.onnx")
    proto = onnx.load(path)
    record = read_record(proto)
    export_info = record.extra["export"]
    speed = {**export_info["quantization"]["speed"], "int8_speedup": speedup, "isa_class": isa}
    quantization = {**export_info["quantization"], "speed": speed}
    extra = {**record.extra, "export": {**export_info, "quantization": quantization}}
    write_record(proto, record.replace(extra=extra))
    onnx.save(proto, path)
    return dst


def _infer(tiny_tree: str, run: str, *flags: str) -> tuple[int, dict, str]:
    from typer.testing import CliRunner

    from cnnkit.cli import app

    args = ["infer", os.path.join(tiny_tree, "testing"), "--model", run, "--workers", "0", "--json", *flags]
    res = CliRunner().invoke(app, args)
    return res.exit_code, json.loads(res.stdout) if res.exit_code == 0 else {}, res.stderr


@pytest.mark.parametrize(
    ("speedup", "isa", "here", "picked"),
    [
        (1.5, "avx512-vnni", "avx512-vnni", "int8"),
        (0.9, "avx512-vnni", "avx512-vnni", "fp32"),
        (1.5, "avx512-vnni", "avx2", "fp32"),
        (1.5, "unknown", "unknown", "fp32"),
    ],
)
def test_auto_picks_int8_only_when_faster_on_this_isa_class(
    run_dir, tiny_tree, tmp_path, monkeypatch, speedup, isa, here, picked
) -> None:
    run = _run_with_speed(run_dir[0], str(tmp_path / "run"), speedup, isa)
    monkeypatch.setattr(cpu, "isa_class", lambda: here)
    code, out, err = _infer(tiny_tree, run, "--precision", "auto")
    assert code == 0, err
    assert out["precision"] == picked and out["model"] == os.path.join(
        run, f"model{'.int8' if picked == 'int8' else ''}.onnx"
    )
    assert f"precision {picked}" in err and out["precision_reason"] in err
    if picked == "int8":
        assert "1.50x" in out["precision_reason"]
    elif here != isa or here == "unknown":
        assert "not trusted here" in out["precision_reason"]
    else:
        assert "not faster" in out["precision_reason"]


def test_model_run_dir_without_precision_is_auto(run_dir, tiny_tree, tmp_path, monkeypatch) -> None:
    run = _run_with_speed(run_dir[0], str(tmp_path / "run"), 2.0)
    monkeypatch.setattr(cpu, "isa_class", lambda: "avx512-vnni")
    code, out, err = _infer(tiny_tree, run)
    assert code == 0, err
    assert out["precision"] == "int8" and out["accuracy"] > 0.5
    code, out, err = _infer(tiny_tree, run, "--precision", "fp32")
    assert code == 0 and out["precision"] == "fp32" and out["precision_reason"] == "asked for (--precision)"
    assert out["output"] == os.path.join(run, "predictions.csv")


def test_explicit_precision_without_its_file_is_a_one_line_error(run_dir, tiny_tree, tmp_path) -> None:
    run = str(tmp_path / "run")
    os.makedirs(run)
    shutil.copy(os.path.join(run_dir[0], "model.onnx"), run)
    code, _, err = _infer(tiny_tree, run, "--precision", "int8")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no " + os.path.join(run, "model.int8.onnx") in err and "--quantize int8" in err
    code, _, err = _infer(tiny_tree, os.path.join(run, "model.onnx"), "--precision", "int8")
    assert code == 2 and "one file" in err and len(err.strip().splitlines()) == 1
    code, _, err = _infer(tiny_tree, run, "--precision", "bf16")
    assert code == 2 and "unknown precision" in err


def test_model_file_form_is_unchanged(run_dir, tiny_tree) -> None:
    code, out, err = _infer(tiny_tree, os.path.join(run_dir[0], "model.int8.onnx"))
    assert code == 0, err
    assert out["precision"] == "int8" and out["precision_reason"] == "--model names one file"
    assert "infer: precision" not in err


def test_predictor_takes_a_run_folder(run_dir, tiny_tree, tmp_path, monkeypatch) -> None:
    from cnnkit.runtime.predictor import Predictor

    run = _run_with_speed(run_dir[0], str(tmp_path / "run"), 0.8)
    monkeypatch.setattr(cpu, "isa_class", lambda: "avx512-vnni")
    with Predictor(run, precision="auto", workers=0) as p:
        assert p.precision == "fp32" and p.model.endswith("model.onnx") and "not faster" in p.precision_reason
    with Predictor(run, precision="int8", workers=0) as p:
        assert p.precision == "int8" and p.model.endswith("model.int8.onnx")


def test_auto_on_cuda_takes_only_the_runs_own_fp16_file(run_dir, tmp_path) -> None:
    """A `model.fp16.onnx` that is a symlink, or whose record is not an fp16 export, is not picked."""
    import shutil

    from cnnkit.runtime.precision import choose

    src, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(src, run)
    fp16 = run / "model.fp16.onnx"
    shutil.copy(run / "model.onnx", fp16)  # an fp32 file under the fp16 name
    assert choose(str(run), "auto", cuda=True).precision != "fp16"
    fp16.unlink()
    fp16.symlink_to(run / "model.onnx")
    assert choose(str(run), "auto", cuda=True).precision != "fp16"
    (run / "model.int8.onnx").rename(tmp_path / "int8.onnx")
    (run / "model.int8.onnx").symlink_to(tmp_path / "int8.onnx")  # the run's own INT8 file only
    assert choose(str(run), "auto").precision == "fp32"
