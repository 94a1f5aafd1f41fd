"""The trust boundary under fuzzing: random bytes and mutated real files as models, shard summaries and
model metadata, fed to the commands a user runs (SECURITY.md says what cnnkit trusts).

Every example must end with an exit status from the documented table (docs/cli.md) and no traceback,
run none of the code a planted pickle carries, and write nothing but its named outputs. A second group
runs the worst inputs found by hand in a child process and holds its peak memory (max RSS) under 1 GB.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.provenance import MANIFEST_NAME

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.slow  # many examples, each a command: in the full run (CI), not the quick loop
runner = CliRunner()
DOCUMENTED_EXITS = {0, 1, 2, 3, 4}  # docs/cli.md; 130 (interrupted) cannot happen here
MARKER = os.path.join(tempfile.gettempdir(), f"cnnkit-fuzz-executed-{os.getpid()}")
FUZZ = settings(
    max_examples=int(os.environ.get("CNNKIT_FUZZ_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MEMORY_LIMIT = 1 << 30
# What 1,000 one-image classes may add to `train` over a small ordinary run: the model itself grows to
# 4.75M parameters (76 MB as weights, gradients and Adam's two moments); before the confusion matrix
# was bounded, plotting it took over 20 GB.
TRAIN_EXTRA_LIMIT = 256 << 20


@pytest.fixture(autouse=True, scope="module")
def _no_marker():
    if os.path.exists(MARKER):
        os.remove(MARKER)
    yield


class Planted:
    """A pickle that creates MARKER when it is loaded: the proof that a load ran code."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


# --------------------------------------------------------------------------------------------
# Real artifacts to mutate: one tiny run, exported to every format, and a pair of shard outputs


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_tree):
    from cnnkit.export import export
    from cnnkit.runtime.infer import infer
    from cnnkit.runtime.shard import Shard
    from cnnkit.trainer.loop import TrainConfig, train

    root = tmp_path_factory.mktemp("fuzz-real")
    run = train(
        TrainConfig(
            data=tiny_tree, arch="lecture", epochs=1, workers=0, device="cpu", runs_dir=os.fspath(root / "runs")
        )
    )
    for fmt in ("onnx", "torchscript", "pt2"):
        export(run.checkpoint, fmt=fmt)
    shards = []
    for k in (1, 2):
        out = os.fspath(root / f"shard{k}.csv")
        infer(
            os.path.join(tiny_tree, "testing"),
            os.path.join(run.run_dir, "model.onnx"),
            device="cpu",
            output=out,
            progress=False,
            shard=Shard(k, 2),
        )
        shards.append(out)
    return {"run": run.run_dir, "data": tiny_tree, "testing": os.path.join(tiny_tree, "testing"), "shards": shards}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """Random bytes, or the real file truncated, with bytes flipped, or with a slice repeated."""
    kind = draw(st.sampled_from(["random", "truncate", "flip", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    data = bytearray(original)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    i = draw(st.integers(0, len(data)))
    j = draw(st.integers(i, min(len(data), i + 4096)))
    return bytes(data[:i] + data[i:j] * draw(st.integers(2, 8)) + data[j:])


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            found[os.path.relpath(p, folder)] = (st_.st_size, st_.st_mtime_ns)
    return found


def _invoke(args: list[str], inputs: list[str], outputs: list[str]):
    """Run the CLI in process; check the exit status, the absence of a traceback, that no planted
    code ran, and that only `outputs` changed among the files beside the inputs."""
    folders = sorted({os.path.dirname(os.path.abspath(p)) if os.path.isfile(p) else os.path.abspath(p) for p in inputs})
    before = {f: _snapshot(f) for f in folders}
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args}: traceback {type(result.exception).__name__}: {result.exception}"
    )
    assert result.exit_code in DOCUMENTED_EXITS, (args, result.exit_code, result.output[-500:])
    assert not os.path.exists(MARKER), f"{args}: loading a file ran its code"
    allowed = {os.path.abspath(p) for p in outputs}
    for f in folders:
        after = _snapshot(f)
        changed = {k for k in set(before[f]) | set(after) if before[f].get(k) != after.get(k)}
        changed = {k for k in changed if not any(os.path.join(f, k).startswith(a) for a in allowed)}
        assert not changed, f"{args}: wrote outside its outputs: {sorted(changed)[:5]}"
    return result


# --------------------------------------------------------------------------------------------
# Models


@FUZZ
@given(data=st.data())
def test_fuzzed_onnx_model_in_infer(real, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("onnx")
    model = work / "model.onnx"
    model.write_bytes(data.draw(mutated(_read(os.path.join(real["run"], "model.onnx")))))
    out = os.fspath(work / "p.csv")
    _invoke(
        ["infer", real["testing"], "--model", os.fspath(model), "--device", "cpu", "--output", out, "--json"],
        [os.fspath(model), real["testing"]],
        [out],
    )


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoint_in_export(real, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("pt")
    ckpt = work / "best.pt"
    planted = work / "planted.pt"
    torch.save({"model": Planted()}, planted)
    ckpt.write_bytes(
        data.draw(
            st.one_of(
                mutated(_read(os.path.join(real["run"], "best.pt"))),
                st.just(_read(os.fspath(planted))),
                st.just(pickle.dumps(Planted())),
            )
        )
    )
    out = os.fspath(work / "m.onnx")
    _invoke(
        ["export", os.fspath(ckpt), "--format", "onnx", "--out", out, "--data", real["testing"], "--json"],
        [os.fspath(ckpt), real["testing"]],
        [out, os.fspath(work / MANIFEST_NAME)],
    )


def _evil_zip(original: bytes) -> bytes:
    """The real archive with every pickle inside replaced by one that runs code."""
    import io
    import zipfile

    src, dst = zipfile.ZipFile(io.BytesIO(original)), io.BytesIO()
    with zipfile.ZipFile(dst, "w") as z:
        for item in src.infolist():
            body = src.read(item)
            z.writestr(item, pickle.dumps(Planted()) if item.filename.endswith(".pkl") else body)
    return dst.getvalue()


@pytest.mark.parametrize("name", ["model.ts", "model.pt2"])
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_or_planted_archive_in_bench_is_never_loaded(real, name, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(real["run"], run)
    original = _read(os.path.join(real["run"], name))
    body = data.draw(st.one_of(st.just(_evil_zip(original)), mutated(original)))
    (run / name).write_bytes(body)
    result = _invoke(
        ["bench", "--run", os.fspath(run), "--device", "cpu", "--limit", "8", "--json"], [os.fspath(run)], []
    )
    if result.exit_code == 0 and body != original:  # a changed file is unproven: skipped, never loaded
        rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
        assert {"model.ts": "torchscript", "model.pt2": "pt2"}[name] not in {r["artifact"] for r in rows}


# --------------------------------------------------------------------------------------------
# Model metadata and shard summaries

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=30,
)


def _with_metadata(model_path: str, text: str, out: str) -> None:
    model = onnx.load(model_path)
    for prop in model.metadata_props:
        if prop.key == "cnnkit":
            prop.value = text
    onnx.save(model, out)


@st.composite
def metadata_texts(draw, original: str) -> str:
    """A JSON value, the real record with one field replaced, or the real text mutated."""
    record = json.loads(original)
    kind = draw(st.sampled_from(["value", "field", "text"]))
    if kind == "value":
        return json.dumps(draw(json_values))
    if kind == "field":
        record[draw(st.sampled_from(sorted(record)))] = draw(json_values)
        return json.dumps(record)
    return draw(mutated(original.encode())).decode("utf-8", "replace")


@FUZZ
@given(data=st.data())
def test_fuzzed_metadata_in_infer(real, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("meta")
    src = os.path.join(real["run"], "model.onnx")
    original = next(p.value for p in onnx.load(src).metadata_props if p.key == "cnnkit")
    model = os.fspath(work / "model.onnx")
    _with_metadata(src, data.draw(metadata_texts(original)), model)
    out = os.fspath(work / "p.csv")
    _invoke(
        ["infer", real["testing"], "--model", model, "--device", "cpu", "--output", out, "--json"],
        [model, real["testing"]],
        [out],
    )


@FUZZ
@given(data=st.data())
def test_fuzzed_shard_summary_in_merge(real, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("merge")
    shards = []
    for p in real["shards"]:
        for suffix in ("", ".json"):
            shutil.copy(p + suffix, work / (os.path.basename(p) + suffix))
        shards.append(os.fspath(work / os.path.basename(p)))
    summary = shards[data.draw(st.integers(0, 1))] + ".json"
    original = _read(summary)
    record = json.loads(original)
    kind = data.draw(st.sampled_from(["bytes", "field", "value"]))
    if kind == "bytes":
        body = data.draw(mutated(original))
    elif kind == "field":
        record[data.draw(st.sampled_from(sorted(record)))] = data.draw(json_values)
        body = json.dumps(record).encode()
    else:
        body = json.dumps(data.draw(json_values)).encode()
    with open(summary, "wb") as f:
        f.write(body)
    out = os.fspath(work / "merged.csv")
    _invoke(["merge", *shards, "--output", out, "--json"], [os.fspath(work)], [out])


# --------------------------------------------------------------------------------------------
# Peak memory on the worst inputs found by hand, each in its own process


_MEASURE = """
import resource, subprocess, sys
def cap():  # a guard for the machine: a regression fails here instead of exhausting its memory
    resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[1]), int(sys.argv[1])))
p = subprocess.run(sys.argv[2:], preexec_fn=cap, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
sys.stderr.write(p.stderr)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run_measured(args: list[str], cwd: str, guard: int = 8 << 30) -> tuple[int, str, int]:
    """`python -m cnnkit ARGS`: (exit status, stderr, peak RSS in bytes) of that process alone.

    A small parent starts it and reads its rusage: a child forked straight from pytest would count
    pytest's own pages in its peak. `guard` caps its data segment so a regression cannot take the
    machine down with it.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(guard), sys.executable, "-m", "cnnkit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    code, peak_kb = (int(v) for v in proc.stdout.split())
    return code, proc.stderr, peak_kb * 1024  # Linux reports kilobytes


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _bad_models(real, folder) -> dict[str, str]:
    src = os.path.join(real["run"], "model.onnx")
    record = json.loads(next(p.value for p in onnx.load(src).metadata_props if p.key == "cnnkit"))
    cases = {
        "100k-classes": {**record, "classes": [f"c{i}" for i in range(100_000)]},
        "huge-shape": {**record, "input_shape": [1, 1_000_000, 1_000_000]},
    }
    paths = {}
    for name, rec in cases.items():
        paths[name] = os.fspath(folder / f"{name}.onnx")
        _with_metadata(src, json.dumps(rec), paths[name])
    paths["nested-json"] = os.fspath(folder / "nested.onnx")
    _with_metadata(src, _nested(200_000), paths["nested-json"])
    return paths


def _gzip_bomb(folder) -> tuple[str, str]:
    """An IDX images file whose header declares 10 images of 28x28 and whose gzip body expands to 3 GB
    (gzip members concatenate: one compressed 16 MiB of zeros, written 192 times)."""
    images, labels = os.fspath(folder / "bomb-images.gz"), os.fspath(folder / "bomb-labels.gz")
    zeros = gzip.compress(bytes(1 << 24), compresslevel=9)
    with open(images, "wb") as f:
        f.write(gzip.compress(struct.pack(">IIII", 0x803, 10, 28, 28)))
        for _ in range(3 * 1024 // 16):
            f.write(zeros)
    with gzip.open(labels, "wb") as f:
        f.write(struct.pack(">II", 0x801, 10) + bytes(10))
    return images, labels


def _many_classes_tree(folder, k: int = 1000) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("training", "testing"):
        for c in range(k):
            d = folder / "many" / split / f"c{c:04d}"
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(d / "0.png")
    return os.fspath(folder / "many")


@pytest.mark.slow
def test_worst_inputs_stay_under_1gb_with_one_line(real, tmp_path):
    cases = {
        name: [
            "infer",
            real["testing"],
            "--model",
            path,
            "--device",
            "cpu",
            "--output",
            os.fspath(tmp_path / f"{name}.csv"),
        ]
        for name, path in _bad_models(real, tmp_path).items()
    }
    images, labels = _gzip_bomb(tmp_path)
    cases["gzip-bomb"] = ["data", "idx", images, labels, "--out", os.fspath(tmp_path / "idx"), "--split", "training"]
    big = tmp_path / "big-summary"
    big.mkdir()
    for p in real["shards"]:
        shutil.copy(p, big / os.path.basename(p))
        shutil.copy(p + ".json", big / (os.path.basename(p) + ".json"))
    with open(big / "shard1.csv.json", "w") as f:
        f.write(_nested(500_000))
    cases["nested-summary"] = [
        "merge",
        os.fspath(big / "shard1.csv"),
        os.fspath(big / "shard2.csv"),
        "--output",
        os.fspath(tmp_path / "merged.csv"),
    ]
    train = ["train", "--epochs", "1", "--workers", "0", "--val-split", "0", "--device", "cpu", "--out"]
    cases["1000-classes"] = [*train, os.fspath(tmp_path / "many-run"), _many_classes_tree(tmp_path)]
    problems, peaks = [], {}
    for name, args in cases.items():
        code, err, peaks[name] = run_measured(args, os.fspath(tmp_path))
        if code not in DOCUMENTED_EXITS or "Traceback" in err:
            last = (err.strip().splitlines() or [""])[-1][:300]
            problems.append(f"{name}: exit {code}, {last}")
    # Training's floor is torch itself (its import and an optimizer's first step: about 950 MiB with
    # this CUDA build of torch on any data), so for `train` the bound is on what the bad input adds
    # over the same command on ordinary data; every other command stays under 1 GiB outright.
    _, _, ordinary = run_measured([*train, os.fspath(tmp_path / "ordinary-run"), real["data"]], os.fspath(tmp_path))
    over = {name: peak - (ordinary if name == "1000-classes" else 0) for name, peak in peaks.items()}
    limit = {name: (TRAIN_EXTRA_LIMIT if name == "1000-classes" else MEMORY_LIMIT) for name in peaks}
    problems += [
        f"{name}: peak RSS {peaks[name] / 2**20:.0f} MiB ({over[name] / 2**20:.0f} MiB counted, limit "
        f"{limit[name] / 2**20:.0f})"
        for name in peaks
        if over[name] >= limit[name]
    ]
    assert not problems, "\n".join(problems)
