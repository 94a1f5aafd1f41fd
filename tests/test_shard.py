"""Sharded inference: `cnnkit infer --shard K/N` in parallel processes, `cnnkit merge` back to the
unsharded run's files byte for byte, stable assignment, missing / duplicated / mixed shards, bad
--shard values; and the streaming walk (`iter_pngs`) that keeps list_pngs' order."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cnnkit.runtime.infer as infer_mod
from cnnkit.cli import app
from cnnkit.csvcells import unescape
from cnnkit.datasets.layout import encode_png
from cnnkit.errors import EXIT_FILES_FAILED
from cnnkit.listing import Listing, iter_pngs, list_pngs
from cnnkit.runtime.infer import infer
from cnnkit.runtime.shard import Shard, ShardError, file_sha256, format_merge, merge, parse_shard, shard_of

runner = CliRunner()
CLASSES = ("ant", "bee", "cat")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Names with characters that sort before "/" (" ", "-", "."), so a per-folder sort that put "sub/" first
# would reorder them, and names the CSV must quote: the shards and the merge keep the bytes anyway.
ODD = ("ant/sub dir/x.png", "ant/sub-dir/y.png", "ant/sub.dir.png", "ant/with, comma.png", 'bee/"quoted".png')


def _write(root: str, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _image(rng: np.random.Generator, c: int) -> bytes:
    return encode_png((rng.integers(0, 256, (28, 28)) // (c + 1)).astype(np.uint8))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """3 classes x 50 images, the odd names above, one corrupt PNG (a failure) and a non-PNG file."""
    root = str(tmp_path_factory.mktemp("shard-tree"))
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(50):
            _write(root, f"{name}/{i:03d}.png", _image(rng, c))
    for rel in ODD:
        _write(root, rel, _image(rng, 0))
    _write(root, "cat/corrupt.png", _image(rng, 2)[:40])
    _write(root, "cat/readme.txt", b"not an image\n")
    return root


@pytest.fixture(scope="module")
def model(onnx_model_factory) -> str:
    return onnx_model_factory(0)


@pytest.fixture(scope="module")
def unsharded(tree, model, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("unsharded") / "predictions.csv")
    res = infer(tree, model, device="cpu", output=out, progress=False)
    return out, res.to_dict()


def _run_shards(tree: str, model: str, out: str, n: int, only: list[int] | None = None, extra=()) -> list[str]:
    """`python -m cnnkit infer --shard K/N` for each K, all at once; returns the CSV paths."""
    env = dict(os.environ, PYTHONPATH=REPO)
    procs, outs = [], []
    for k in only if only is not None else range(n):
        csv_path = os.path.join(out, f"pred.{k}.csv")
        cmd = [
            sys.executable,
            "-m",
            "cnnkit",
            "infer",
            tree,
            "--model",
            model,
            "--device",
            "cpu",
            "--shard",
            f"{k}/{n}",
            "--output",
            csv_path,
            "--json",
            *extra,
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        outs.append(csv_path)
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode in (0, EXIT_FILES_FAILED), stderr
        d = json.loads(stdout)
        assert d["shard"] and d["summary"] and os.path.isfile(d["summary"])
    return outs


def _merge(args: list[str]):
    return runner.invoke(app, ["merge", *args])


def _failure_rows(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return sorted(csv.reader(f))


# --------------------------------------------------------------------------------------------
# Shards in parallel, merged: the unsharded run's files


def test_parallel_shards_merge_to_the_unsharded_run(tree, model, unsharded, tmp_path):
    full_csv, full = unsharded
    shards = _run_shards(tree, model, str(tmp_path), 3)
    sizes = [json.load(open(p + ".json"))["n_images"] for p in shards]
    assert sum(sizes) == full["n_images"] and all(s > 0 for s in sizes)
    # A shell glob over the folder also picks up the shard's failure list: merge skips it.
    failure_lists = [p + ".failures.csv" for p in shards if os.path.exists(p + ".failures.csv")]
    assert len(failure_lists) == 1
    merged = str(tmp_path / "merged" / "predictions.csv")
    result = _merge([*shards, *failure_lists, "--output", merged, "--check-folder", "--json"])
    assert result.exit_code == EXIT_FILES_FAILED, result.output  # complete, one file failed, as unsharded
    d = json.loads(result.stdout)
    assert d["complete"] is True and d["problems"] == [] and d["shards"]["missing"] == []
    with open(full_csv, "rb") as a, open(merged, "rb") as b:
        assert a.read() == b.read()  # byte for byte
    assert _failure_rows(merged + ".failures.csv") == _failure_rows(full_csv + ".failures.csv")
    for key in ("n_images", "n_failed", "n_converted", "accuracy", "confusion", "classes"):
        assert d[key] == full[key], key
    assert json.load(open(merged + ".json")) == d


def test_streamed_walk_gives_the_same_file(tree, model, unsharded, tmp_path, monkeypatch):
    """Past the look-ahead the folder streams (no total known): same bytes, workers or not."""
    full_csv, _ = unsharded
    monkeypatch.setattr(infer_mod, "LOOKAHEAD_FILES", 8)
    monkeypatch.setattr(infer_mod, "MIN_TASK_FILES", 8)
    monkeypatch.setattr(infer_mod, "MAX_TASK_FILES", 8)
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}.csv")
        res = infer(
            tree,
            model,
            device="cpu",
            batch_size=4,
            output=out,
            workers=workers,
            min_files_for_workers=0,
            progress=False,
        )
        assert res.workers == workers
        with open(full_csv, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read()


# --------------------------------------------------------------------------------------------
# Assignment


def test_assignment_is_a_fixed_hash_of_the_path():
    # blake2b(8-byte digest) of the UTF-8 path, big-endian, mod N: the same on every machine and
    # Python version; a change here would split old runs differently.
    assert [shard_of("ant/000.png", n) for n in (2, 3, 8, 1000)] == [
        int.from_bytes(__import__("hashlib").blake2b(b"ant/000.png", digest_size=8).digest(), "big") % n
        for n in (2, 3, 8, 1000)
    ]
    assert [shard_of("ant/000.png", n) for n in (2, 3, 8, 1000)] == [1, 2, 3, 283]  # pinned: old runs' shards
    # A name that is not UTF-8 (surrogate-escaped by os.fsdecode) hashes as its bytes on disk.
    assert (
        shard_of("caf\udce9/x.png", 1000)
        == int.from_bytes(__import__("hashlib").blake2b(b"caf\xe9/x.png", digest_size=8).digest(), "big") % 1000
        == 646
    )
    paths = [f"c{i % 10}/{i:06d}.png" for i in range(6000)]
    counts = np.bincount([shard_of(p, 8) for p in paths], minlength=8)
    assert counts.min() > 600 and counts.max() < 900  # 750 each on average


def test_existing_files_keep_their_shard_when_files_are_added(tree, model, tmp_path):
    root = str(tmp_path / "grow")
    shutil.copytree(tree, root)
    before = _rows_by_path(root, model, tmp_path / "a.csv")
    rng = np.random.default_rng(5)
    for i in range(60):
        _write(root, f"{CLASSES[i % 3]}/new{i:03d}.png", _image(rng, i % 3))
    after = _rows_by_path(root, model, tmp_path / "b.csv")
    for k in range(3):
        assert before[k] <= after[k]  # every file it had, it still has
        assert {p for p in after[k] - before[k]} == {p for p in after[k] if "new" in p}
    assert sum(len(a) for a in after.values()) == sum(len(b) for b in before.values()) + 60


def _rows_by_path(root, model, out) -> dict[int, set[str]]:
    got = {}
    for k in range(3):
        res = infer(root, model, device="cpu", output=f"{out}.{k}", progress=False, shard=Shard(k, 3))
        with open(res.output, newline="", encoding="utf-8") as f:
            got[k] = {r[0] for r in list(csv.reader(f))[1:]}
    return got


def test_a_shard_without_files_writes_an_empty_csv(tree, model, tmp_path):
    files = list_pngs(tree).files
    empty = next(k for k in range(1000) if all(shard_of(f, 1000) != k for f in files))
    res = infer(tree, model, device="cpu", output=str(tmp_path / "e.csv"), progress=False, shard=f"{empty}/1000")
    assert res.n_images == 0 and res.shard == f"{empty}/1000"
    with open(res.output, "rb") as f:
        assert f.read() == b"path,predicted,score,label\r\n"
    assert json.load(open(res.summary))["n_listed"] == len(files)  # every file seen, none kept


def test_default_shard_output_is_next_to_the_model(tree, model, tmp_path):
    local = str(tmp_path / "m.onnx")
    shutil.copy(model, local)
    res = infer(tree, local, device="cpu", progress=False, shard="2/3")
    assert res.output == str(tmp_path / "predictions.shard-2-of-3.csv")
    assert res.summary == res.output + ".json"


# --------------------------------------------------------------------------------------------
# What merge refuses or reports


@pytest.fixture(scope="module")
def shard_outputs(tree, model, tmp_path_factory) -> list[str]:
    return _run_shards(tree, model, str(tmp_path_factory.mktemp("shards")), 3)


def test_missing_shard_is_reported_and_exits_1(shard_outputs, tmp_path):
    merged = str(tmp_path / "m.csv")
    result = _merge([shard_outputs[0], shard_outputs[2], "--output", merged, "--check-folder", "--json"])
    assert result.exit_code == 1, result.output
    d = json.loads(result.stdout)
    assert d["complete"] is False and d["shards"]["missing"] == [1]
    assert d["n_in_missing_shards"] > 0 and d["n_unassigned"] == 0 and d["n_gone"] == 0
    assert "1 of 3 shards missing: 1" in result.stderr
    assert os.path.isfile(merged)  # written, marked incomplete


def _copy_shards(shard_outputs: list[str], to: str) -> list[str]:
    """The shard CSVs with their summaries and failure lists, copied to `to`; the copies' paths."""
    copies = []
    for p in shard_outputs:
        for suffix in ("", ".json", ".failures.csv"):
            if os.path.exists(p + suffix):
                shutil.copy(p + suffix, os.path.join(to, os.path.basename(p + suffix)))
        copies.append(os.path.join(to, os.path.basename(p)))
    return copies


def test_duplicated_file_is_reported(shard_outputs, tmp_path):
    copies = _copy_shards(shard_outputs, str(tmp_path))
    # Shard 1's CSV gains a row of shard 0 (in its sorted place), and its summary the count.
    with open(copies[0], newline="") as f:
        stolen = list(csv.reader(f))[1]
    with open(copies[1], newline="") as f:
        rows = list(csv.reader(f))
    with open(copies[1], "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *sorted([*rows[1:], stolen])])
    summary = json.load(open(copies[1] + ".json"))
    summary["n_images"] += 1
    summary["csv"] = {"sha256": file_sha256(copies[1]), "rows": summary["n_images"]}  # a consistent forgery
    json.dump(summary, open(copies[1] + ".json", "w"))
    result = _merge([*copies, "--output", str(tmp_path / "out" / "m.csv"), "--json"])
    assert result.exit_code == 1, result.output
    d = json.loads(result.stdout)
    assert d["n_duplicates"] == 1 and d["duplicates"] == [stolen[0]]
    assert "more than one shard" in result.stderr


def test_files_added_after_a_shard_ran_are_found_by_check_folder(tree, model, tmp_path):
    root = str(tmp_path / "d")
    shutil.copytree(tree, root)
    shards = _run_shards(root, model, str(tmp_path), 2)
    _write(root, "bee/late.png", _image(np.random.default_rng(9), 1))
    result = _merge([*shards, "--output", str(tmp_path / "m.csv"), "--check-folder", "--json"])
    assert result.exit_code == 1
    d = json.loads(result.stdout)
    assert d["unassigned"] == ["bee/late.png"] and d["n_unassigned"] == 1


def test_mixing_models_folders_or_n_is_refused(tree, model, onnx_model_factory, shard_outputs, tmp_path):
    other = _run_shards(tree, onnx_model_factory(1), str(tmp_path / "other"), 3, only=[1])
    cases = {
        "different model files": [shard_outputs[0], other[0], shard_outputs[2]],
        "given twice": [shard_outputs[0], shard_outputs[0]],
    }
    four = _run_shards(tree, model, str(tmp_path / "four"), 4, only=[3])
    cases["numbers of shards"] = [shard_outputs[0], four[0]]
    for what, inputs in cases.items():
        out = tmp_path / f"m-{what.replace(' ', '-')}.csv"
        result = _merge([*inputs, "--output", str(out)])
        assert result.exit_code == 2, (what, result.output)
        assert result.stderr.startswith("error: ") and what in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()
    # A merged output is not a shard.
    merged = str(tmp_path / "all.csv")
    assert _merge([*shard_outputs, "--output", merged]).exit_code == EXIT_FILES_FAILED
    result = _merge([*shard_outputs, merged, "--output", str(tmp_path / "again.csv")])
    assert result.exit_code == 2 and "merged output" in result.stderr
    # A CSV without its summary.
    lone = tmp_path / "lone.csv"
    shutil.copy(shard_outputs[0], lone)
    with pytest.raises(ShardError, match="no summary"):
        merge([str(lone)], str(tmp_path / "x.csv"))


def _one_line_refusal(result, out) -> str:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output and not os.path.exists(out)
    return result.stderr


def _rewrite(path: str, edit) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


def test_a_shard_csv_edited_after_its_run_is_refused(shard_outputs, tmp_path):
    """Each edit keeps the CSV well-formed and sorted, so only the recorded SHA-256 can catch it."""
    flip = {"ant": "bee", "bee": "cat", "cat": "ant"}
    edits = {
        "relabelled": ("", lambda rows: [rows[0], [rows[1][0], flip[rows[1][1]], *rows[1][2:]], *rows[2:]], "same"),
        "row dropped": ("", lambda rows: rows[:-1], "rows instead of"),
        "failure dropped": (".failures.csv", lambda rows: rows[:1], "0 rows instead of 1"),
    }
    for what, (suffix, edit, differs) in edits.items():
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        copies = _copy_shards(shard_outputs, str(folder))
        target = next(c for c in copies if os.path.exists(c + suffix))
        _rewrite(target + suffix, edit)
        out = str(folder / "m.csv")
        err = _one_line_refusal(_merge([*copies, "--output", out]), out)
        k = copies.index(target)
        assert f"{target + suffix}: changed since shard {k}/3 wrote it" in err and differs in err, (what, err)
        assert f"--shard {k}/3" in err


@pytest.mark.parametrize(
    "case, expected",
    [
        (lambda s: s.pop("csv"), "no 'csv'"),
        (lambda s: s.update(version=1), "older cnnkit"),
        (lambda s: s.update(shard={"index": 0, "count": 0}), "'shard' must be"),
        (lambda s: s.update(shard={"index": 3, "count": 3}), "'shard' must be"),
        (lambda s: s.update(shard=[0, 3]), "'shard' must be"),
        (lambda s: s.update(n_images="50"), "'n_images' must be a count"),
        (lambda s: s.update(n_failed=-1), "'n_failed' must be a count"),
        (lambda s: s.update(classes=[]), "'classes' must be"),
        (lambda s: s.update(confusion=[[1, 2]]), "'confusion' must be 3 x 3"),
        (lambda s: s.update(accuracy=2.5), "'accuracy' must be"),
        (lambda s: s.update(failures=[["x.png", "bad"]]), "'failures' must be"),
        (lambda s: s.update(model_sha256=None), "'model_sha256' must be"),
        (lambda s: s["csv"].update(rows=1), "'csv' has 1 rows"),
        ("[]", "not a summary"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (" " * (64 << 20) + "{}", "too large"),
        ('{"kind": ', "not a readable summary"),
    ],
)
def test_malformed_summaries_are_one_line_errors(shard_outputs, tmp_path, case, expected):
    copies = _copy_shards(shard_outputs, str(tmp_path))
    summary = json.load(open(copies[1] + ".json"))
    if callable(case):
        case(summary)
        text = json.dumps(summary)
    else:
        text = case
    with open(copies[1] + ".json", "w") as f:
        f.write(text)
    out = str(tmp_path / "m.csv")
    err = _one_line_refusal(_merge([*copies, "--output", out]), out)
    assert copies[1] + ".json" in err and expected in err, err


# --------------------------------------------------------------------------------------------
# --shard values


@pytest.mark.parametrize("value", ["3/3", "-1/3", "1/0", "x", "/3", "1/", "1/2/3", "1.5/3", ""])
def test_bad_shard_values_are_one_line_errors(value, tree, model):
    result = runner.invoke(app, ["infer", tree, "--model", model, "--shard", value])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --shard takes K/N"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_parse_shard():
    assert parse_shard("0/8") == Shard(0, 8) and parse_shard(" 7 / 8 ") == Shard(7, 8)
    assert str(parse_shard("0/1")) == "0/1"
    with pytest.raises(ShardError, match="the last of 8 shards is 7/8"):
        parse_shard("8/8")
    with pytest.raises(ShardError, match="K is empty"):
        parse_shard("/8")


# --------------------------------------------------------------------------------------------
# The streaming walk: list_pngs' order and findings, lazily

_NAMES = st.text(alphabet=" -.0aA_\u00e9,", min_size=1, max_size=4).filter(lambda s: not s.startswith("."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(_NAMES, min_size=0, max_size=3), _NAMES, st.booleans()), max_size=12))
def test_iter_pngs_walks_in_list_pngs_order(tmp_path_factory, entries):
    root = str(tmp_path_factory.mktemp("walk"))
    for dirs, name, png in entries:
        folder = os.path.join(root, *dirs)
        path = os.path.join(folder, name + (".png" if png else ".txt"))
        if any(os.path.isfile(os.path.join(root, *dirs[: i + 1])) for i in range(len(dirs))) or os.path.isdir(path):
            continue  # a file where a folder should be, or the reverse
        os.makedirs(folder, exist_ok=True)
        open(path, "wb").close()
    full = list_pngs(root)
    listing = Listing(root=root, files=[])
    assert list(iter_pngs(root, listing)) == full.files
    assert sorted(listing.skipped) == full.skipped and sorted(listing.png_folders) == full.png_folders
    assert listing.ignored == full.ignored


# --------------------------------------------------------------------------------------------
# Names that a spreadsheet would run as formulas, or a terminal as escape sequences

FORMULA_CLASSES = ("=SUM(A1)", "@cmd", "'quoted", "\x1b[2Jred\r")  # the last: an escape sequence and a CR
FORMULA_FILES = ("+1.png", "-x.png", "\tt.png", "=HYPERLINK(x).png")  # not under a class folder


def test_formula_like_names_are_escaped_in_every_csv_and_merge_recovers_them(tmp_path):
    from tests.conftest import export_onnx

    model = export_onnx(str(tmp_path / "m.onnx"), classes=FORMULA_CLASSES)
    labeled, root = str(tmp_path / "labeled"), str(tmp_path / "tree")
    rng = np.random.default_rng(1)
    for c, name in enumerate(FORMULA_CLASSES):
        for i in range(6):
            _write(labeled, f"{name}/{i}.png", _image(rng, c))
    shutil.copytree(labeled, root)
    for rel in FORMULA_FILES:
        _write(root, rel, _image(rng, 0))
    _write(root, "=bad.png", b"not a png")  # a failure: the failures CSV is escaped too
    full = str(tmp_path / "full" / "p.csv")
    res = infer(root, model, device="cpu", output=full, progress=False)
    rows = _csv_rows(full)[1:]
    cells = [c for r in rows for c in (r[0], r[1], r[3])]
    assert cells and not [c for c in cells if c.startswith(tuple("=+-@\t\r"))]  # nothing a spreadsheet evaluates
    paths = {r[0]: unescape(r[0]) for r in rows}
    assert paths["'=SUM(A1)/0.png"] == "=SUM(A1)/0.png" and paths["''quoted/0.png"] == "'quoted/0.png"
    assert list(paths.values()) == [f for f in list_pngs(root).files if f != "=bad.png"]  # exact, in order
    assert _csv_rows(full + ".failures.csv")[1] == ["'=bad.png", "not an image (bad signature, looks like text)"]
    # Merging shards reads the cells back to the exact names: in order, checked against the folder.
    shards = []
    for k in range(2):
        shards.append(str(tmp_path / f"s{k}.csv"))
        infer(root, model, device="cpu", output=shards[-1], progress=False, shard=f"{k}/2")
    merged = merge(shards, str(tmp_path / "merged.csv"), check_folder=True)
    assert merged.complete and merged.n_unassigned == merged.n_gone == 0, merged.problems
    for a, b in ((full, merged.output), (full + ".failures.csv", merged.failures_output)):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()
    assert merged.failures == [("=bad.png", "not an image (bad signature, looks like text)")]
    # On the terminal (confusion tables, `error:` lines), the class names' control characters are escaped.
    res = infer(labeled, model, device="cpu", output=str(tmp_path / "l.csv"), progress=False, shard="0/1")
    assert res.confusion is not None
    _write(labeled, "@cmd/late\x1b[2J.png", _image(rng, 1))  # added after the shard ran: a PROBLEM line names it
    merged = merge([res.output], str(tmp_path / "l-merged.csv"), check_folder=True)
    assert merged.unassigned == ["@cmd/late\x1b[2J.png"] and "\x1b" in merged.problems[0]  # raw in the JSON
    assert "PROBLEM" in format_merge(merged) and "@cmd/late\\x1b[2J.png" in format_merge(merged)
    os.rename(os.path.join(labeled, FORMULA_CLASSES[3]), os.path.join(labeled, "elsewhere"))
    error = runner.invoke(app, ["train", labeled, "--classes", ",".join(FORMULA_CLASSES), "--epochs", "1"]).stderr
    assert error.startswith("error: ") and error.count("\n") == 1
    for human in (infer_mod.format_summary(res), format_merge(merged), error):
        assert "\x1b" not in human and "\r" not in human and "\\x1b[2Jred" in human  # (--classes strips the \r)


def _csv_rows(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))
