"""Outputs never destroy inputs, and output paths that cannot be written fail in one line before any
work (issue 15, items 4 and 6): infer, merge, export and train, as library calls and on the CLI."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os

import pytest
from typer.testing import CliRunner

import cnnkit.runtime.infer as infer_mod
from cnnkit.cli import app
from cnnkit.errors import DataError, ModelError
from cnnkit.runtime.infer import infer
from cnnkit.runtime.shard import merge

runner = CliRunner()


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(folder) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) -> its SHA-256."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = digest(p) if os.path.isfile(p) else "not a file"
    return out


def one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture()
def work(tmp_path, tiny_tree, onnx_model_factory):
    """A copy of the tiny testing split and of a model in `tmp_path`, so a test may try to destroy them."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(os.path.join(tiny_tree, "testing"), images)
    model = tmp_path / "model.onnx"
    shutil.copy(onnx_model_factory(), model)
    return tmp_path, str(images), str(model)


# --------------------------------------------------------------------------------------------
# Item 4: outputs that are inputs


def test_infer_refuses_to_write_over_its_model_or_an_input_image(work):
    tmp, images, model = work
    before = snapshot(tmp)
    first = sorted(os.listdir(os.path.join(images, "0")))[0]
    image = os.path.join(images, "0", first)
    for output, match in (
        (model, "is an input of this command"),
        (image, "is one of the images under"),
        (os.path.join(images, "1", "..", "0", first), "is one of the images under"),
    ):
        with pytest.raises(DataError, match=match):
            infer(images, model=model, output=output, workers=0, progress=False)
    link = tmp / "link.onnx"  # another name for the model: refused too
    os.symlink(model, link)
    with pytest.raises(DataError, match="is an input of this command"):
        infer(images, model=model, output=str(link), workers=0, progress=False)
    line = one_line_error(runner.invoke(app, ["infer", images, "--model", model, "--output", model]))
    assert line.startswith(f"error: {model}: is an input")
    assert snapshot(tmp) == {**before, "link.onnx": before["model.onnx"]}  # nothing written, nothing changed


def test_merge_refuses_an_output_that_is_a_shard_csv_or_summary_under_another_name(work):
    tmp, images, model = work
    shards = tmp / "shards"
    for k in (0, 1):
        infer(images, model=model, output=str(shards / f"s{k}.csv"), workers=0, progress=False, shard=f"{k}/2")
    os.symlink(shards, tmp / "alias")
    before = snapshot(shards)
    csvs = [str(shards / "s0.csv"), str(shards / "s1.csv")]
    (shards / "s1.csv.failures.csv").write_text("path,reason\n")  # a shard's failure list is an input too
    before = snapshot(shards)
    for output in (tmp / "alias" / "s0.csv", shards / "s1.csv.json", shards / "s1.csv.failures.csv"):
        with pytest.raises(DataError, match="is an input of this command"):
            merge(csvs, str(output))
    assert snapshot(shards) == before


def test_export_refuses_to_write_over_a_checkpoint(tmp_path):
    pytest.importorskip("torch")
    import shutil

    from test_export import make_checkpoint

    from cnnkit.export import export

    data = tmp_path / "data"
    (data / "testing").mkdir(parents=True)
    run = tmp_path / "run"
    best = make_checkpoint(str(run), "lecture", 2, str(data))
    last = str(run / "checkpoint.pt")
    shutil.copy(best, last)
    other = make_checkpoint(str(tmp_path / "other"), "lecture", 2, str(data))
    before = {p: digest(p) for p in (best, last, other)}
    for out, match in ((best, "is an input"), (last, "is an input"), (other, "is a cnnkit checkpoint")):
        with pytest.raises((DataError, ModelError), match=match):
            export(best, out=out)
    assert {p: digest(p) for p in before} == before
    line = one_line_error(runner.invoke(app, ["export", best, "--out", last]))
    assert f"{last}: is an input" in line
    assert sorted(os.listdir(run)) == ["best.pt", "checkpoint.pt"]  # no temporary file, no report


def test_latest_is_replaced_only_when_it_is_cnnkits_own_symlink(tmp_path):
    from cnnkit.runs import latest_note, mark_latest

    run = tmp_path / "run"
    run.mkdir()
    latest = tmp_path / "latest"
    latest.write_text("mine\n")  # a user's own file named latest
    assert "is a file, not cnnkit's `latest` symlink" in latest_note(str(run))
    assert mark_latest(str(run)) is False and latest.read_text() == "mine\n"
    latest.unlink()
    latest.mkdir()  # a folder: once a traceback and a stray latest.<pid>.tmp
    assert mark_latest(str(run)) is False and latest.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["latest", "run"]
    latest.rmdir()
    os.symlink("/elsewhere", latest)  # not one cnnkit makes
    assert mark_latest(str(run)) is False and os.readlink(latest) == "/elsewhere"
    latest.unlink()
    os.symlink("older-run", latest)  # cnnkit's: moved to the new run
    assert latest_note(str(run)) is None and mark_latest(str(run)) is True and os.readlink(latest) == "run"


# --------------------------------------------------------------------------------------------
# Item 6: output paths that cannot be written: one line, before any work, nothing half-written


def test_output_under_a_regular_file_is_one_line_before_any_work(work, monkeypatch):
    tmp, images, model = work
    (tmp / "file").write_text("x")
    bad = str(tmp / "file" / "out.csv")
    monkeypatch.setattr(infer_mod, "open_choice", lambda *a, **k: pytest.fail("work started"))
    line = one_line_error(runner.invoke(app, ["infer", images, "--model", model, "--output", bad]))
    assert line == f"error: {bad}: cannot write there ({tmp / 'file'} is not a folder; choose another output path)"
    with pytest.raises(DataError, match="is not a folder"):
        merge([model], bad)  # the output is checked before the inputs are read
    line = one_line_error(runner.invoke(app, ["train", images, "--out", str(tmp / "file"), "--epochs", "1"]))
    assert "file: is a file, not a folder; --out takes a run folder" in line
    line = one_line_error(runner.invoke(app, ["train", images, "--out", str(tmp / "file" / "run"), "--epochs", "1"]))
    assert "is not a folder" in line


def test_a_shard_summary_that_cannot_be_written_stops_infer_before_the_csv(work):
    """Once the CSV and its failure list were written and then the summary failed: outputs of a failed run."""
    tmp, images, model = work
    out = tmp / "out"
    (out / "p.csv.json").mkdir(parents=True)
    (tmp / "images" / "0" / "broken.png").write_bytes(b"not a png")  # a failure list would be written
    with pytest.raises(DataError, match="p.csv.json: is a folder"):
        infer(images, model=model, output=str(out / "p.csv"), workers=0, progress=False, shard="0/1")
    assert os.listdir(out) == ["p.csv.json"]


def _full_disk_open(prefix: str = ".", real_open=builtins.open):
    """`open` whose writes to a temporary output file (named `prefix`...) go to /dev/full (ENOSPC on flush)."""

    def fake(path, mode="r", *args, **kwargs):
        name = os.path.basename(os.fspath(path))
        if "w" in mode and name.startswith(prefix) and name.endswith(".tmp") and ".failures.csv." not in name:
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    return fake


def test_full_disk_is_one_line_and_leaves_nothing(work, monkeypatch):
    tmp, images, model = work
    out = tmp / "out"
    out.mkdir()
    monkeypatch.setattr(infer_mod, "open", _full_disk_open(), raising=False)
    line = one_line_error(runner.invoke(app, ["infer", images, "--model", model, "--output", str(out / "p.csv")]))
    assert line == f"error: {out / 'p.csv'}: cannot write (No space left on device); nothing was written there"
    assert os.listdir(out) == []
    # With a file that fails, the failure list (written fine) once stayed behind without its CSV.
    (tmp / "images" / "0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="p.csv: cannot write"):
        infer(images, model=model, output=str(out / "p.csv"), workers=0, progress=False)
    assert os.listdir(out) == []


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import cnnkit.checkpoint as ckpt_mod

    path = tmp_path / "checkpoint.pt"
    ckpt_mod.save_checkpoint(str(path), {"epoch": 1})
    before = digest(path)
    monkeypatch.setattr(ckpt_mod, "open", _full_disk_open(), raising=False)
    with pytest.raises(DataError, match="checkpoint.pt: cannot write .No space left on device."):
        ckpt_mod.save_checkpoint(str(path), {"epoch": 2})
    assert digest(path) == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_an_error_of_the_final_fsync_or_rename_names_the_output(tmp_path, monkeypatch):
    from cnnkit import files

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(DataError, match=r"out.json: cannot write \(No space left on device\)"):
        files.write_json(tmp_path / "out.json", {"a": 1})
    assert os.listdir(tmp_path) == []


def test_a_stop_just_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A Ctrl-C or SIGTERM landing right after the temporary file existed (a window before the
    cleanup's `try`, seen once as a leftover `.checkpoint.pt.*.tmp` after an interrupted training)."""
    from cnnkit import files

    real_close, calls = os.close, []

    def close_then_stop(fd):
        real_close(fd)
        if not calls:
            calls.append(fd)
            raise KeyboardInterrupt  # what the CLI's handler raises on SIGTERM

    monkeypatch.setattr(files.os, "close", close_then_stop)
    with pytest.raises(KeyboardInterrupt):
        files.write_text(tmp_path / "out.txt", "x")
    monkeypatch.undo()
    assert calls and os.listdir(tmp_path) == []
