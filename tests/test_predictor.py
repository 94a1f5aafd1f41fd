"""`cnnkit.Predictor`: every input kind answers as `cnnkit infer` does on the same files, for a gray
softmax model and an RGB sigmoid one; the numpy layout rule; errors; threads; a torch-free import."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_color import color_tree

import cnnkit
from cnnkit.errors import DataError
from cnnkit.images import ImageError
from cnnkit.listing import list_pngs
from cnnkit.runtime import predictor as predictor_mod
from cnnkit.runtime.infer import infer
from cnnkit.runtime.predictor import Prediction, Predictor, array_layout


def _trained(root: str, out: str, **kw) -> str:
    """A lecture model trained 1 epoch on `root` (through `cnnkit.train`) and exported to ONNX."""
    from cnnkit.export import export

    result = cnnkit.train(root, out=out, arch="lecture", epochs=1, workers=0, **kw)
    assert "history" not in result and result["run_dir"]
    return export(os.path.join(result["run_dir"], "best.pt"), data=f"{root}/testing").path


@pytest.fixture(scope="module")
def gray(tiny_tree, tmp_path_factory):
    """(testing folder, model): 3 digit classes (softmax), 28 x 28 gray."""
    return f"{tiny_tree}/testing", _trained(tiny_tree, str(tmp_path_factory.mktemp("gray") / "run"))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """(testing folder, model): red vs blue (sigmoid), 12 x 12 RGB; one gray and one 9 x 16 image to convert."""
    root = color_tree(tmp_path_factory.mktemp("rgb") / "tree")
    model = _trained(root, str(tmp_path_factory.mktemp("rgb-run") / "run"), color="auto")
    Image.fromarray(np.full((12, 12), 90, np.uint8)).save(f"{root}/testing/red/gray.png")
    Image.fromarray(np.full((9, 16, 3), 200, np.uint8)).save(f"{root}/testing/blue/wide.png")
    return f"{root}/testing", model


@pytest.fixture(params=["gray", "rgb"])
def case(request):
    return request.getfixturevalue(request.param)


def _cli_answers(folder: str, model: str, tmp_path) -> tuple[dict[str, tuple[str, np.float32]], int]:
    """(path -> (class, score) from the CSV `cnnkit infer` writes, how many images it converted)."""
    out = str(tmp_path / "p.csv")
    result = infer(folder, model, output=out, workers=0, progress=False)
    with open(out, newline="", encoding="utf-8") as f:
        return {r["path"]: (r["predicted"], np.float32(r["score"])) for r in csv.DictReader(f)}, result.n_converted


def _check(preds: list[Prediction], files: list[str], want: dict) -> None:
    assert len(preds) == len(files)
    for rel, p in zip(files, preds, strict=True):
        assert (p.label, np.float32(p.score)) == want[rel], rel
        assert p.ok and p.probabilities.dtype == np.float32 and p.probabilities[p.index] == np.float32(p.score)
        assert abs(float(p.probabilities.sum()) - 1) < 1e-5


def test_paths_bytes_and_pil_images_answer_as_cnnkit_infer(case, tmp_path, monkeypatch):
    folder, model = case
    want, n_converted = _cli_answers(folder, model, tmp_path)
    files = list_pngs(folder).files
    paths = [os.path.join(folder, f) for f in files]
    pil = [Image.open(p) for p in paths]
    with Predictor(model, device="cpu", batch_size=7, workers=0) as p:
        _check(p.predict(paths), files, want)
        _check(p.predict([open(x, "rb").read() for x in paths]), files, want)
        _check(p.predict(pil), files, want)
        _check([p.predict(paths[0]), p.predict(open(paths[0], "rb").read()), p.predict(pil[0])], files[:1] * 3, want)
        converted = [r.converted for r in p.predict(paths)]
    monkeypatch.setattr(predictor_mod, "POOL_MIN_FILES", 1)  # the decoder processes, on a short list
    with Predictor(model, device="cpu", batch_size=5, workers=2) as p:
        _check(p.predict(tuple(paths)), files, want)
        assert [r.converted for r in p.predict(paths)] == converted
    assert sum(converted) == n_converted  # the RGB tree's gray and wide images


def test_numpy_batches_in_each_layout_answer_as_cnnkit_infer(case, tmp_path):
    folder, model = case
    want, _ = _cli_answers(folder, model, tmp_path)
    files = [f for f in list_pngs(folder).files if not f.endswith(("gray.png", "wide.png"))]
    pixels = np.stack([np.asarray(Image.open(os.path.join(folder, f))) for f in files])
    with Predictor(model, device="cpu", workers=0) as p:
        rgb = p.meta.input_shape[0] == 3
        _check(p.predict(pixels), files, want)  # (N, H, W) or (N, H, W, 3)
        chw = pixels.transpose(0, 3, 1, 2) if rgb else pixels[:, None]
        _check(p.predict(chw), files, want)  # (N, C, H, W), the model's own
        _check(p.predict(list(pixels)), files, want)  # one (H, W) or (H, W, 3) image per item
        _check(p.predict(list(chw)), files, want)  # one (C, H, W) image per item
        other = pixels[..., 0] if rgb else np.repeat(pixels[..., None], 3, axis=3)  # the other mode
        assert all(r.converted for r in p.predict(other))


@pytest.mark.parametrize(
    "shape, model, layout",
    [
        ((5, 3, 4, 3), (3, 4, 3), "NCHW"),  # (N, C, H, W) and (N, H, W, 3) both fit: the model's own wins
        ((5, 3, 4, 3), (3, 8, 8), "NHWC"),
        ((5, 3, 28, 28), (3, 28, 28), "NCHW"),
        ((5, 28, 28, 3), (3, 28, 28), "NHWC"),
        ((5, 28, 28, 3), (1, 28, 28), "NHWC"),  # RGB for a gray model: converted
        ((5, 1, 28, 28), (1, 28, 28), "NCHW"),
        ((5, 28, 28), (1, 28, 28), "NHW"),
        ((5, 28, 28), (3, 28, 28), "NHW"),  # gray for an RGB model: converted
        ((5, 30, 3), (1, 30, 3), "NHW"),  # 3 pixels wide, the model's size: gray
    ],
)
def test_the_layout_rule(shape, model, layout):
    assert array_layout(shape, model) == layout


@pytest.mark.parametrize(
    "shape, model, says",
    [
        ((28, 28, 3), (1, 28, 28), "ambiguous"),  # one RGB image without its batch axis
        ((28, 28), (1, 28, 28), "one image"),
        ((5, 1, 28, 28), (3, 28, 28), "expected"),  # channels first, but not the model's
        ((5, 3, 20, 20), (3, 28, 28), "expected"),
        ((2, 5, 3, 28, 28), (3, 28, 28), "expected"),
    ],
)
def test_the_layout_rule_refuses_what_it_cannot_read(shape, model, says):
    with pytest.raises(DataError, match=says):
        array_layout(shape, model)


def test_numpy_input_must_be_uint8(gray):
    with Predictor(gray[1], device="cpu", workers=0) as p, pytest.raises(DataError, match="uint8"):
        p.predict(np.zeros((2, 28, 28), np.float32))


def test_pil_modes_answer_as_their_png_files(gray):
    """Palette, alpha, 1-bit and 16-bit images: a PIL image and its PNG file give the same answer."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (28, 28, 4), dtype=np.uint8))
    images = [
        rgba,
        rgba.convert("RGB").convert("P"),
        rgba.convert("LA"),
        rgba.convert("1"),
        Image.fromarray(rng.integers(0, 65536, (28, 28), dtype=np.uint16)),
        rgba.convert("L").resize((20, 30)),
    ]
    files = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files.append(buf.getvalue())
    with Predictor(gray[1], device="cpu", workers=0) as p:
        from_pil, from_png = p.predict(images), p.predict(files)
    for a, b in zip(from_pil, from_png, strict=True):
        assert (a.label, a.score, a.converted) == (b.label, b.score, b.converted) == (a.label, a.score, True)


@pytest.mark.parametrize("workers", [0, 2])
def test_files_that_cannot_be_used_raise_or_are_reported(gray, tmp_path, monkeypatch, workers):
    folder, model = gray
    good = [os.path.join(folder, f) for f in list_pngs(folder).files][:10]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nshort")
    inputs = [*good[:3], str(bad), *good[3:], str(tmp_path / "missing.png")]
    monkeypatch.setattr(predictor_mod, "POOL_MIN_FILES", 1)
    with Predictor(model, device="cpu", batch_size=4, workers=workers) as p:
        with pytest.raises(ImageError, match=f"^{re.escape(str(bad))}: .*truncated"):
            p.predict(inputs)
        with pytest.raises(ImageError, match=r"^input 1 \(bytes\): corrupt GIF"):
            p.predict([open(good[0], "rb").read(), b"GIF89a..."])
        out = p.predict(inputs, errors="report")
        want = p.predict(good)
    assert [r.error is not None for r in out] == [False] * 3 + [True] + [False] * 7 + [True]
    assert "truncated" in out[3].error and "unreadable" in out[-1].error
    assert (out[3].label, out[3].index, out[3].probabilities.size) == (None, -1, 0) and np.isnan(out[3].score)
    assert [(r.label, r.score) for r in out if r.ok] == [(r.label, r.score) for r in want]


def test_bad_arguments(gray):
    with Predictor(gray[1], device="cpu", workers=0) as p:
        with pytest.raises(TypeError, match="not <class 'int'>"):
            p.predict(3)  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="errors must be"):
            p.predict([], errors="ignore")  # type: ignore[arg-type]
        assert p.predict([]) == []
    with pytest.raises(DataError, match="batch size"):
        Predictor(gray[1], batch_size=0)


def test_predict_from_many_threads_equals_a_serial_run(gray, monkeypatch):
    folder, model = gray
    paths = [os.path.join(folder, f) for f in list_pngs(folder).files]
    monkeypatch.setattr(predictor_mod, "POOL_MIN_FILES", 8)  # the long lists go to the decoder processes
    jobs = [paths[i:] for i in range(0, 40, 5)] + [[open(x, "rb").read() for x in paths[:7]], paths[3]]
    with Predictor(model, device="cpu", batch_size=16, workers=2) as p:
        serial = [p.predict(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=6) as pool:
            parallel = list(pool.map(p.predict, jobs * 3))

    def key(r):
        return [(x.label, x.score, x.converted) for x in (r if isinstance(r, list) else [r])]

    assert [key(r) for r in parallel] == [key(r) for r in serial * 3]


def test_import_and_predictor_never_load_torch_or_onnx(gray):
    code = (
        "import sys, cnnkit\n"
        f"p = cnnkit.Predictor({gray[1]!r}, device='cpu', workers=1)\n"
        f"print(p.predict({os.path.join(gray[0], list_pngs(gray[0]).files[0])!r}).label)\n"
        "p.close()\n"
        "assert callable(cnnkit.train) and callable(cnnkit.infer)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_infer_function_returns_what_the_cli_prints(gray, tmp_path):
    from cnnkit.runtime.infer import infer as run_infer

    folder, model = gray
    got = cnnkit.infer(folder, model, output=str(tmp_path / "a.csv"), workers=0)
    want = run_infer(folder, model, output=str(tmp_path / "a.csv"), workers=0, progress=False).to_dict()
    assert got.keys() == want.keys() and got["n_images"] == want["n_images"] == 60
    assert got["accuracy"] == want["accuracy"] and got["confusion"] == want["confusion"]


def test_color_jpegs_by_path_and_bytes_answer_as_cnnkit_infer(rgb, tmp_path):
    """A color JPEG (any size, EXIF-rotated) goes through the same decoder and conversion as in `cnnkit infer`."""
    _, model = rgb
    folder = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(12, 12), (30, 20), (7, 9)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6 if i == 1 else 1  # orientation: rotate 90 degrees
        os.makedirs(folder / "red", exist_ok=True)
        Image.fromarray(pixels).save(folder / "red" / f"{i}.jpg", quality=90, exif=exif)
    want, n_converted = _cli_answers(str(folder), model, tmp_path)
    files = sorted(want)
    paths = [os.path.join(folder, f) for f in files]
    with Predictor(model, device="cpu", workers=0) as p:
        _check(p.predict(paths), files, want)
        _check(p.predict([open(x, "rb").read() for x in paths]), files, want)
    assert len(files) == 3 and n_converted == 2  # the two not 12 x 12


def test_images_without_pixels_are_reported_not_predicted(gray):
    with Predictor(gray[1], device="cpu", workers=0) as p:
        out = p.predict([np.zeros((0, 28), np.uint8), np.zeros((0, 0, 3), np.uint8)], errors="report")
        assert [r.ok for r in out] == [False, False] and all("empty image" in r.error for r in out)
        with pytest.raises(ImageError, match="empty image"):
            p.predict([np.zeros((28, 0), np.uint8)])
