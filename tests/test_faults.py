"""Bad input, faults and untrusted files, end to end: a messy folder checked file by file against the
expected outcome, exit statuses, `--strict`, the failures file, non-UTF-8 names, kills in the middle
of `cnnkit infer` and `cnnkit train`, and one-line errors for bad data, checkpoints and models."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import export_onnx
from pngfiles import chunk, encode, pillow_png, random_png
from typer.testing import CliRunner

import cnnkit.runtime.infer as infer_mod
from cnnkit.cli import app
from cnnkit.datasets.layout import encode_png, write_tree
from cnnkit.errors import EXIT_FILES_FAILED, FileFailedError, ModelError
from cnnkit.images import MAX_FILE_BYTES
from cnnkit.meta import ModelMeta
from cnnkit.runtime.infer import infer
from cnnkit.runtime.outputs import failures_path

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee")
OK, CONVERTED = ("predicted", False), ("predicted", True)


def failed(reason: str) -> tuple[str, str]:
    return ("failed", reason)


# --------------------------------------------------------------------------------------------
# A model, and the messy folder


def _onnx_model(path: str, meta: ModelMeta | str | None, input_hw: int = 28) -> str:
    """The lecture CNN (random weights, 3 classes) exported as cnnkit does, with `meta` (a record, or
    raw text) attached, or none."""
    return export_onnx(path, size=input_hw, meta=meta)


META = ModelMeta(arch="lecture", classes=("ant", "bee", "cat"), input_shape=(1, 28, 28), output="logits")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _onnx_model(str(tmp_path_factory.mktemp("model") / "model.onnx"), META)


NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # a latin-1 name: not valid UTF-8
ODD = 'odd, "quoted"\nname.png'  # the CSV must quote it; logs must keep it on one line


def _bomb(width: int, height: int) -> bytes:
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


def build_corpus(root: str) -> tuple[dict[str, tuple[str, object]], dict[str, int]]:
    """Every case of the issue in one folder. Returns (PNG-named entry -> expected outcome, expected
    counts of ignored entries); folders named like PNGs are expected in `png_folders`."""
    rng = np.random.default_rng(0)
    gray_arr = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    gray = encode_png(gray_arr)
    expect: dict[str, tuple[str, object]] = {}

    def put(rel: str, data: bytes, outcome: tuple[str, object]) -> None:
        path = os.path.join(os.fsencode(root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        expect[rel] = outcome

    # Valid PNGs, as they are or converted by the documented policy.
    put("ant/gray.png", gray, OK)
    put("ant/UPPER.PNG", gray, OK)
    put("ant/interlaced.png", random_png(rng, 28, 28, 0, 8, interlace=True)[0], OK)
    put("ant/rgb.png", pillow_png(rgb), CONVERTED)
    put("ant/rgba.png", pillow_png(np.dstack([rgb, gray_arr])), CONVERTED)
    put("ant/palette.png", pillow_png(rgb, "P"), CONVERTED)
    put("ant/palette_transparent.png", pillow_png(rgb, "P", transparency=0), CONVERTED)
    put("ant/bilevel.png", pillow_png(gray_arr, "1"), CONVERTED)
    put("ant/gray16.png", pillow_png(gray_arr.astype(np.uint16) * 257), CONVERTED)
    put("ant/gray_alpha.png", pillow_png(gray_arr, "LA"), CONVERTED)
    put("ant/rgb16_interlaced.png", random_png(rng, 28, 28, 2, 16, interlace=True)[0], CONVERTED)
    put("ant/bigger.png", encode_png(rng.integers(0, 256, (40, 33), dtype=np.uint8)), CONVERTED)
    put(NON_UTF8, gray, OK)
    put(ODD, gray, OK)
    put("folder.png/inside.png", gray, OK)
    # Broken files: each with its one-line reason.
    put("bee/truncated.png", gray[: len(gray) // 2], failed("truncated PNG"))
    put("bee/no_iend.png", gray[:-12], failed("truncated PNG (no IEND chunk)"))
    put("bee/empty.png", b"", failed("empty file"))
    flipped = bytearray(gray)
    flipped[60] ^= 0x01  # inside the IDAT's data: libspng alone would decode a wrong image
    put("bee/bad_crc.png", bytes(flipped), failed("bad CRC in IDAT chunk"))
    put("bee/text.png", b"not an image\n", failed("not an image (bad signature, looks like text)"))
    jpeg = io.BytesIO()
    from PIL import Image

    Image.fromarray(rgb).save(jpeg, format="JPEG")
    put("bee/photo.png", jpeg.getvalue(), CONVERTED)  # a color JPEG, whatever its name: decoded by its bytes
    put("bee/cut.jpg", jpeg.getvalue()[:-300], failed("truncated JPEG"))
    put("bee/bomb.png", _bomb(100_000, 100_000), failed("too large: 100000x100000 pixels"))
    rows = b"".join(b"\x00" + bytes(28) for _ in range(10))
    put(
        "bee/short_idat.png",
        gray[:33] + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""),
        failed("IDAT stream too short"),
    )
    put("bee/bad_header.png", encode(np.zeros((1, 1), int), 8, 0)[:16] + b"\x00" * 17, failed("bad CRC in IHDR"))
    with open(os.path.join(root, "bee", "huge.png"), "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: refused by its size, never read
    expect["bee/huge.png"] = failed("too large: file over 256 MB")
    # Odd entries.
    os.symlink(os.path.join("..", "ant", "gray.png"), os.path.join(root, "bee", "link.png"))
    expect["bee/link.png"] = OK  # symlinks to files are followed
    os.symlink("missing.png", os.path.join(root, "bee", "dangling.png"))
    expect["bee/dangling.png"] = failed("dangling symlink")
    os.symlink("loop.png", os.path.join(root, "bee", "loop.png"))
    expect["bee/loop.png"] = failed("symlink loop")
    os.mkfifo(os.path.join(root, "bee", "fifo.png"))
    expect["bee/fifo.png"] = failed("not a regular file (a FIFO)")
    # Ignored, and counted: hidden entries, non-image files, symlinked folders.
    for rel in ("ant/.hidden.png", ".thumbs/x.png", "notes.txt", "ant/readme.md"):
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(gray)
    os.symlink("nowhere", os.path.join(root, "ant", "broken.txt"))
    os.symlink("ant", os.path.join(root, "linked"))
    os.symlink("ant", os.path.join(root, "linked.png"))
    ignored = {"other_files": 3, "hidden": 2, "symlinked_folders": 2}
    return expect, ignored


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, dict[str, tuple[str, object]], dict[str, int]]:
    root = str(tmp_path_factory.mktemp("messy"))
    expect, ignored = build_corpus(root)
    return root, expect, ignored


def read_csv(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))


def no_temp_files(folder: str) -> bool:
    return not glob.glob(os.path.join(folder, ".*.tmp"))


# --------------------------------------------------------------------------------------------
# The messy folder, file by file


@pytest.mark.parametrize("workers", [0, 2])
def test_every_png_named_entry_ends_up_in_exactly_one_place(model, corpus, tmp_path, monkeypatch, workers):
    root, expect, ignored = corpus
    monkeypatch.setattr(infer_mod, "MIN_TASK_FILES", 4)  # several tasks, so workers=2 really forks
    monkeypatch.setattr(infer_mod, "MAX_TASK_FILES", 4)
    out = str(tmp_path / "pred.csv")
    res = infer(
        root, model, device="cpu", batch_size=4, output=out, workers=workers, min_files_for_workers=0, progress=False
    )
    assert res.workers == workers
    rows = read_csv(out)
    assert rows[0] == ["path", "predicted", "score", "label"]
    predicted = [r[0] for r in rows[1:]]
    fails = read_csv(failures_path(out))
    assert fails[0] == ["path", "reason"]
    reasons = dict(fails[1:])
    assert len(predicted) == len(set(predicted)) and len(reasons) == len(fails) - 1  # no duplicates
    assert not set(predicted) & set(reasons)
    for rel, (outcome, detail) in expect.items():
        if outcome == "predicted":
            assert rel in predicted, rel
        else:
            assert rel in reasons and detail in reasons[rel] and "\n" not in reasons[rel], (rel, reasons.get(rel))
    assert set(predicted) | set(reasons) == set(expect)  # nothing else, nothing vanished
    assert res.n_images == len(predicted) and res.n_failed == len(reasons)
    assert res.n_converted == sum(1 for o in expect.values() if o == CONVERTED)
    assert res.ignored == ignored and res.png_folders == ["folder.png"]
    assert res.failures_output == failures_path(out)
    text = infer_mod.format_summary(res)
    assert f"{res.n_failed} failed" in text and f"{res.n_converted} converted" in text
    assert "3 non-image files, 2 hidden entries, 2 symlinked folders (not entered)" in text
    assert "folder.png" in text and failures_path(out) in text
    assert no_temp_files(str(tmp_path))


def test_non_utf8_names_round_trip_through_the_csv(model, corpus, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "pred.csv"
    infer(root, model, device="cpu", output=str(out), progress=False)
    raw = out.read_bytes()
    assert b"\ncaf\xe9.png," in raw  # the file's own bytes, not a replacement character
    assert b'\n"odd, ""quoted""\nname.png",' in raw  # quoted by the csv module
    path = next(r[0] for r in read_csv(str(out)) if r[0].startswith("caf"))
    assert os.path.isfile(os.path.join(root, path))  # the name read back opens the file


def test_cli_messy_folder_exits_4_with_a_failures_file(model, corpus, tmp_path):
    root, expect, _ = corpus
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["infer", root, "--model", model, "--output", str(out), "--json"])
    assert result.exit_code == EXIT_FILES_FAILED, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    report = json.loads(lines[0])  # non-UTF-8 names are \udcXX escapes: valid JSON
    n_bad = sum(1 for o, _ in expect.values() if o == "failed")
    assert report["n_failed"] == n_bad and report["n_images"] == len(expect) - n_bad
    assert report["failures_output"] == failures_path(str(out)) and os.path.isfile(report["failures_output"])
    assert report["ignored"] == {"other_files": 3, "hidden": 2, "symlinked_folders": 2}
    assert "Traceback" not in result.output
    assert f"{n_bad} file(s) could not be used (all listed in {failures_path(str(out))})" in result.stderr


def test_strict_stops_at_the_first_failure_and_writes_nothing(model, corpus, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "pred.csv"
    out.write_text("previous\n")
    result = runner.invoke(app, ["infer", root, "--model", model, "--output", str(out), "--strict"])
    assert result.exit_code == EXIT_FILES_FAILED
    err = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "--strict" in err[0] and "Traceback" not in result.output
    assert out.read_text() == "previous\n" and not os.path.exists(failures_path(str(out)))
    assert no_temp_files(str(tmp_path))
    with pytest.raises(FileFailedError, match="--strict"):
        infer(root, model, device="cpu", output=str(out), progress=False, strict=True)


def test_clean_folder_exits_0_and_removes_a_stale_failures_file(model, corpus, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "pred.csv"
    stale = failures_path(str(out))
    with open(stale, "w") as f:
        f.write("path,reason\nold.png,from an earlier run\n")
    result = runner.invoke(
        app, ["infer", os.path.join(root, "folder.png"), "--model", model, "--output", str(out), "--strict"]
    )
    assert result.exit_code == 0, result.output
    assert len(read_csv(str(out))) == 2 and not os.path.exists(stale)
    assert "failures" not in result.stderr


def test_folder_without_pngs_says_what_it_found(model, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    (tmp_path / "d" / ".hidden.png").write_bytes(b"x")
    os.symlink("nowhere.png", tmp_path / "d" / "dangling.png")
    result = runner.invoke(app, ["infer", str(tmp_path / "d"), "--model", model])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'd'}: no PNG files found (searched recursively for *.png; 1 unusable: "
        "dangling.png: dangling symlink, 1 non-image file, 1 hidden entry)"
    ]


# --------------------------------------------------------------------------------------------
# Models that cannot be used: one line, before any image is read


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, tuple[str, str]]:
    d = tmp_path_factory.mktemp("bad_models")
    junk = d / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    return {
        "missing": (str(d / "missing.onnx"), "no such model file"),
        "not_onnx": (str(junk), "not a readable ONNX model"),
        "no_metadata": (_onnx_model(str(d / "bare.onnx"), None), "without a 'cnnkit' metadata record"),
        "malformed": (_onnx_model(str(d / "bad.onnx"), "{'arch': 'lecture'}"), "not valid JSON"),  # a repr
        "wrong_input": (_onnx_model(str(d / "wrong.onnx"), META, input_hw=32), "has shape ['batch', 1, 32, 32]"),
        "truncated": (str(d / "cut.onnx"), "not a readable ONNX model"),
    }


@pytest.mark.parametrize("case", ["missing", "not_onnx", "no_metadata", "malformed", "wrong_input", "truncated"])
def test_unusable_model_fails_before_any_work(bad_models, model, corpus, tmp_path, monkeypatch, case):
    path, message = bad_models[case]
    if case == "truncated" and not os.path.exists(path):
        blob = open(model, "rb").read()
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 2])

    def no_work(*a, **k):
        raise AssertionError("the folder was walked or decoded")

    monkeypatch.setattr(infer_mod, "iter_pngs", no_work)
    monkeypatch.setattr(infer_mod, "decode_batches", no_work)
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["infer", corpus[0], "--model", path, "--output", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists() and no_temp_files(str(tmp_path))


def test_metadata_is_json_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path = _onnx_model(str(tmp_path / "evil.onnx"), code)
    from cnnkit.runtime.session import read_meta

    with pytest.raises(ModelError, match="not valid JSON"):
        read_meta(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Training data: one line, nothing written


def _tree(root, split: str, images: np.ndarray, labels: list[int], names: list[str]) -> None:
    write_tree(str(root), split, images, np.array(labels), names)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "empty_classes",
        "one_class",
        "testing_classes_differ",
        "no_valid_image",
    ],
)
def test_train_on_bad_data_is_one_line_and_leaves_no_run(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    z = np.zeros((4, 28, 28), np.uint8)
    if case == "empty":
        data.mkdir()
    elif case == "empty_classes":
        (data / "training" / "a").mkdir(parents=True)
        (data / "training" / "b").mkdir(parents=True)
    elif case == "one_class":
        _tree(data, "training", z, [0, 0, 0, 0], ["a"])
    elif case == "testing_classes_differ":
        _tree(data, "training", z, [0, 0, 1, 1], ["a", "b"])
        _tree(data, "testing", z, [0, 0, 1, 1], ["a", "c"])
    elif case == "no_valid_image":
        (data / "training" / "a").mkdir(parents=True)
        (data / "training" / "b").mkdir(parents=True)
        (data / "training" / "a" / "x.png").write_bytes(b"junk")
        (data / "training" / "b" / "y.png").write_bytes(b"")
    result = runner.invoke(app, ["train", str(data), "--epochs", "1", "--workers", "0", "--out", "run"])
    assert result.exit_code == 2, (case, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # a progress bar may come first
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], (case, lines)
    assert not os.path.exists("run") and not os.path.exists("runs"), case  # nothing half-written


# --------------------------------------------------------------------------------------------
# Checkpoints: one line, nothing written, never unpickled


class Evil:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(folder, case: str) -> str:
    from cnnkit.checkpoint import FORMAT, save_checkpoint
    from cnnkit.models import build_model

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "best.pt")
    meta = ModelMeta(arch="small", classes=("a", "b", "c"), input_shape=(1, 28, 28), output="logits")
    model, _ = build_model("small", 3, 28, 28)
    good = {"meta": meta.to_dict(), "model": model.state_dict(), "epoch": 1}
    if case == "truncated":
        save_checkpoint(path, good)
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
    elif case == "not_torch":
        open(path, "w").write("hello\n")
    elif case == "foreign":
        torch.save({"state_dict": model.state_dict()}, path)
    elif case == "other_arch":
        save_checkpoint(path, {**good, "model": build_model("lecture", 3, 28, 28)[0].state_dict()})
    elif case == "mismatched_state":
        state = dict(model.state_dict())
        state.pop(next(iter(state)))
        save_checkpoint(path, {**good, "model": state})
    elif case == "bad_meta":
        save_checkpoint(path, {**good, "meta": {**good["meta"], "input_shape": "28x28"}})
    elif case == "pickled_object":
        torch.save({"format": FORMAT, **good, "extra": Evil(os.path.join(folder, "pwned"))}, path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such checkpoint"),
        ("truncated", "not a readable checkpoint"),
        ("not_torch", "not a readable checkpoint"),
        ("foreign", "not a cnnkit checkpoint"),
        ("other_arch", "weights do not match arch 'small'"),
        ("mismatched_state", "weights do not match arch 'small'"),
        ("bad_meta", "best.pt: malformed cnnkit model record"),
        ("pickled_object", "refused to load, it is not plain tensors and data"),
    ],
)
def test_export_bad_checkpoint_is_one_line_and_leaves_nothing(tmp_path, case, message):
    folder = tmp_path / "run"
    path = _checkpoint(str(folder), case) if case != "missing" else str(folder / "best.pt")
    before = sorted(os.listdir(folder)) if folder.exists() else None
    result = runner.invoke(app, ["export", path, "--format", "onnx"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    after = sorted(os.listdir(folder)) if folder.exists() else None
    assert after == before  # nothing left behind (and the pickle's payload never ran)


# --------------------------------------------------------------------------------------------
# Kills in the middle of a run (subprocesses)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _ctrl_c_default() -> None:
    """In the child before exec: Ctrl-C's default action. A test run started in the background of a
    non-interactive shell (`cmd &`) inherits SIGINT ignored, as POSIX has background jobs do, and Python
    then leaves it ignored: the SIGINT cases would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> str:
    """30,000 tiny PNGs (about 2 s of `cnnkit infer` on 2 cores)."""
    from cnnkit.datasets.sample import sample_arrays

    images, labels = sample_arrays()
    n = 30_000
    reps = -(-n // len(images))
    root = str(tmp_path_factory.mktemp("big"))
    write_tree(
        root,
        "testing",
        np.concatenate([images] * reps)[:n],
        np.concatenate([labels] * reps)[:n],
        [str(i) for i in range(10)],
        ids=np.arange(n),
    )
    return os.path.join(root, "testing")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # not a zombie
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _start_and_kill(args: list[str], out: str, sig: int, min_bytes: int = 20_000) -> tuple[int, str, list[int]]:
    """Start `cnnkit infer`, wait until its temporary CSV holds `min_bytes`, send `sig`.

    On a loaded machine the run (30,000 images in about a second) may finish between the check and
    the signal: then the CSV it wrote is removed if there was none before, and it is tried again,
    killed sooner. Returns (exit status, stderr, the decoder processes it had)."""
    existed = os.path.exists(out)
    for attempt in range(4):
        rc, err, kids = _run_and_signal(args, out, sig, min_bytes >> (2 * attempt))
        if rc != 0:
            return rc, err, kids
        if not existed:
            os.remove(out)
    raise AssertionError("every run ended before the signal reached it")


def _run_and_signal(args: list[str], out: str, sig: int, min_bytes: int) -> tuple[int, str, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "infer", *args, "--output", out],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_default,
    )
    pattern = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{proc.pid}.*.tmp")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = glob.glob(pattern)
        if temps and os.path.getsize(temps[0]) >= min_bytes:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    kids = _children(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, kids


def _complete(path: str, n: int) -> bool:
    rows = read_csv(path)
    return rows[0] == ["path", "predicted", "score", "label"] and len(rows) == n + 1 and all(len(r) == 4 for r in rows)


@pytest.mark.slow
def test_kill_during_infer_never_leaves_a_torn_csv(model, big_folder, tmp_path):
    out = str(tmp_path / "pred.csv")
    args = [big_folder, "--model", model]
    # SIGKILL on the first run: no CSV at all, only the killed run's hidden temporary file, and the
    # decoder processes die with it (PR_SET_PDEATHSIG) instead of waiting forever.
    rc, _, kids = _start_and_kill(args, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL and kids, kids
    assert not os.path.exists(out)
    assert len(glob.glob(os.path.join(str(tmp_path), ".pred.csv.*.tmp"))) == 1
    deadline = time.monotonic() + 10
    while any(_running(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(k) for k in kids), "decoder processes outlived the killed run"
    # A complete run: the CSV appears whole, and the stale temporary file is gone.
    done = subprocess.run(
        [sys.executable, "-m", "cnnkit", "infer", *args, "--output", out, "--json"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _complete(out, 30_000) and no_temp_files(str(tmp_path))
    previous = open(out, "rb").read()
    # SIGKILL, SIGINT (Ctrl-C) and SIGTERM with a complete CSV in place: it stays byte for byte.
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM):
        rc, err, _ = _start_and_kill(args, out, sig)
        assert open(out, "rb").read() == previous, sig
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:  # a clean stop: one line, status 130, and no temporary file (the SIGKILLed run's was
            # removed when this run started writing, its own when it stopped)
            assert rc == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
            assert no_temp_files(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_training_leaves_the_last_checkpoint_loadable(tiny_tree, tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "train", tiny_tree, "--epochs", "200", "--workers", "0", "--out", str(run)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_default,
    )
    ckpt = run / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)  # a loaded machine: the epoch in flight stops at its next step
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted during epoch") and f"--resume {run}" in last, err
    assert "Traceback" not in err
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["format"] == "cnnkit.checkpoint/1" and state["epoch"] >= 1
    from cnnkit.checkpoint import model_from_checkpoint

    model_from_checkpoint(str(ckpt))  # the weights load into the model
    assert no_temp_files(str(run))


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    from cnnkit.files import remove_stale_temps, write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = {
        f".pred.csv.{dead_pid}.abc123.tmp": False,  # a killed writer's: removed
        f".pred.csv.{os.getpid()}.def456.tmp": True,  # a live writer's (this process): kept
        f".pred.csv.failures.csv.{dead_pid}.x.tmp": True,  # another output's: kept
        f".pred.csv.7.{dead_pid}.x.tmp": True,  # `pred.csv.7`'s: kept
        ".pred.csv.old.tmp": True,  # not ours to judge: kept
    }
    for name in names:
        (tmp_path / name).write_text("partial")
    write_text(tmp_path / "pred.csv", "complete\n")  # every atomic write cleans up first
    assert (tmp_path / "pred.csv").read_text() == "complete\n"
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert remove_stale_temps(tmp_path / "pred.csv") == []


def test_outputs_never_replace_a_device_a_folder_or_a_fifo(model, tiny_tree, tmp_path):
    """`--output /dev/null` (run as root) once replaced the device with a regular file."""
    import stat

    from cnnkit.errors import DataError
    from cnnkit.files import atomic_path

    fifo, folder = tmp_path / "pipe", tmp_path / "dir"
    os.mkfifo(fifo)
    folder.mkdir()
    for target, kind in (("/dev/null", "a character device"), (folder, "a folder"), (fifo, "a FIFO")):
        with pytest.raises(DataError, match=f"is {kind}"), atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and folder.is_dir() and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary file left behind

    result = runner.invoke(
        app, ["infer", os.path.join(tiny_tree, "testing"), "--model", model, "--output", "/dev/null"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "/dev/null: is a character device" in result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.slow
def test_sigterm_to_the_process_group_is_one_line_from_the_main_process(model, big_folder, tmp_path):
    """`kill -- -PGID` (a batch scheduler's stop) reaches the decoder processes too: they inherited the
    CLI's SIGTERM handler and each printed a KeyboardInterrupt traceback."""
    out = str(tmp_path / "pred.csv")
    for _ in range(5):  # the run takes about half a second: if it finished before the signal, again
        proc = subprocess.Popen(
            [sys.executable, "-m", "cnnkit", "infer", big_folder, "--model", model, "--workers", "2", "--output", out],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        # Soon after the decoders start: they fill their queue and then wait while this process
        # starts onnxruntime and predicts, and an idle worker is where the inherited handler's
        # traceback came from (a busy one sends its KeyboardInterrupt back as the task's result).
        deadline = time.monotonic() + 60
        while not (kids := _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.005)
        time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 130 or "interrupted" in err or not os.path.exists(out):
            break
        os.remove(out)
    assert kids and proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert not os.path.exists(out) and no_temp_files(str(tmp_path))


def _handlers_in_a_decoder() -> tuple[object, object]:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_decoders_leave_sigint_and_sigterm_to_the_main_process():
    """A forked decoder inherits the CLI's SIGTERM handler (it raises KeyboardInterrupt): it must
    ignore SIGTERM as it ignores SIGINT, so that only the main process reports a stop."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cnnkit.batches import _init_worker
    from cnnkit.cli import _stops_cleanly_on_sigterm

    with (
        _stops_cleanly_on_sigterm(),
        ProcessPoolExecutor(
            1, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=(os.getpid(),)
        ) as pool,
    ):
        assert pool.submit(_handlers_in_a_decoder).result() == (signal.SIG_IGN, signal.SIG_IGN)


@pytest.fixture(scope="module")
def checkpoint(tiny_tree, tmp_path_factory) -> str:
    """A random-init 2-class checkpoint whose recorded data (ant, bee) has training/ and testing/."""
    import shutil

    from test_export import make_checkpoint

    root = tmp_path_factory.mktemp("antbee")
    for split in ("training", "testing"):
        for name, digit in (("ant", "0"), ("bee", "1")):
            shutil.copytree(os.path.join(tiny_tree, split, digit), root / split / name)
    return make_checkpoint(str(tmp_path_factory.mktemp("run")), "lecture", 2, str(root))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_sigterm_during_export_is_a_clean_stop(checkpoint, tmp_path, precision):
    """SIGTERM once ended `cnnkit export` with status 143, leaving its temporary file (and for INT8
    its `.cnnkit-export-*` folder) beside the output."""
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--quantize", "int8"] if precision == "int8" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "export", checkpoint, "--out", str(out / "m.onnx"), *extra],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pattern = str(out / (".cnnkit-export-*" if precision == "int8" else ".m.onnx.*.tmp"))
    deadline = time.monotonic() + 120
    while not glob.glob(pattern):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert os.listdir(out) == []


def test_an_error_raised_from_an_interrupt_is_an_interrupt(capsys):
    """SIGTERM while onnxruntime's extension module loads surfaced as `ImportError: initialization
    failed` (from the KeyboardInterrupt) and a traceback, exit 1: it is a stop, exit 130."""
    import typer

    from cnnkit.cli import _reports_errors

    @_reports_errors
    def loads_a_library():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    with pytest.raises(typer.Exit) as stopped:
        loads_a_library()
    assert stopped.value.exit_code == 130 and capsys.readouterr().err.strip() == "interrupted"

    @_reports_errors
    def fails():
        raise ImportError("a real bug keeps its traceback")

    with pytest.raises(ImportError):
        fails()
