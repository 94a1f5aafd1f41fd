"""cnnkit.runtime: session checks, batched inference against a one-image-at-a-time reference, the CSV,
failures, accuracy, and the torch-free import guarantee (in a fresh interpreter)."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import export_onnx

import cnnkit.runtime.infer as infer_mod
from cnnkit.errors import DataError, DeviceError, ModelError
from cnnkit.images import read_image
from cnnkit.meta import METADATA_KEY, ModelMeta, predict
from cnnkit.runtime.infer import format_summary, infer
from cnnkit.runtime.outputs import CSV_COLUMNS
from cnnkit.runtime.session import create_session, read_meta

CLASSES = ("ant", "bee", "cat")
SIZE = 28


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny exported model and PNG trees


def _export(path: str, num_classes: int, meta: ModelMeta | None, seed: int = 0) -> str:
    """Export the lecture CNN (random weights) the way cnnkit's exporter does, then attach `meta`."""
    return export_onnx(path, tuple(f"c{i}" for i in range(num_classes)), SIZE, seed, meta)


def _meta(classes: tuple[str, ...] = CLASSES, output: str = "logits", **kw) -> ModelMeta:
    return ModelMeta(arch="lecture", classes=classes, input_shape=(1, SIZE, SIZE), output=output, **kw)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    return {
        "logits": _export(str(d / "model.onnx"), 3, _meta()),
        "sigmoid": _export(str(d / "binary.onnx"), 2, _meta(("no", "yes"), "sigmoid"), seed=1),
        "bare": _export(str(d / "bare.onnx"), 3, None),
        "wrong_shape": _export(str(d / "wrong.onnx"), 3, _meta().replace(input_shape=[1, 32, 32])),
    }


def _png(path, arr: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="session")
def labeled_tree(tmp_path_factory) -> str:
    """3 classes x 20 gray 28 x 28 images, plus a corrupt PNG, a text file named .png, an RGB image
    and a 40 x 40 image (the last two are converted)."""
    root = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(20):
            # Brightness varies by class so a random model still spreads its predictions a little.
            img = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) // (c + 1)
            _png(str(root / name / f"{i:03d}.png"), img)
    good = (root / "ant" / "000.png").read_bytes()
    (root / "ant" / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "bee" / "notes.png").write_text("this is not an image\n")
    _png(str(root / "cat" / "rgb.png"), rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    _png(str(root / "cat" / "big.png"), rng.integers(0, 256, (40, 40), dtype=np.uint8))
    return str(root)


@pytest.fixture(scope="session")
def flat_tree(tmp_path_factory) -> str:
    """Unlabeled: files at the top and under a folder that is not a class."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(1)
    for i in range(6):
        _png(str(root / f"img{i}.png"), rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    _png(str(root / "other" / "x.png"), rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    return str(root)


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    return [dict(zip(CSV_COLUMNS, r, strict=True)) for r in rows[1:]]


def _reference(model: str, root: str, rels: list[str]) -> dict[str, tuple[str, float]]:
    """Plain onnxruntime, default options, one image per run."""
    import onnxruntime as ort

    meta = read_meta(model)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = {}
    for rel in rels:
        img, _ = read_image(os.path.join(root, rel), meta.input_shape)
        logits = sess.run(None, {"images": img[None]})[0]
        idx, prob = predict(logits, meta.output)
        out[rel] = (meta.classes[int(idx[0])], float(prob[0]))
    return out


def _no_temp_files(folder: str) -> bool:
    return not glob.glob(os.path.join(folder, ".*.tmp"))


# --------------------------------------------------------------------------------------------
# Predictions


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_predictions_match_one_at_a_time(models, labeled_tree, tmp_path, monkeypatch, batch_size, workers):
    # Small decode tasks, so that even 64 files make several tasks and workers=2 really forks.
    monkeypatch.setattr(infer_mod, "MIN_TASK_FILES", 8)
    monkeypatch.setattr(infer_mod, "MAX_TASK_FILES", 8)
    out = str(tmp_path / "pred.csv")
    res = infer(
        labeled_tree,
        models["logits"],
        device="cpu",
        batch_size=batch_size,
        output=out,
        workers=workers,
        min_files_for_workers=0,
        progress=False,
    )
    assert res.workers == (workers if batch_size < 64 else 0)  # 64 files: one task of 256 runs in-process
    rows = _read_csv(out)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    ref = _reference(models["logits"], labeled_tree, [r["path"] for r in rows])
    for r in rows:
        cls, prob = ref[r["path"]]
        assert r["predicted"] == cls, r["path"]
        assert abs(float(r["score"]) - prob) <= 1e-6, r["path"]
    assert res.n_images == len(rows) == 62
    assert _no_temp_files(str(tmp_path))


def test_sigmoid_model(models, flat_tree, tmp_path):
    out = str(tmp_path / "p.csv")
    res = infer(flat_tree, models["sigmoid"], device="cpu", output=out, progress=False)
    rows = _read_csv(out)
    ref = _reference(models["sigmoid"], flat_tree, [r["path"] for r in rows])
    for r in rows:
        assert r["predicted"] == ref[r["path"]][0]
        assert abs(float(r["score"]) - ref[r["path"]][1]) <= 1e-6
        assert float(r["score"]) >= 0.5  # the probability of the predicted class
    assert res.classes == ["no", "yes"]


def test_csv_scores_are_exact_float32(models, flat_tree, tmp_path):
    out = str(tmp_path / "p.csv")
    infer(flat_tree, models["logits"], device="cpu", output=out, progress=False)
    for r in _read_csv(out):  # the text is the float32's own 9-digit form: reading it back is lossless
        assert f"{float(np.float32(r['score'])):.9g}" == r["score"]


# --------------------------------------------------------------------------------------------
# Labels, accuracy, failures, the CSV file


def test_labeled_tree_accuracy_confusion_and_failures(models, labeled_tree, tmp_path, capsys):
    out = str(tmp_path / "pred.csv")
    res = infer(labeled_tree, models["logits"], device="cpu", output=out, progress=False)
    rows = _read_csv(out)
    assert res.n_images == 62 and res.n_failed == 2 and res.n_converted == 2
    failed = dict(res.failures)
    assert set(failed) == {"ant/corrupt.png", "bee/notes.png"}
    assert "corrupt" in failed["ant/corrupt.png"] or "truncated" in failed["ant/corrupt.png"]
    assert "not an image" in failed["bee/notes.png"]
    assert "ant/corrupt.png" in capsys.readouterr().err
    assert all(r["label"] == r["path"].split("/")[0] for r in rows)

    conf = np.array(res.confusion)
    assert conf.shape == (3, 3) and conf.sum() == 62
    assert conf.sum(axis=1).tolist() == [20, 20, 22]  # true counts per class, failures excluded
    for t, name in enumerate(CLASSES):
        for p, pname in enumerate(CLASSES):
            assert conf[t, p] == sum(r["label"] == name and r["predicted"] == pname for r in rows)
    correct = sum(r["label"] == r["predicted"] for r in rows)
    assert res.accuracy == pytest.approx(correct / 62)

    d = res.to_dict()
    for key in ("model", "provider", "n_images", "n_failed", "seconds", "images_per_second", "accuracy", "output"):
        assert key in d
    assert d["provider"] == "CPUExecutionProvider"
    assert d["images_per_second"] == pytest.approx(62 / res.seconds, rel=0.01)
    json.dumps(d)
    text = format_summary(res)
    assert "accuracy" in text and "bee" in text


def test_unlabeled_tree(models, flat_tree, tmp_path):
    out = str(tmp_path / "pred.csv")
    res = infer(flat_tree, models["logits"], device="cpu", output=out, progress=False)
    rows = _read_csv(out)
    assert res.accuracy is None and res.confusion is None
    assert [r["path"] for r in rows] == [f"img{i}.png" for i in range(6)] + ["other/x.png"]
    assert all(r["label"] == "" for r in rows)
    assert "accuracy" not in format_summary(res)


def test_partly_labeled_tree_fills_labels_but_no_accuracy(models, tmp_path):
    rng = np.random.default_rng(2)
    odd = 'misc/with, comma and "quotes".png'  # the CSV must quote it
    for rel in ("ant/a.png", "misc/b.png", odd):
        _png(str(tmp_path / "d" / rel), rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    res = infer(str(tmp_path / "d"), models["logits"], device="cpu", output=str(tmp_path / "p.csv"), progress=False)
    assert res.accuracy is None
    rows = _read_csv(str(tmp_path / "p.csv"))
    assert {r["path"]: r["label"] for r in rows} == {"ant/a.png": "ant", "misc/b.png": "", odd: ""}


def test_plain_and_quoted_csv_writers_agree(models, flat_tree, tmp_path, monkeypatch):
    fast = tmp_path / "fast.csv"
    infer(flat_tree, models["logits"], device="cpu", output=str(fast), progress=False)
    monkeypatch.setattr(infer_mod, "_NEEDS_CARE", re.compile("."))  # force the csv module
    slow = tmp_path / "slow.csv"
    infer(flat_tree, models["logits"], device="cpu", output=str(slow), progress=False)
    assert fast.read_bytes() == slow.read_bytes()


def test_default_output_next_to_model_and_replaced_atomically(models, flat_tree, tmp_path):
    model = str(tmp_path / "m.onnx")
    with open(models["logits"], "rb") as src, open(model, "wb") as dst:
        dst.write(src.read())
    target = tmp_path / "predictions.csv"
    target.write_text("old\n")
    res = infer(flat_tree, model, device="cpu", progress=False)
    assert res.output == str(target)
    assert len(_read_csv(str(target))) == 7
    assert _no_temp_files(str(tmp_path))


def test_failed_run_leaves_previous_csv_and_no_temp_file(models, labeled_tree, tmp_path, monkeypatch):
    from cnnkit.runtime import session as session_mod

    out = tmp_path / "pred.csv"
    out.write_text("previous\n")
    calls = {"n": 0}
    real_run = session_mod.Session.run

    def failing_run(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the run
        return real_run(self, batch)

    monkeypatch.setattr(session_mod.Session, "run", failing_run)
    with pytest.raises(KeyboardInterrupt):
        infer(labeled_tree, models["logits"], device="cpu", batch_size=8, output=str(out), progress=False)
    assert out.read_text() == "previous\n"
    assert _no_temp_files(str(tmp_path))


def test_default_model_is_runs_latest(models, flat_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="cnnkit export --format onnx"):
        os.makedirs("runs/r1")
        os.symlink("r1", "runs/latest")
        infer(flat_tree, progress=False)
    with open(models["logits"], "rb") as src, open("runs/r1/model.onnx", "wb") as dst:
        dst.write(src.read())
    res = infer(flat_tree, progress=False)
    assert os.path.samefile(res.output, "runs/r1/predictions.csv")


def test_folder_of_only_bad_files(models, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"")
    res = infer(str(tmp_path / "d"), models["logits"], device="cpu", output=str(tmp_path / "p.csv"), progress=False)
    assert (res.n_images, res.n_failed, res.accuracy) == (0, 1, None)
    assert res.failures == [("x.png", "empty file")]
    assert _read_csv(str(tmp_path / "p.csv")) == []


def test_empty_folder_and_missing_folder(models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG"):
        infer(str(tmp_path / "empty"), models["logits"], progress=False)
    with pytest.raises(DataError):
        infer(str(tmp_path / "nope"), models["logits"], progress=False)


# --------------------------------------------------------------------------------------------
# Sessions: metadata, shapes, devices


def test_session_reads_meta_and_runs(models):
    s = create_session(models["logits"], device="cpu", threads=1)
    assert s.meta == read_meta(models["logits"]) and s.meta.classes == CLASSES
    assert s.provider == "CPUExecutionProvider" and s.input_name == "images"
    batch = np.random.default_rng(0).integers(0, 256, (150, SIZE, SIZE), dtype=np.uint8)
    out = s.run(batch)  # 150 > cpu_slice: run in slices, same answer as one call
    assert out.shape == (150, 3)
    whole = s.ort_session.run(None, {"images": batch[:, None]})[0]
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-5)


def test_model_without_metadata_is_refused(models, flat_tree, tmp_path):
    with pytest.raises(ModelError, match="metadata"):
        create_session(models["bare"], device="cpu")
    with pytest.raises(ModelError, match="metadata"):
        infer(flat_tree, models["bare"], output=str(tmp_path / "p.csv"), progress=False)
    assert not (tmp_path / "p.csv").exists()


def test_malformed_metadata_and_non_onnx_files(models, tmp_path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(models["bare"])
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, "{not json"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="not valid JSON"):
        create_session(str(tmp_path / "bad.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError):
        read_meta(str(tmp_path / "junk.onnx"))
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError):
        read_meta(str(tmp_path / "empty.onnx"))
    with pytest.raises(ModelError, match="no such model"):
        read_meta(str(tmp_path / "missing.onnx"))


def test_input_shape_mismatch_is_refused(models):
    with pytest.raises(ModelError, match="input"):
        create_session(models["wrong_shape"], device="cpu")


def test_cuda_without_cuda_provider_is_an_error(models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        create_session(models["logits"], device="cuda")
    with pytest.raises(DeviceError):
        create_session(models["logits"], device="tpu")
    assert create_session(models["logits"], device="auto").provider == "CPUExecutionProvider"


def test_silent_cuda_fallback_is_caught(models, monkeypatch):
    """onnxruntime-gpu without CUDA libraries lists the CUDA provider, then runs on the CPU (FACTS.md)."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def fake_session(path, sess_options=None, providers=None):
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(DeviceError, match="CUDA provider did not load"):
        create_session(models["logits"], device="cuda")
    s = create_session(models["logits"], device="auto")
    assert s.provider == "CPUExecutionProvider"
    assert s.notes and "CPU" in s.notes[0]


def test_cuda_libraries_are_preloaded_once_and_quietly(models, monkeypatch, capsys):
    """onnxruntime-gpu's provider finds the pip `nvidia-*` libraries only through `preload_dlls`, which
    prints; `--json` owns stdout, so what it prints is kept for the error message instead."""
    import onnxruntime as ort

    from cnnkit.runtime import session as session_mod

    calls = []

    def fake_preload():
        calls.append(1)
        print("Failed to load libcudnn.so.9: not found")

    real = ort.InferenceSession
    monkeypatch.setattr(session_mod, "_PRELOAD", [])
    monkeypatch.setattr(ort, "preload_dlls", fake_preload, raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(
        ort,
        "InferenceSession",
        lambda path, sess_options=None, providers=None: real(
            path, sess_options=sess_options, providers=["CPUExecutionProvider"]
        ),
    )
    with pytest.raises(DeviceError, match="libcudnn.so.9"):
        create_session(models["logits"], device="cuda")
    assert create_session(models["logits"], device="auto").provider == "CPUExecutionProvider"
    assert calls == [1] and capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------
# The runtime is torch-free


def test_runtime_imports_no_torch_or_onnx(models, flat_tree, tmp_path):
    code = f"""
import sys
import cnnkit.runtime, cnnkit.runtime.infer, cnnkit.runtime.session
res = cnnkit.runtime.infer.infer({flat_tree!r}, {models["logits"]!r}, device="cpu",
                                 output={str(tmp_path / "p.csv")!r}, progress=False)
assert res.n_images == 7, res
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript"))
print("HEAVY", heavy)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
