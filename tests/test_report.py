"""`cnnkit report RUN`: a self-contained, valid, escaped HTML model card whose every number is its JSON's,
its Markdown twin, and the latency / cold-start columns `cnnkit bench` gained for it."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

import cnnkit  # noqa: E402
from cnnkit.cli import app  # noqa: E402
from cnnkit.errors import DataError  # noqa: E402
from cnnkit.export import export  # noqa: E402
from cnnkit.report import PNG_SIGNATURE, lookup, number, report  # noqa: E402

runner = CliRunner()
EVIL = '<script>alert("x")&'  # a class folder name; "/" cannot be in one
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "source", "area", "base", "embed", "track"}
FAST_BENCH = {"device": "cpu", "limit": 24, "latency_calls": 30, "throughput_batches": (8,), "cold_starts": 1}


class StrictParser(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element, or on elements left open."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.cells: list[tuple[str | None, str]] = []  # (data-src, text) of every td, in order
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self._src: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag in VOID:
            return
        self.open.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._src = [], a.get("data-src")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:] or 'nothing'}"
        self.open.pop()
        if tag in ("td", "th"):
            assert self._cell is not None
            self.tables[-1][-1].append("".join(self._cell))
            if tag == "td":
                self.cells.append((self._src, "".join(self._cell)))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> StrictParser:
    p = StrictParser()
    p.feed(text)
    p.close()
    assert not p.open, f"left open: {p.open}"
    return p


def test_the_strict_parser_fails_on_unbalanced_tags() -> None:
    with pytest.raises(AssertionError):
        parse("<html><body><table><tr><td>1</tr></table></body></html>")
    with pytest.raises(AssertionError):
        parse("<html><body><p>open")
    parse('<html><body><img src="x"><p>ok</p></body></html>')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tree) -> str:
    """A trained run (1 epoch) on digits whose classes are ant, bee and EVIL, exported to ONNX and INT8."""
    root = tmp_path_factory.mktemp("report")
    data = str(root / "data")
    shutil.copytree(tiny_tree, data)
    for split in ("training", "testing"):
        for old, new in (("0", "ant"), ("1", "bee"), ("2", EVIL)):
            os.rename(os.path.join(data, split, old), os.path.join(data, split, new))
    out = str(root / "run")
    cnnkit.train(data, out=out, epochs=1, workers=0)
    ckpt = os.path.join(out, "best.pt")
    export(ckpt, exporter="torchscript", n_images=8)
    export(ckpt, quantize="int8", exporter="torchscript", n_images=8, max_accuracy_drop=100, calibration_size=32)
    return out


@pytest.fixture(scope="module")
def written(run_dir):
    """The report with the bench it ran itself."""
    return report(run_dir, bench_options=FAST_BENCH)


def test_bench_gained_latency_percentiles_best_batch_and_cold_start(written) -> None:
    with open(written.bench, encoding="utf-8") as f:
        bench = json.load(f)
    assert bench["latency_calls"] == 30 and bench["latency_warmup"] >= 1 and bench["cold_starts"] == 1
    assert bench["throughput_batches"] == [8, 256]
    rows = {r["artifact"]: r for r in bench["rows"] if r["backend"] != "openvino"}  # cold-started: these
    assert set(rows) == {"eager", "onnx", "onnx-int8"}
    for r in rows.values():
        assert r["error"] is None and r["latency_calls"] == 30
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["best_batch"] in (8, 256) and r["best_images_per_second"] >= r["images_per_second"] > 0
    assert rows["onnx-int8"]["precision"] == "int8" and rows["onnx"]["precision"] == "fp32"
    for kind in ("onnx", "onnx-int8"):  # a fresh process: spawn to answer, its own memory (not this torch process's)
        assert rows[kind]["cold_start_error"] is None, rows[kind]
        assert rows[kind]["cold_start_ms"] > rows[kind]["p50_ms"] and 10 < rows[kind]["peak_rss_mb"] < 1000
    assert rows["eager"]["cold_start_ms"] is None


def test_html_is_valid_self_contained_and_escaped(written) -> None:
    with open(written.html, encoding="utf-8") as f:
        page = f.read()
    parsed = parse(page)
    assert page.startswith("<!DOCTYPE html>")
    for fetch in ("http://", "https://", "<script", "<link", "url(", "@import", 'src="/', "src='"):
        assert fetch not in page.lower(), fetch
    assert len(parsed.images) >= 5  # curves, three score plots, confusion, mistakes
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert html.escape(EVIL) in page and EVIL not in page
    with open(written.markdown, encoding="utf-8") as f:
        md = f.read()
    assert html.escape(EVIL, quote=False) in md and EVIL not in md and "http" not in md
    for name in ("curves.png", "confusion.png", "mistakes.png"):
        assert f"]({name})" in md and os.path.isfile(os.path.join(os.path.dirname(written.html), name))
    assert written.sections[:2] == ["Model", "Data and split protocol"] and "Benchmark" in written.sections


def _numbers(written) -> list[tuple[str, str, object]]:
    """(cell text, data-src, the JSON value it names) for every number cell of the HTML."""
    with open(written.html, encoding="utf-8") as f:
        parsed = parse(f.read())
    loaded = {}
    for name, path in written.sources.items():
        with open(path, encoding="utf-8") as f:
            loaded[name] = json.load(f)
    out = []
    for src, txt in parsed.cells:
        if src is None:
            try:
                float(txt.replace(",", ""))
            except ValueError:
                continue
            raise AssertionError(f"a number without its source: {txt!r}")
        source, _, path = src.partition("#")
        out.append((txt, src, lookup(loaded[source], path)))
    return out


def test_every_number_equals_the_json_it_came_from(written) -> None:
    found = _numbers(written)
    for txt, src, value in found:
        assert txt == number(value), src
        if isinstance(value, float):
            assert float(txt) == pytest.approx(value, rel=1e-5), src
    srcs = {src for _, src, _ in found}
    for needed in (
        "metrics#test_accuracy",
        "metrics#selection.size",
        "metrics#history.0.train_loss",
        "metrics#mistakes.0.score",
        "export/onnx#parity.max_abs_diff",
        "export/onnx-int8#accuracy.int8_accuracy",
        "bench#rows.1.p99_ms",
        "bench#rows.1.cold_start_ms",
        "bench#rows.1.peak_rss_mb",
        "bench#rows.2.best_images_per_second",
    ):
        assert needed in srcs, needed
    values = {src: v for _, src, v in found}
    assert values["metrics#images_loaded"] == 240  # 3 classes x (60 training + 20 testing)


def test_markdown_twin_has_the_same_tables(written) -> None:
    with open(written.html, encoding="utf-8") as f:
        tables = parse(f.read()).tables
    with open(written.markdown, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("|") and not ln.startswith("| ---")]
    rows = [
        [html.unescape(re.sub(r"\\(.)", r"\1", c.strip())) for c in ln.strip("|").split(" | ")]
        for ln in lines
        if not set(ln) <= set("|- ")
    ]
    assert rows == [[c.strip() for c in r] for t in tables for r in t]


def test_cli_saved_bench_no_bench_and_absent_mistakes(run_dir, written, tmp_path) -> None:
    with pytest.raises(DataError, match="is an input"):  # --bench FILE is read, never written over
        report(run_dir, bench_file=os.path.join(run_dir, "report.md"))
    res = runner.invoke(app, ["report", run_dir, "--bench", written.bench, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {"html", "markdown", "bench", "sources", "sections", "notes"} <= set(d) and d["bench"] == written.bench

    bare = tmp_path / "bare"  # a run without mistakes (recorded before they were), exports or bench
    bare.mkdir()
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    for key in ("mistakes", "mistakes_split", "mistakes_png"):
        metrics.pop(key)
    (bare / "metrics.json").write_text(json.dumps(metrics))
    res = runner.invoke(app, ["report", str(bare), "--no-bench", "--json"])
    assert res.exit_code == 0, res.output
    page = (bare / "report.html").read_text()
    parse(page)
    assert "recorded none" in page and "--no-bench" in page and "curves.png: not in the run" in page

    os.remove(bare / "report.html")
    (bare / "report.html").mkdir()  # never written over anything but a regular file
    with pytest.raises(DataError, match="is a folder"):
        report(str(bare), run_bench=False)
    res = runner.invoke(app, ["report", str(bare), "--bench", written.bench, "--no-bench"])
    assert res.exit_code != 0 and "contradict" in res.stderr


def test_rendering_needs_no_torch(run_dir, written, tmp_path) -> None:
    """The card renders from JSON and PNG bytes: with torch unimportable, the same page as with it."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("report.*", "bench.json"))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from cnnkit.report import report\n"
        f"report({str(out)!r}, bench_file={written.bench!r})\n"
        "assert sys.modules.get('torch') is None and 'onnx' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with open(written.html, encoding="utf-8") as f:
        mine = f.read()
    theirs = (out / "report.html").read_text()
    assert theirs.replace(str(out), run_dir) == mine.replace(os.path.basename(str(out)), os.path.basename(run_dir))


def test_report_runs_again_over_its_own_files(run_dir, written) -> None:
    again = report(run_dir, bench_options={**FAST_BENCH, "cold_starts": 0})
    assert again.html == written.html and again.bench == os.path.join(run_dir, "bench.json")
    with open(again.bench, encoding="utf-8") as f:
        assert json.load(f)["cold_starts"] == 0


def test_markdown_cells_cannot_become_links_or_images() -> None:
    from cnnkit.report import _md_cell

    assert _md_cell("![x](http://e/a.png)") == "\\!\\[x\\](http://e/a.png)"
    assert _md_cell("a|b_c") == "a\\|b\\_c"
