"""cnnkit.export: ONNX / TorchScript export behind the parity gate, on tiny random-init checkpoints."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cnnkit.export.onnx as onnx_export  # noqa: E402
import cnnkit.export.parity as parity_mod  # noqa: E402
from cnnkit.checkpoint import save_checkpoint  # noqa: E402
from cnnkit.errors import DataError, ModelError, ParityError  # noqa: E402
from cnnkit.export import ExportResult, export, sample_images  # noqa: E402
from cnnkit.export.parity import run_parity  # noqa: E402
from cnnkit.export.torchscript import load_torchscript  # noqa: E402
from cnnkit.meta import METADATA_KEY, ModelMeta  # noqa: E402
from cnnkit.models import build_model  # noqa: E402
from cnnkit.provenance import MANIFEST_NAME  # noqa: E402

CLASSES3 = ("ant", "bee", "cat")
CONTRACT_KEYS = {"format", "path", "exporter", "parity", "report_path", "seconds", "opset"}
PARITY_KEYS = {"n_images", "max_abs_diff", "mean_abs_diff", "argmax_agreement", "passed", "tolerance"}
PARITY_KEYS |= {"batch_sizes", "per_batch_size"}


# --------------------------------------------------------------------------------------------
# Fixtures: a PNG tree (3 classes x 10 images of 28 x 28) and checkpoints pointing at it


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES3):
        folder = root / "testing" / name
        folder.mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 256, (28, 28)).astype(np.uint8) // (k + 1)  # a brightness per class
            Image.fromarray(img, mode="L").save(folder / f"{i:02d}.png")
    return str(root)


def make_checkpoint(folder: str, arch: str, n_classes: int, data_root: str, state_from: str | None = None) -> str:
    """A random-init checkpoint; `state_from` saves another arch's weights (a mismatch)."""
    torch.manual_seed(0)
    model, output = build_model(arch, n_classes, 28, 28)
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    classes = CLASSES3[:n_classes] if n_classes <= 3 else tuple(f"c{i}" for i in range(n_classes))
    meta = ModelMeta(
        arch=arch,
        classes=classes,
        input_shape=(1, 28, 28),
        output=output,
        versions={"cnnkit": "test", "torch": str(torch.__version__)},
        extra={
            "data": {
                "root": data_root,
                "train": os.path.join(data_root, "training"),
                "test": os.path.join(data_root, "testing"),
            }
        },
    )
    state = model.state_dict()
    if state_from is not None:
        state = build_model(state_from, n_classes, 28, 28)[0].state_dict()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "best.pt")
    save_checkpoint(path, {"meta": meta.to_dict(), "model": state, "epoch": 1})
    return path


ARCHS = {"lecture": 2, "small": 10}


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory: pytest.TempPathFactory, data_root: str) -> dict[str, tuple[ExportResult, str]]:
    """One default (dynamo) ONNX export per arch, shared by the tests below; stdout captured."""
    results = {}
    for arch, k in ARCHS.items():
        ckpt = make_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, k, data_root)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            results[arch] = (export(ckpt), out.getvalue())
    return results


def eager(ckpt: str):
    from cnnkit.checkpoint import model_from_checkpoint

    return model_from_checkpoint(ckpt)[0]


# --------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.parametrize("arch", list(ARCHS))
def test_onnx_export_passes_parity_and_reports(onnx_exports, arch: str) -> None:
    result, stdout = onnx_exports[arch]
    assert stdout == ""  # stdout belongs to the CLI's --json
    folder = os.path.dirname(result.checkpoint)
    assert result.path == os.path.join(folder, "model.onnx")
    assert sorted(os.listdir(folder)) == ["best.pt", MANIFEST_NAME, "model.onnx", "model.onnx.parity.json"]  # no temps
    assert result.exporter == "dynamo" and result.opset == onnx_export.DEFAULT_OPSET

    p = result.parity
    assert p.passed and p.argmax_agreement == 1.0 and p.max_abs_diff <= 1e-4
    # The 2-class model is checked on its own two class folders only (20 images); the 10-class one,
    # whose class names match no folder, on all 30.
    n = 20 if arch == "lecture" else 30
    assert p.n_images == n and p.batch_sizes == [1, 2, 7, n]
    assert [d["batch_size"] for d in p.per_batch_size] == [1, 2, 7, n]

    d = result.to_dict()
    assert CONTRACT_KEYS <= set(d) and PARITY_KEYS <= set(d["parity"])
    json.dumps(d)  # plain data
    with open(result.report_path) as f:
        report = json.load(f)
    assert report["report_path"] == result.path + ".parity.json"
    assert report["parity"]["passed"] is True
    assert report["parity"]["max_abs_diff"] == p.max_abs_diff
    assert report["parity"]["n_images"] == n
    assert report["meta"]["arch"] == arch


@pytest.mark.parametrize("arch", list(ARCHS))
def test_onnx_batch_axis_is_dynamic_and_metadata_round_trips(onnx_exports, arch: str) -> None:
    result, _ = onnx_exports[arch]
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("images", "tensor(uint8)", "output")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28]
    model = eager(result.checkpoint)
    width = 1 if arch == "lecture" else ARCHS[arch]
    rng = np.random.default_rng(1)
    for n in (1, 3, 64):
        x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
        got = session.run(None, {"images": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, width)
        np.testing.assert_allclose(got, want, atol=1e-5)

    meta = ModelMeta.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta.arch == arch and meta.input_shape == (1, 28, 28)
    assert meta.output == ("sigmoid" if arch == "lecture" else "logits")
    assert meta.extra["data"]["test"].endswith("testing")
    exp = meta.extra["export"]
    assert exp["format"] == "onnx" and exp["exporter"] == "dynamo" and exp["opset"] == result.opset
    assert exp["ir_version"] == onnx.load(result.path).ir_version and exp["torch"] == torch.__version__


def test_legacy_onnx_exporter_and_explicit_out(tmp_path, data_root: str, capsys) -> None:
    ckpt = make_checkpoint(str(tmp_path / "run"), "small", 3, data_root)
    out = str(tmp_path / "elsewhere" / "m.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export(ckpt, out=out, exporter="torchscript", opset=17, n_images=12)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert capsys.readouterr().out == ""
    assert result.path == out and result.exporter == "torchscript" and result.opset == 17
    assert result.parity.passed and result.parity.n_images == 12
    assert {o.version for o in onnx.load(out).opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert sorted(os.listdir(tmp_path / "elsewhere")) == [MANIFEST_NAME, "m.onnx", "m.onnx.parity.json"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize(
    ("exporter", "opset", "match"),
    [("bogus", None, "unknown ONNX exporter"), ("dynamo", 99, "opset 99"), ("torchscript", 21, "opset 21")],
)
def test_bad_exporter_options_fail_before_loading(exporter: str, opset: int | None, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        export("/nonexistent/best.pt", exporter=exporter, opset=opset)


@pytest.mark.parametrize(("fmt", "extra"), [("onnx", ["--exporter", "torchscript"]), ("torchscript", [])])
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_export_prints_parity_and_wrote_once(
    tmp_path, data_root: str, fmt: str, extra: list[str], as_json: bool
) -> None:
    from typer.testing import CliRunner

    from cnnkit.cli import app

    ckpt = make_checkpoint(str(tmp_path), "lecture", 2, data_root)
    res = CliRunner().invoke(app, ["export", ckpt, "--format", fmt, *extra, *(["--json"] if as_json else [])])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert sum("parity passed" in line or "-> passed" in line for line in lines) == 1, res.stderr
    assert sum("wrote " in line for line in lines) == 1, res.stderr
    if as_json:
        assert json.loads(res.stdout)["parity"]["passed"] is True


# --------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchscript_export_passes_and_extra_file_round_trips(tmp_path, data_root: str, arch: str, capsys) -> None:
    ckpt = make_checkpoint(str(tmp_path), arch, ARCHS[arch], data_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export(ckpt, fmt="torchscript", n_images=12)
        module, meta = load_torchscript(result.path)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert sum("deprecated" in line for line in captured.err.splitlines()) == 1

    assert result.path == str(tmp_path / "model.ts") and result.opset is None
    assert result.parity.passed and os.path.isfile(result.report_path)
    assert sorted(os.listdir(tmp_path)) == ["best.pt", MANIFEST_NAME, "model.ts", "model.ts.parity.json"]
    assert meta.arch == arch and meta.extra["export"]["format"] == "torchscript"
    assert meta.extra["export"]["exporter"] == "torch.jit.trace"
    model = eager(ckpt)
    for n in (1, 5):
        x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), atol=1e-5, rtol=0)


def test_load_torchscript_refuses_foreign_files(tmp_path) -> None:
    with pytest.raises(ModelError, match="no such TorchScript"):
        load_torchscript(str(tmp_path / "missing.ts"))
    (tmp_path / "junk.ts").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable TorchScript"):
        load_torchscript(str(tmp_path / "junk.ts"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torch.jit.trace(torch.nn.Identity(), torch.zeros(1))
        torch.jit.save(plain, str(tmp_path / "plain.ts"))
    with pytest.raises(ModelError, match="without cnnkit.json"):
        load_torchscript(str(tmp_path / "plain.ts"))


# --------------------------------------------------------------------------------------------
# The gate fails: nothing is left behind


def _perturb_first_weight(path: str) -> None:
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 16:
            init.CopyFrom(onnx.numpy_helper.from_array(arr + np.float32(0.05), init.name))
            break
    onnx.save(proto, path)


def test_broken_onnx_artifact_fails_gate_and_leaves_nothing(tmp_path, data_root: str, monkeypatch) -> None:
    ckpt = make_checkpoint(str(tmp_path), "small", 3, data_root)
    real = onnx_export.export_onnx

    def broken(model, meta, path, exporter, opset, batch=None):
        info = real(model, meta, path, exporter, opset, batch)
        _perturb_first_weight(path)
        return info

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    with pytest.raises(ParityError, match=r"parity FAILED: max \|diff\| .* \(tolerance 0.0001\).*nothing was written"):
        export(ckpt, exporter="torchscript", n_images=8)
    assert os.listdir(tmp_path) == ["best.pt"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_noisy_candidate_fails_gate_and_leaves_nothing(tmp_path, data_root: str, monkeypatch, fmt: str) -> None:
    ckpt = make_checkpoint(str(tmp_path), "small", 3, data_root)
    name = "onnx_runner" if fmt == "onnx" else "torchscript_runner"
    real = getattr(parity_mod, name)

    def noisy(arg):
        run = real(arg)
        return lambda x: run(x) + np.float32(1e-3)

    monkeypatch.setattr(parity_mod, name, noisy)
    with pytest.raises(ParityError) as err:
        export(ckpt, fmt=fmt, exporter="torchscript", n_images=8)
    assert "\n" not in str(err.value) and "argmax agreement" in str(err.value)
    assert os.listdir(tmp_path) == ["best.pt"]


# --------------------------------------------------------------------------------------------
# Bad checkpoints and data: clear errors, nothing written


def test_bad_checkpoints_raise_model_error(tmp_path, data_root: str, monkeypatch) -> None:
    good = make_checkpoint(str(tmp_path / "good"), "small", 3, data_root)
    blob = open(good, "rb").read()
    cases = {
        "missing": (None, "no such checkpoint"),
        "truncated": (blob[: len(blob) // 2], "not a readable checkpoint"),
        "foreign": ("foreign", "not a cnnkit checkpoint"),
    }
    for name, (content, match) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "best.pt"
        if content == "foreign":
            torch.save({"a": 1}, path)
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelError, match=match):
            export(str(path), exporter="torchscript")
        assert os.listdir(folder) == ([] if content is None else ["best.pt"]), name

    wrong_arch = make_checkpoint(str(tmp_path / "arch"), "small", 3, data_root, state_from="lecture")
    with pytest.raises(ModelError, match="weights do not match arch 'small'"):
        export(wrong_arch, fmt="torchscript")
    assert os.listdir(tmp_path / "arch") == ["best.pt"]

    monkeypatch.chdir(tmp_path)  # no runs/latest here
    with pytest.raises(ModelError, match="cnnkit train"):
        export()


def test_wrong_class_count_raises_model_error(tmp_path, data_root: str) -> None:
    path = make_checkpoint(str(tmp_path), "small", 3, data_root)
    ckpt = torch.load(path, weights_only=True)
    ckpt["meta"]["classes"] = [f"c{i}" for i in range(10)]
    torch.save(ckpt, path)
    with pytest.raises(ModelError, match="do not match"):
        export(path, exporter="torchscript")
    assert os.listdir(tmp_path) == ["best.pt"]


def test_missing_data_folder_asks_for_data(tmp_path, data_root: str) -> None:
    ckpt = make_checkpoint(str(tmp_path / "run"), "small", 3, str(tmp_path / "gone"))
    with pytest.raises(DataError, match="--data DIR"):
        export(ckpt, fmt="torchscript")
    assert os.listdir(tmp_path / "run") == ["best.pt"]
    result = export(ckpt, fmt="torchscript", data=os.path.join(data_root, "testing"), n_images=9)
    assert result.parity.passed and result.data.endswith("testing") and result.parity.n_images == 9


def test_sample_is_spread_over_classes(data_root: str) -> None:
    meta = ModelMeta(arch="small", classes=CLASSES3, input_shape=(1, 28, 28), output="logits")
    images = sample_images(os.path.join(data_root, "testing"), meta, 3)
    assert images.shape == (3, 1, 28, 28) and images.dtype == np.uint8
    # one image per class: the classes differ in brightness (x // 1, x // 2, x // 3)
    assert images[0].max() > 170 and images[1].max() <= 127 and images[2].max() <= 85


# --------------------------------------------------------------------------------------------
# run_parity on its own


def test_run_parity_numbers_and_batch_sizes() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8)
    weights = rng.normal(size=(16, 3)).astype(np.float32)

    def ref(x):
        return x.reshape(len(x), -1).astype(np.float32) @ weights / 255

    report = run_parity(ref, ref, images, "logits", 1e-4)
    assert report.passed and report.max_abs_diff == 0.0 and report.batch_sizes == [1, 2, 7, 10]
    assert report.per_batch_size[0]["n_images"] == 10

    report = run_parity(ref, lambda x: ref(x) + 1e-3, images, "logits", 1e-4)
    assert not report.passed and report.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert "FAILED" in report.summary()

    report = run_parity(ref, lambda x: ref(x) + np.nan, images, "logits", 1.0)
    assert not report.passed

    def fixed_batch(x):
        if len(x) != 2:
            raise RuntimeError("Got invalid dimensions for input: images\nmore")
        return ref(x)

    with pytest.raises(ParityError, match="failed at batch size 1: Got invalid dimensions"):
        run_parity(ref, fixed_batch, images, "logits", 1e-4)


def test_run_parity_sigmoid_compares_decisions() -> None:
    images = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    ref = np.array([[0.2], [0.49999], [0.7], [0.9]], dtype=np.float32)
    cand = np.array([[0.2], [0.50001], [0.7], [0.9]], dtype=np.float32)  # tiny diff, flipped decision
    report = run_parity(lambda x: ref[: len(x)], lambda x: cand[: len(x)], images, "sigmoid", 1e-4, batch_sizes=(4,))
    assert report.max_abs_diff < 1e-4 and report.argmax_agreement == 0.75 and not report.passed
