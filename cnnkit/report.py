"""`cnnkit report RUN`: the run's model card, as one self-contained HTML file and a Markdown twin.

`report.html` needs nothing but itself: styles inline, the run's PNG plots embedded as `data:` URIs,
no scripts, no fonts or links to fetch. `report.md` shows the same tables and points at the PNG files
beside it. Both are built from one document model (`Section`s of paragraphs, `Table`s and `Figure`s),
so they cannot disagree.

Sources, and only these: `metrics.json` (what `cnnkit train` measured: the config, the split
protocol, the history, the test score, skipped files, the most confident mistakes), each artifact's
export report (`<artifact>.parity.json`, `cnnkit.runs.REPORT_SUFFIX`: the model record, the parity
gate, INT8's accuracy gate), the run's plots, and a `cnnkit bench --json` object (run here unless a
saved one is given). Every number goes through `number()`, and each HTML cell that holds one names where
it came from (`data-src="SOURCE#dotted.path"`, SOURCE a key of `ReportResult.sources`): the tests
parse the tables back and compare each cell with its JSON value. Strings from files (class names, paths,
notes) are escaped (`html.escape`) in both files. Torch-free: rendering reads JSON and PNG bytes only.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cnnkit.console import log
from cnnkit.errors import DataError, ModelError
from cnnkit.files import check_not_an_input, check_writable, path_kind, write_json, write_text
from cnnkit.runs import ARTIFACT_NAMES, MISTAKES_NAME, REPORT_SUFFIX, latest_run

HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"
BENCH_NAME = "bench.json"  # the bench `cnnkit report` ran itself, kept beside the report
METRICS_NAME = "metrics.json"
MAX_JSON_BYTES = 64 << 20
MAX_PNG_BYTES = 32 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_LISTED = 25  # rows of the skipped-file and mistake tables
SIGNIFICANT = 6  # digits a float keeps in the report
MISSING = "-"

# --------------------------------------------------------------------------------------------
# The document model


@dataclass
class Cell:
    """One table cell: its text, and for a number the `SOURCE#dotted.path` of the JSON value it shows."""

    text: str
    src: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]


@dataclass
class Figure:
    """A PNG of the run folder: `name` is its file name there, `data` its bytes."""

    name: str
    caption: str
    data: bytes


Part = str | Table | Figure  # a str is a paragraph of plain text


@dataclass
class Section:
    title: str
    parts: list[Part] = field(default_factory=list)


@dataclass
class ReportResult:
    """What `report` wrote.

    Attributes:
        html, markdown: the two files.
        bench: the bench JSON the matrix came from (written here when `report` ran bench), or None.
        sources: the JSON files behind the numbers, by the SOURCE names of the HTML's `data-src`.
        sections: the section titles, in order.
        notes: what is missing from the report, and why.
    """

    html: str
    markdown: str
    bench: str | None
    sources: dict[str, str]
    sections: list[str]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def number(value: Any) -> str:
    """The one way the report writes a JSON value: floats to `SIGNIFICANT` digits, ints exactly,
    None as `-`, booleans as yes/no; anything else as its text."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{SIGNIFICANT}g}"
    return str(value)


def lookup(data: Any, path: str) -> Any:
    """`data`'s value at a dotted path (list items by index); None where the path does not lead."""
    for key in path.split(".") if path else []:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return None
    return data


def cell(source: str, data: Any, path: str) -> Cell:
    """A cell showing `data`'s value at `path`, which came from the JSON named `source`."""
    return Cell(number(lookup(data, path)), f"{source}#{path}")


def text(value: Any) -> Cell:
    """A cell of text (a name, a path, a note): not a measured number."""
    return Cell(MISSING if value is None else str(value))


# --------------------------------------------------------------------------------------------
# Reading the run


def _read_json(path: str, what: str) -> Any:
    kind = path_kind(path)
    if kind != "a file":
        raise DataError(f"{path}: {'no such file' if kind == 'nothing' else 'is ' + kind}; {what}")
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise DataError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e}); {what}") from None


def _png(run_dir: str, name: str, caption: str, notes: list[str]) -> Figure | None:
    """The run's PNG `name` as a figure, or None with a note (absent, not a file, too large, not a PNG)."""
    path = os.path.join(run_dir, name)
    kind = path_kind(path)
    if kind != "a file":
        notes.append(f"{name}: {'not in the run' if kind == 'nothing' else 'is ' + kind}")
        return None
    if os.path.getsize(path) > MAX_PNG_BYTES:
        notes.append(f"{name}: larger than {MAX_PNG_BYTES >> 20} MiB, left out")
        return None
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        notes.append(f"{name}: not a PNG file, left out")
        return None
    return Figure(name, caption, data)


def _export_reports(run_dir: str, notes: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Artifact kind -> (report path, report) for every export report beside the run's artifacts."""
    found = {}
    for kind, name in ARTIFACT_NAMES.items():
        path = os.path.join(run_dir, name + REPORT_SUFFIX)
        if not os.path.lexists(path):
            continue
        try:
            data = _read_json(path, "an export report")
        except DataError as e:
            notes.append(str(e))
            continue
        if isinstance(data, dict):
            found[kind] = (path, data)
        else:
            notes.append(f"{path}: not an export report (no JSON object), left out")
    return found


def _record(reports: dict[str, tuple[str, dict[str, Any]]], run_dir: str) -> tuple[str | None, dict[str, Any]]:
    """The model record (classes, input shape, color): from an export report, else the ONNX file itself;
    (its source name, the record), or (None, {}) when there is neither."""
    for kind, (_, data) in reports.items():
        if isinstance(data.get("meta"), dict):
            return f"export/{kind}", data["meta"]
    onnx = os.path.join(run_dir, ARTIFACT_NAMES["onnx"])
    if path_kind(onnx) == "a file":
        from cnnkit.runtime.session import read_meta

        try:
            return None, read_meta(onnx).to_dict()
        except Exception:  # a foreign file: the card then says the record is unknown
            return None, {}
    return None, {}


def _load_bench(bench_file: str) -> dict[str, Any]:
    data = _read_json(bench_file, "expected the output of `cnnkit bench --json`")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise DataError(f"{bench_file}: no `rows` list: not the output of `cnnkit bench --json`")
    if not all(isinstance(r, dict) for r in data["rows"]):
        raise DataError(f"{bench_file}: a row that is not a JSON object: not the output of `cnnkit bench --json`")
    return data


# --------------------------------------------------------------------------------------------
# The sections


def _kv(rows: Sequence[tuple[str, Cell]]) -> Table:
    return Table(["", "value"], [[Cell(k), v] for k, v in rows])


def _model_section(run_name: str, metrics: dict[str, Any], record: tuple[str | None, dict[str, Any]]) -> Section:
    """What the model is: arch, classes, input, and the one test score."""
    meta = record[1]
    classes = meta.get("classes") if isinstance(meta.get("classes"), list) else None
    shape = meta.get("input_shape")
    rows = [
        ("run", text(run_name)),
        ("arch", text(meta.get("arch") or lookup(metrics, "config.arch"))),
        ("classes", text(None if classes is None else ", ".join(map(str, classes)))),
        ("input (channels x height x width)", text(" x ".join(map(str, shape)) if isinstance(shape, list) else None)),
        ("color", text(meta.get("color"))),
        ("resize rule", text(meta.get("resize"))),
        ("output", text(meta.get("output"))),
        ("test accuracy (0..1, testing/ once)", cell("metrics", metrics, "test_accuracy")),
        ("test loss", cell("metrics", metrics, "test_loss")),
        ("test images", cell("metrics", metrics, "test_images")),
    ]
    where = "an export report's model record" if record[0] else "the ONNX file's record" if meta else "no model record"
    return Section("Model", [f"Classes, input and color from {where}; scores from metrics.json.", _kv(rows)])


def _data_section(metrics: dict[str, Any]) -> Section:
    """The data and the split protocol: who selects the checkpoint, who measures it, what was skipped."""
    m = "metrics"
    rows = [
        ("data folder", text(lookup(metrics, "config.data"))),
        ("checkpoint selected on", text(lookup(metrics, "selection.split") or "nothing (no validation split)")),
        ("validation carved from", text(lookup(metrics, "selection.source"))),
        ("validation images", cell(m, metrics, "selection.size")),
        ("selection rule", text(lookup(metrics, "selection.rule"))),
        ("selected epoch", cell(m, metrics, "selection.epoch")),
        ("validation accuracy (0..1) at that epoch", cell(m, metrics, "selection.val_accuracy")),
        ("validation loss at that epoch", cell(m, metrics, "selection.val_loss")),
        ("testing images, measured once on the selected weights", cell(m, metrics, "test_images")),
        ("images loaded (all splits)", cell(m, metrics, "images_loaded")),
        ("files skipped (unreadable, wrong size, ...)", cell(m, metrics, "n_skipped")),
        ("epochs", cell(m, metrics, "config.epochs")),
        ("batch size", cell(m, metrics, "config.batch_size")),
        ("learning rate", cell(m, metrics, "config.lr")),
        ("augmentation", text(lookup(metrics, "config.augment"))),
        ("seed", cell(m, metrics, "config.seed")),
        ("processes (world size)", cell(m, metrics, "world_size")),
    ]
    parts: list[Part] = [
        "Validation carved from training/ selects the checkpoint; testing/ is evaluated once, on the "
        "selected weights, and never used to choose anything.",
        _kv(rows),
    ]
    skipped = lookup(metrics, "skipped")
    if isinstance(skipped, list) and skipped:
        shown = skipped[:MAX_LISTED]
        parts.append(f"The first {len(shown)} skipped files:")
        parts.append(
            Table(
                ["split", "path", "reason"],
                [[text(lookup(s, k)) for k in ("split", "path", "reason")] for s in shown],
            )
        )
    return Section("Data and split protocol", parts)


HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def _training_section(run_dir: str, metrics: dict[str, Any], notes: list[str]) -> Section:
    """The curves and label-vs-score plots the run drew, and the history table behind them."""
    parts: list[Part] = []
    curves = _png(run_dir, "curves.png", "Loss and accuracy per epoch (the selected epoch dashed)", notes)
    if curves:
        parts.append(curves)
    for split in ("training", "validation", "testing"):
        fig = _png(run_dir, f"scores_{split}.png", f"Scores against labels, {split}", notes)
        if fig:
            parts.append(fig)
    history = lookup(metrics, "history")
    if isinstance(history, list):
        rows = [[cell("metrics", metrics, f"history.{i}.{k}") for k in HISTORY_KEYS] for i in range(len(history))]
        parts.append(Table(list(HISTORY_KEYS), rows))
    return Section("Training", parts or ["No curves or history in this run."])


def _confusion_section(run_dir: str, notes: list[str]) -> Section:
    fig = _png(run_dir, "confusion.png", "Confusion matrix (testing/, else validation)", notes)
    return Section("Confusion matrix", [fig] if fig else ["No confusion.png in this run."])


MISTAKE_KEYS = ("path", "true", "predicted", "score")


def _mistakes_section(run_dir: str, metrics: dict[str, Any], notes: list[str]) -> Section:
    """The most confident wrong predictions: the grid and the list, when the run recorded them."""
    listed = lookup(metrics, "mistakes")
    fig = (
        _png(run_dir, MISTAKES_NAME, "The most confident mistakes", notes)
        if os.path.lexists(os.path.join(run_dir, MISTAKES_NAME))
        else None
    )
    if not isinstance(listed, list) and fig is None:
        return Section("Most confident mistakes", ["This run recorded none (trained before cnnkit kept them)."])
    parts: list[Part] = [
        f"Found on {lookup(metrics, 'mistakes_split') or 'an unrecorded split'}; score is the "
        "predicted class's probability."
    ]
    if fig:
        parts.append(fig)
    if isinstance(listed, list):
        rows = [
            [text(lookup(listed, f"{i}.{k}")) for k in MISTAKE_KEYS[:3]]
            + [cell("metrics", metrics, f"mistakes.{i}.score")]
            for i in range(min(len(listed), MAX_LISTED))
        ]
        parts.append(Table(list(MISTAKE_KEYS), rows) if rows else "No wrong predictions.")
    return Section("Most confident mistakes", parts)


PARITY_COLUMNS = (
    ("precision", "precision"),
    ("exporter", "exporter"),
    ("opset", "opset"),
    ("bytes", "info.bytes"),
    ("verified on", "verified_on"),
    ("gate passed", "parity.passed"),
    ("max |diff|", "parity.max_abs_diff"),
    ("mean |diff|", "parity.mean_abs_diff"),
    ("tolerance", "parity.tolerance"),
    ("argmax agreement (0..1)", "parity.argmax_agreement"),
    ("images", "parity.n_images"),
    ("INT8 accuracy (0..1)", "accuracy.int8_accuracy"),
    ("fp32 accuracy (0..1)", "accuracy.fp32_accuracy"),
    ("INT8 drop (points)", "accuracy.drop_points"),
)
TEXT_KEYS = {"precision", "exporter", "verified_on"}


def _parity_section(reports: dict[str, tuple[str, dict[str, Any]]]) -> Section:
    """Each artifact's export gate, from the report `cnnkit export` wrote beside it."""
    if not reports:
        return Section("Parity per format", ["No export reports in this run (`cnnkit export` writes them)."])
    rows = []
    for kind, (path, data) in reports.items():
        src = f"export/{kind}"
        rows.append(
            [text(os.path.basename(path).removesuffix(REPORT_SUFFIX))]
            + [text(lookup(data, k)) if k in TEXT_KEYS else cell(src, data, k) for _, k in PARITY_COLUMNS]
        )
    intro = (
        "The gate each file passed before `cnnkit export` wrote it: outputs against the eager model on the "
        "same images (INT8: against the fp32 graph it was quantized from, and an accuracy gate on testing/)."
    )
    return Section("Parity per format", [intro, Table(["file", *[h for h, _ in PARITY_COLUMNS]], rows)])


BENCH_TEXT = (("artifact", "artifact"), ("runtime", "runtime"), ("device", "device"), ("precision", "precision"))
BENCH_NUMBERS = (
    ("bytes", "bytes"),
    ("accuracy (0..1)", "accuracy"),
    ("Δ accuracy vs eager (points)", "accuracy_change"),
    ("agreement with eager (0..1)", "argmax_agreement"),
    ("max |diff| vs eager", "max_abs_diff"),
    ("p50 ms, batch 1", "p50_ms"),
    ("p95 ms, batch 1", "p95_ms"),
    ("p99 ms, batch 1", "p99_ms"),
    ("img/s at --batch-size", "images_per_second"),
    ("best batch", "best_batch"),
    ("img/s at best batch", "best_images_per_second"),
    ("cold start ms (spawn to first prediction)", "cold_start_ms"),
    ("peak memory MiB (cold-start process)", "peak_rss_mb"),
)


def _bench_section(bench: dict[str, Any] | None, why_none: str) -> Section:
    """The format x backend x precision matrix of a `cnnkit bench --json` object."""
    if bench is None:
        return Section("Benchmark", [why_none])
    rows = []
    for i, row in enumerate(bench["rows"]):
        rows.append(
            [text(row.get(k)) for _, k in BENCH_TEXT]
            + [cell("bench", bench, f"rows.{i}.{k}") for _, k in BENCH_NUMBERS]
            + [text(row.get("error") or row.get("cold_start_error") or "")]
        )
    setup = [
        ("run", text(bench.get("run_dir"))),
        ("images", cell("bench", bench, "n_images")),
        ("from", text(bench.get("data"))),
        ("intra-op threads", cell("bench", bench, "threads")),
        ("--batch-size", cell("bench", bench, "batch_size")),
        ("batch sizes tried for the best batch", text(", ".join(map(str, bench.get("throughput_batches") or [])))),
        ("timed batch-1 calls per row (p50/p95/p99)", cell("bench", bench, "latency_calls")),
        ("untimed warm-up calls before them", cell("bench", bench, "latency_warmup")),
        ("cold-start processes per ONNX row", cell("bench", bench, "cold_starts")),
        ("diffs against", text(bench.get("reference"))),
        ("versions", text(", ".join(f"{k} {v}" for k, v in (bench.get("versions") or {}).items()))),
        ("bench wall time, s", cell("bench", bench, "seconds")),
    ]
    headers = [h for h, _ in BENCH_TEXT] + [h for h, _ in BENCH_NUMBERS] + ["error"]
    parts: list[Part] = [
        "Rows ran one after another in one process: compare rows of this table, not with other machines.",
        _kv(setup),
        Table(headers, rows),
    ]
    parts += [f"Note: {n}" for n in bench.get("notes") or [] if isinstance(n, str)]
    return Section("Benchmark", parts)


# --------------------------------------------------------------------------------------------
# Rendering

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;
color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:.8em 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.wide{overflow-x:auto}
"""


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _html_part(part: Part) -> str:
    if isinstance(part, str):
        return f"<p>{_e(part)}</p>"
    if isinstance(part, Figure):
        uri = "data:image/png;base64," + base64.b64encode(part.data).decode("ascii")
        return f'<figure><img src="{uri}" alt="{_e(part.caption)}"><figcaption>{_e(part.caption)}</figcaption></figure>'
    head = "".join(f"<th>{_e(h)}</th>" for h in part.headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n" data-src="{_e(c.src)}">{_e(c.text)}</td>' if c.src else f"<td>{_e(c.text)}</td>"
            for c in row
        )
        + "</tr>"
        for row in part.rows
    )
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render_html(title: str, sections: list[Section]) -> str:
    """The whole page: inline style, images as data: URIs, nothing to fetch, every string escaped."""
    body = "\n".join(
        f"<section><h2>{_e(s.title)}</h2>\n" + "\n".join(_html_part(p) for p in s.parts) + "\n</section>"
        for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
        f"{body}\n</body>\n</html>\n"
    )


def _md(value: str) -> str:
    """Markdown text, HTML escaped: Markdown passes raw HTML through (quotes need no escaping outside tags)."""
    return html.escape(value, quote=False)


_MD_SYNTAX = re.compile(r"([\\`*_\[\]!|])")  # emphasis, code, links and images, table pipes


def _md_cell(value: str) -> str:
    """A Markdown table cell: HTML escaped, Markdown syntax backslash-escaped (a class named
    `![x](http://...)` must not become an image a viewer fetches), newlines defused."""
    return _MD_SYNTAX.sub(r"\\\1", _md(value)).replace("\n", " ").replace("\r", " ") or " "


def _md_part(part: Part) -> str:
    if isinstance(part, str):
        return _md(part)
    if isinstance(part, Figure):
        return f"![{_md_cell(part.caption)}]({part.name})"
    lines = ["| " + " | ".join(_md_cell(h) for h in part.headers) + " |", "|" + " --- |" * len(part.headers)]
    lines += ["| " + " | ".join(_md_cell(c.text) for c in row) + " |" for row in part.rows]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    """The twin: the same tables; figures point at the PNG files beside it in the run folder."""
    out = [f"# {_md(title)}"]
    for s in sections:
        out.append(f"## {_md(s.title)}")
        out += [_md_part(p) for p in s.parts]
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# The command


def _run_folder(run: str | None) -> str:
    run_dir = run if run is not None else latest_run()
    if not os.path.isdir(run_dir):
        kind = path_kind(run_dir)
        raise ModelError(
            f"{run_dir}: {'no such run folder' if kind == 'nothing' else 'is ' + kind + ', not a run folder'}"
        )
    if not os.path.lexists(os.path.join(run_dir, METRICS_NAME)):
        raise ModelError(f"{run_dir}: no {METRICS_NAME}: not a finished `cnnkit train` run")
    return run_dir


def _bench_for(
    run_dir: str, bench_file: str | None, run_bench: bool, options: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None, str]:
    """(the bench object, the file it is in, why there is none): the given file, else a fresh bench
    written to `<run>/bench.json`, else none (`run_bench` False)."""
    if bench_file is not None:
        return _load_bench(bench_file), bench_file, ""
    if not run_bench:
        return None, None, "Not measured (--no-bench); pass --bench FILE with a saved `cnnkit bench --json`."
    from cnnkit.bench import bench

    data = bench(run=run_dir, **options).to_dict()
    path = os.path.join(run_dir, BENCH_NAME)
    write_json(path, data)
    return data, path, ""


def report(
    run: str | None = None,
    bench_file: str | None = None,
    run_bench: bool = True,
    bench_options: dict[str, Any] | None = None,
) -> ReportResult:
    """Write `report.html` and `report.md` into the run folder: the run's model card.

    Args:
        run: the run folder (default `runs/latest`); it must hold the metrics.json of a finished training.
        bench_file: a saved `cnnkit bench --json` output for the benchmark matrix; without it `bench` runs
            here (`bench_options` are its keyword arguments) and its JSON is kept as `<run>/bench.json`.
        run_bench: False: no benchmark section numbers (the section says so).

    Raises:
        ModelError: no run folder, or no metrics.json in it.
        DataError: an unreadable metrics.json or bench file, or an output that cannot be written (a folder,
            FIFO or device where the report goes, or one of the report's own inputs).
    """
    run_dir = _run_folder(run)
    outputs = [os.path.join(run_dir, n) for n in (HTML_NAME, MARKDOWN_NAME)]
    if bench_file is None and run_bench:
        outputs.append(os.path.join(run_dir, BENCH_NAME))
    metrics_path = os.path.join(run_dir, METRICS_NAME)
    mine = {HTML_NAME, MARKDOWN_NAME, BENCH_NAME}  # what an earlier report wrote: replaced, not read
    inputs = [metrics_path, *(os.path.join(run_dir, n) for n in os.listdir(run_dir) if n not in mine)]
    check_not_an_input(outputs, [*inputs, *([bench_file] if bench_file else [])])
    for out in outputs:
        check_writable(out)
    metrics = _read_json(metrics_path, "expected the metrics.json `cnnkit train` writes")
    if not isinstance(metrics, dict):
        raise DataError(f"{metrics_path}: not a JSON object: not the metrics.json `cnnkit train` writes")
    bench, bench_path, why = _bench_for(run_dir, bench_file, run_bench, bench_options or {})
    notes: list[str] = []
    reports = _export_reports(run_dir, notes)
    sections = _sections(run_dir, metrics, reports, bench, why, notes)
    title = f"Model card: {os.path.basename(os.path.realpath(run_dir))}"
    write_text(outputs[0], render_html(title, sections))
    write_text(outputs[1], render_markdown(title, sections))
    log(f"report: wrote {outputs[0]} and {outputs[1]}")
    sources = {"metrics": metrics_path, **{f"export/{k}": p for k, (p, _) in reports.items()}}
    if bench_path:
        sources["bench"] = bench_path
    return ReportResult(outputs[0], outputs[1], bench_path, sources, [s.title for s in sections], notes)


def _sections(
    run_dir: str,
    metrics: dict[str, Any],
    reports: dict[str, tuple[str, dict[str, Any]]],
    bench: dict[str, Any] | None,
    why_no_bench: str,
    notes: list[str],
) -> list[Section]:
    """The card's sections in order; `notes` collects what is missing (listed last, when anything is)."""
    sections = [
        _model_section(os.path.basename(os.path.realpath(run_dir)), metrics, _record(reports, run_dir)),
        _data_section(metrics),
        _training_section(run_dir, metrics, notes),
        _confusion_section(run_dir, notes),
        _mistakes_section(run_dir, metrics, notes),
        _parity_section(reports),
        _bench_section(bench, why_no_bench),
    ]
    if notes:
        sections.append(Section("Notes", list(notes)))
    return sections
