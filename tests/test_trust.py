"""What a red-team pass found in the trust rules (SECURITY.md): a TorchScript file swapped between its
check and its load, an export that signed whatever was at its path after the rename, signing keys
that crashed an export after its work, and outputs written into the folders a command reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.provenance import MANIFEST_NAME, read_proven

torch = pytest.importorskip("torch")

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tree) -> str:
    """A run folder with best.pt and a proven model.ts."""
    from cnnkit.export import export
    from cnnkit.trainer.loop import TrainConfig, train

    run = train(
        TrainConfig(
            data=tiny_tree,
            arch="lecture",
            epochs=1,
            workers=0,
            device="cpu",
            runs_dir=os.fspath(tmp_path_factory.mktemp("runs")),
        )
    ).run_dir
    export(os.path.join(run, "best.pt"), fmt="torchscript")
    return run


def _copy(run: str, dest) -> str:
    shutil.copytree(run, dest)
    return os.fspath(dest)


def test_bench_loads_the_bytes_it_checked_not_the_file_swapped_in_after(exported, tmp_path, monkeypatch):
    """bench proved model.ts, then opened it again by path seconds later: a file swapped in between ran."""
    import cnnkit.bench as bench_mod

    run = _copy(exported, tmp_path / "run")
    real = bench_mod.read_proven

    def check_then_swap(path):
        checked = real(path)
        with open(path, "wb") as f:  # the swap, right after the check
            f.write(b"not TorchScript: loading this by path fails the row")
        return checked

    monkeypatch.setattr(bench_mod, "read_proven", check_then_swap)
    result = bench_mod.bench(run=run, device="cpu", limit=16)
    row = next(r for r in result.rows if r.artifact == "torchscript")
    assert row.error is None and row.max_abs_diff == 0.0


def test_export_vouches_for_the_bytes_its_gate_loaded(exported, tmp_path, monkeypatch):
    """export hashed `--out` after the rename: a file renamed in meanwhile got a valid manifest entry."""
    import cnnkit.export.pipeline as pipeline

    run = _copy(exported, tmp_path / "run")
    out = os.path.join(run, "swapped.ts")
    real = pipeline.record

    def swap_then_record(path, digest=None):
        with open(path, "ab") as f:
            f.write(b"appended after the gate")
        real(path, digest=digest)

    monkeypatch.setattr(pipeline, "record", swap_then_record)
    pipeline.export(os.path.join(run, "best.pt"), fmt="torchscript", out=out)
    data, why = read_proven(out)
    assert data is None and "changed since" in why
    entry = json.load(open(os.path.join(run, MANIFEST_NAME)))["files"]["swapped.ts"]
    assert entry["sha256"] != hashlib.sha256(open(out, "rb").read()).hexdigest()


@pytest.mark.parametrize("damage", ["short", "open-to-others", "cache-is-a-file"])
def test_a_bad_signing_key_stops_export_before_any_work(exported, tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    if damage == "cache-is-a-file":
        cache.write_text("a file where cnnkit's folder should be")
    else:
        cache.mkdir()
        key = cache / "signing.key"
        key.write_bytes(b"x" * (8 if damage == "short" else 32))
        key.chmod(0o600 if damage == "short" else 0o644)
    monkeypatch.setenv("CNNKIT_CACHE", os.fspath(cache))
    run = _copy(exported, tmp_path / "run")
    out = os.path.join(run, "new.onnx")
    res = runner.invoke(app, ["export", os.path.join(run, "best.pt"), "--out", out])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit | None), res.output
    assert "signing key" in res.stderr and len(res.stderr.strip().splitlines()) <= 2, res.stderr
    assert not os.path.exists(out)


def test_export_refuses_to_write_into_the_folder_its_gate_reads(exported, tmp_path, tiny_tree):
    data = shutil.copytree(os.path.join(tiny_tree, "testing"), tmp_path / "testing")
    image = next(p for p in sorted((data / "0").iterdir()))
    before = image.read_bytes()
    res = runner.invoke(
        app, ["export", os.path.join(exported, "best.pt"), "--data", os.fspath(data), "--out", os.fspath(image)]
    )
    assert res.exit_code == 2 and "is inside" in res.stderr, res.output
    assert image.read_bytes() == before


def test_merge_check_folder_refuses_an_output_inside_the_folder(exported, tmp_path, tiny_tree):
    from cnnkit.export import export
    from cnnkit.runtime.infer import infer
    from cnnkit.runtime.shard import Shard

    folder = shutil.copytree(os.path.join(tiny_tree, "testing"), tmp_path / "testing")
    model = export(os.path.join(exported, "best.pt"), fmt="onnx", out=os.fspath(tmp_path / "m.onnx")).path
    shards = [os.fspath(tmp_path / f"s{k}.csv") for k in (0, 1)]
    for k, out in enumerate(shards):
        infer(os.fspath(folder), model, device="cpu", output=out, progress=False, shard=Shard(k, 2))
    image = next(p for p in sorted((folder / "1").iterdir()))
    before = image.read_bytes()
    res = runner.invoke(app, ["merge", *shards, "--check-folder", "--output", os.fspath(image)])
    assert res.exit_code == 2 and "is inside" in res.stderr, res.output
    assert image.read_bytes() == before


def test_train_refuses_a_run_folder_inside_its_data(tiny_tree, tmp_path):
    """`train DATA --out DATA/run` wrote plots into the data and a `latest` link beside the run."""
    data = shutil.copytree(tiny_tree, tmp_path / "data")
    res = runner.invoke(app, ["train", os.fspath(data), "--out", os.fspath(data / "run"), "--epochs", "1"])
    assert res.exit_code == 2 and "is inside" in res.stderr, res.output
    assert not (data / "run").exists() and not (data / "latest").exists()


def test_infer_refuses_a_png_named_output_inside_its_folder(exported, tmp_path, tiny_tree):
    """`infer DATA --output DATA/out.png` succeeded, and the next run of DATA failed on out.png."""
    from cnnkit.export import export

    folder = shutil.copytree(os.path.join(tiny_tree, "testing"), tmp_path / "testing")
    model = export(os.path.join(exported, "best.pt"), fmt="onnx", out=os.fspath(tmp_path / "m.onnx")).path
    res = runner.invoke(app, ["infer", os.fspath(folder), "--model", model, "--output", os.fspath(folder / "out.png")])
    assert res.exit_code == 2 and "next run" in res.stderr, res.output
    assert not (folder / "out.png").exists()
    ok = runner.invoke(app, ["infer", os.fspath(folder), "--model", model, "--output", os.fspath(folder / "p.csv")])
    assert ok.exit_code == 0, ok.output  # a CSV beside the images is not read as one


def test_infer_never_writes_over_a_models_external_weights(exported, tmp_path, tiny_tree):
    """An ONNX model with its weights in a file beside it: `--output` onto that file destroyed them."""
    import onnx

    from cnnkit.export import export

    src = export(os.path.join(exported, "best.pt"), fmt="onnx", out=os.fspath(tmp_path / "m.onnx")).path
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(
        onnx.load(src),
        os.fspath(folder / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    before = (folder / "weights.bin").read_bytes()
    res = runner.invoke(
        app,
        [
            "infer",
            os.path.join(tiny_tree, "testing"),
            "--model",
            os.fspath(folder / "model.onnx"),
            "--output",
            os.fspath(folder / "weights.bin"),
        ],
    )
    assert res.exit_code == 2 and "is an input" in res.stderr, res.output
    assert (folder / "weights.bin").read_bytes() == before
