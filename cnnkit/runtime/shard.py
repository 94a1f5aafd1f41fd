"""Sharded inference: `cnnkit infer DIR --shard K/N` on N machines, then `cnnkit merge`. Torch-free.

A file's shard is a hash of its path relative to DIR (the CSV's `path` column):

    shard = int.from_bytes(blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8), "big") % N

so every shard lists the same folder and keeps its own 1/N of it, with no coordination and no shared
file list; a file keeps its shard when files are added or removed (as long as N stays the same), and
the assignment does not depend on the machine, the Python version or `PYTHONHASHSEED`. K counts from
0 (`0/8` .. `7/8`), as Slurm array ids from `--array=0-7` and Kubernetes `JOB_COMPLETION_INDEX` do.

Each shard writes its predictions CSV (the rows of its files, in the unsharded run's order) and, next
to it, `<csv>.json`: a small summary with its counts, confusion matrix, failures, the model's SHA-256,
the folder and K/N. `merge` checks that the shards belong together (same model bytes, folder, N),
merges the rows into the order of an unsharded run (so the merged CSV is byte for byte the file one
`cnnkit infer DIR` would write), adds up the counts, and reports missing shards, files in two shards
and, with `check_folder`, files of the folder in no shard's output.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cnnkit.confusion import Confusion, summary_lines, top_pairs
from cnnkit.console import printable, table
from cnnkit.csvcells import escape, unescape
from cnnkit.errors import DataError
from cnnkit.files import atomic_path, check_not_an_input, check_outside, check_writable, write_json
from cnnkit.listing import Listing, iter_pngs
from cnnkit.runtime.outputs import (
    CSV_COLUMNS,
    FAILURE_COLUMNS,
    FAILURES_KEPT,
    FAILURES_SUFFIX,
    failures_path,
    summary_path,
)

ASSIGNMENT = "blake2b-64(utf-8 relative path) mod N"
SHARD_KIND = "cnnkit-infer-shard"
MERGED_KIND = "cnnkit-infer-merged"
SUMMARY_VERSION = 1  # of the merged summary
# 2: the shard summary records the SHA-256 and row count of the shard's CSVs (`csv`, `failures_csv`),
# and merge refuses a CSV that no longer matches; a version-1 summary has nothing to check against.
SHARD_SUMMARY_VERSION = 2
MAX_SUMMARY_BYTES = 64 << 20  # a summary is small (1,000 failures, a k x k matrix); refuse before parsing
LISTED = 20  # paths listed per kind of problem (all are counted)


class ShardError(DataError):
    """A --shard value, or shard outputs that cannot be merged as given."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def contains(self, rel: str) -> bool:
        return self.count == 1 or shard_of(rel, self.count) == self.index

    @property
    def default_output(self) -> str:
        return f"predictions.shard-{self.index}-of-{self.count}.csv"


_SHARD_RE = re.compile(r"\s*(-?\d*)\s*/\s*(-?\d*)\s*")


def parse_shard(text: str) -> Shard:
    """`"K/N"` -> Shard(K, N), with a one-line error that says what is wrong."""
    m = _SHARD_RE.fullmatch(text)
    hint = "--shard takes K/N with K counted from 0: 0/8 .. 7/8 for 8 shards"
    if m is None:
        raise ShardError(f"{hint} (got {text!r})")
    k, n = m.groups()
    if not k:
        raise ShardError(f"{hint} (got {text!r}: K is empty, is the variable that sets it unset?)")
    if not n:
        raise ShardError(f"{hint} (got {text!r}: N is empty)")
    index, count = int(k), int(n)
    if count < 1:
        raise ShardError(f"{hint} (got {text!r}: N must be at least 1)")
    if index == count:
        raise ShardError(
            f"{hint} (got {text!r}: the last of {count} shards is {count - 1}/{count}; "
            "for 1-based array ids pass $((ID - 1))/N)"
        )
    if not 0 <= index < count:
        raise ShardError(f"{hint} (got {text!r}: K must be between 0 and {count - 1})")
    return Shard(index, count)


def shard_of(rel: str, count: int) -> int:
    """The shard (0 .. count-1) of a file, from its relative "/"-separated path."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


class ShardFilter:
    """Iterate over the files of one shard, counting every file seen (`n_seen`)."""

    def __init__(self, files: Iterable[str], shard: Shard):
        self.files, self.shard, self.n_seen = files, shard, 0

    def __iter__(self) -> Iterator[str]:
        if self.shard.count == 1:
            for rel in self.files:
                self.n_seen += 1
                yield rel
            return
        blake2b, count, index = hashlib.blake2b, self.shard.count, self.shard.index
        for rel in self.files:
            self.n_seen += 1
            if (
                int.from_bytes(blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") % count
                == index
            ):
                yield rel


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_shard_summary(result: Any, folder: str, shard: Shard, n_listed: int) -> str:
    """Write `<result.output>.json` for a shard run (`result` is an `InferResult`); return its path."""
    path = summary_path(result.output)
    write_json(
        path,
        {
            "kind": SHARD_KIND,
            "version": SHARD_SUMMARY_VERSION,
            "assignment": ASSIGNMENT,
            "shard": {"index": shard.index, "count": shard.count},
            "folder": os.path.abspath(folder),
            "model": os.path.abspath(result.model),
            "model_sha256": file_sha256(result.model),
            "classes": list(result.classes),
            "output": os.path.basename(result.output),
            "n_listed": n_listed,
            "n_images": result.n_images,
            "n_failed": result.n_failed,
            "n_converted": result.n_converted,
            "accuracy": result.accuracy,
            "confusion": result.confusion,
            "n_correct": result.n_correct,
            "confused_pairs": result.confused_pairs,
            "failures": [{"path": p, "reason": r} for p, r in result.failures],
            "provider": result.provider,
            "seconds": round(result.seconds, 4),
            "host": socket.gethostname(),
            "csv": _file_record(result.output, result.n_images),
            "failures_csv": _file_record(result.failures_output, result.n_failed) if result.failures_output else None,
        },
    )
    return path


def _file_record(path: str, rows: int) -> dict[str, Any]:
    """What merge checks a shard's CSV against: its bytes' SHA-256 and its data rows."""
    return {"sha256": file_sha256(path), "rows": rows}


# --------------------------------------------------------------------------------------------
# Merging


@dataclass
class MergeResult:
    """What `merge` found and wrote.

    Attributes:
        output, summary: the merged CSV and its summary (`<output>.json`).
        failures_output: `<output>.failures.csv`, the failed files of all shards (when any failed).
        count: N, the number of shards of the run.
        present, missing: shard indices given and not given.
        inputs: the shard CSVs, in shard order.
        n_images: rows in the merged CSV (one per file, duplicates dropped).
        n_failed, n_converted, accuracy, confusion: added up from the shard summaries.
        duplicates: files found in more than one shard (first `LISTED`), `n_duplicates` all of them.
        unassigned: with `check_folder`, files of the folder in no output although their shard was
            given (first `LISTED`; `n_unassigned` all), `gone`: files in an output no longer in the
            folder, `n_in_missing_shards`: files of the folder that belong to the missing shards.
        problems: one line each; empty when the merge is complete.
    """

    output: str
    summary: str
    failures_output: str
    count: int
    present: list[int]
    missing: list[int]
    inputs: list[str]
    model: str
    model_sha256: str
    folder: str
    classes: list[str]
    n_images: int = 0
    n_failed: int = 0
    n_converted: int = 0
    accuracy: float | None = None
    confusion: list[list[int]] | None = None
    confused_pairs: list[list[int]] | None = None  # instead of `confusion` past MAX_MATRIX_CLASSES classes
    failures: list[tuple[str, str]] = field(default_factory=list)
    n_duplicates: int = 0
    duplicates: list[str] = field(default_factory=list)
    checked_folder: bool = False
    n_unassigned: int = 0
    unassigned: list[str] = field(default_factory=list)
    n_gone: int = 0
    gone: list[str] = field(default_factory=list)
    n_in_missing_shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": MERGED_KIND,
            "version": SUMMARY_VERSION,
            "complete": self.complete,
            "problems": list(self.problems),
            "output": self.output,
            "summary": self.summary,
            "failures_output": self.failures_output if self.n_failed else None,
            "shards": {"count": self.count, "present": self.present, "missing": self.missing},
            "inputs": list(self.inputs),
            "model": self.model,
            "model_sha256": self.model_sha256,
            "folder": self.folder,
            "classes": list(self.classes),
            "n_images": self.n_images,
            "n_failed": self.n_failed,
            "n_converted": self.n_converted,
            "accuracy": self.accuracy,
            "confusion": self.confusion,
            "top_confused": top_pairs(self.classes, self.confused_pairs) if self.confused_pairs is not None else None,
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "n_duplicates": self.n_duplicates,
            "duplicates": list(self.duplicates),
            "checked_folder": self.checked_folder,
            "n_unassigned": self.n_unassigned,
            "unassigned": list(self.unassigned),
            "n_gone": self.n_gone,
            "gone": list(self.gone),
            "n_in_missing_shards": self.n_in_missing_shards,
        }


def _load_summary(csv_path: str) -> dict[str, Any]:
    """The summary next to a shard CSV, checked field by field (`_check_summary`)."""
    path = summary_path(csv_path)
    if not os.path.isfile(csv_path):
        raise ShardError(f"{csv_path}: no such file")
    summary = _read_summary_json(csv_path, path)
    kind = summary.get("kind") if isinstance(summary, dict) else None
    if kind == MERGED_KIND:
        raise ShardError(f"{csv_path}: this is a merged output, not a shard's; leave it out")
    if kind != SHARD_KIND:
        raise ShardError(f"{path}: not a summary of `cnnkit infer --shard`")
    if summary.get("version") == 1:
        raise ShardError(
            f"{path}: written by an older cnnkit that did not record the CSV's SHA-256, so an "
            f"edited CSV would go unnoticed; re-run that shard (`cnnkit infer DIR --shard K/N`)"
        )
    if summary.get("version") != SHARD_SUMMARY_VERSION:
        raise ShardError(
            f"{path}: summary version {summary.get('version')!r}, this cnnkit reads "
            f"version {SHARD_SUMMARY_VERSION}; merge with the cnnkit that ran the shards"
        )
    _check_summary(path, summary)
    return summary


def _read_summary_json(csv_path: str, path: str) -> Any:
    """The parsed JSON of a summary: a regular file under `MAX_SUMMARY_BYTES`, not nested too deep."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ShardError(f"{path}: not a regular file, so not a shard summary")  # a FIFO would block
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SUMMARY_BYTES + 1)
    except FileNotFoundError:
        raise ShardError(
            f"{csv_path}: no summary {path} next to it; is it the output of "
            "`cnnkit infer --shard K/N` (did that run finish)?"
        ) from None
    except OSError as e:
        raise ShardError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_SUMMARY_BYTES:
        raise ShardError(f"{path}: over {MAX_SUMMARY_BYTES >> 20} MB, too large for a shard summary")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:  # json's own limit on nesting, reached long before any real summary's
        raise ShardError(f"{path}: nested too deeply to be a shard summary") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ShardError(f"{path}: not a readable summary ({e})") from None


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_record(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("sha256"), str)
        and bool(_HEX64.fullmatch(v["sha256"]))
        and _is_count(v.get("rows"))
    )


def _is_shard(v: Any) -> bool:
    return isinstance(v, dict) and _is_count(v.get("count")) and _is_count(v.get("index")) and v["index"] < v["count"]


def _is_fraction(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)


def _is_failures(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("reason"), str) for f in v
    )


# What merge reads from a shard summary, and what each must be.
_SUMMARY_FIELDS: dict[str, tuple[Any, str]] = {
    "assignment": (lambda v: isinstance(v, str), "a string"),
    "shard": (_is_shard, "{index, count} with 0 <= index < count"),
    "folder": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "model_sha256": (lambda v: isinstance(v, str) and bool(_HEX64.fullmatch(v)), "64 hex digits"),
    "classes": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v),
        "a list of class names",
    ),
    "n_listed": (_is_count, "a count"),
    "n_images": (_is_count, "a count"),
    "n_failed": (_is_count, "a count"),
    "n_converted": (_is_count, "a count"),
    "accuracy": (_is_fraction, "null or a fraction"),
    "confusion": (lambda v: v is None or isinstance(v, list), "null or a matrix"),
    "failures": (_is_failures, "a list of {path, reason}"),
    "csv": (_is_record, "{sha256, rows}"),
    "failures_csv": (lambda v: v is None or _is_record(v), "null or {sha256, rows}"),
}


def _check_summary(path: str, s: dict[str, Any]) -> None:
    """Refuse a summary whose fields merge cannot use, in one line that names the first bad one."""

    def bad(what: str) -> ShardError:
        return ShardError(f"{path}: malformed shard summary: {what}; re-run that shard")

    for key, (valid, want) in _SUMMARY_FIELDS.items():
        if key not in s:
            raise bad(f"no {key!r}")
        if not valid(s[key]):
            raise bad(f"{key!r} must be {want}")
    k, confusion = len(s["classes"]), s["confusion"]
    if confusion is not None and not (
        len(confusion) == k
        and all(isinstance(row, list) and len(row) == k and all(map(_is_count, row)) for row in confusion)
    ):
        raise bad(f"'confusion' must be {k} x {k} counts, one row and column per class")
    pairs, n_correct = s.get("confused_pairs"), s.get("n_correct")  # written past MAX_MATRIX_CLASSES classes
    if n_correct is not None and not (_is_count(n_correct) and n_correct <= s["n_images"]):
        raise bad("'n_correct' must be a count no larger than 'n_images'")
    if pairs is not None and not (
        isinstance(pairs, list)
        and all(isinstance(p, list) and len(p) == 3 and all(map(_is_count, p)) and p[0] < k and p[1] < k for p in pairs)
    ):
        raise bad(f"'confused_pairs' must be [true, predicted, count] triples of class indices below {k}")
    if s["csv"]["rows"] != s["n_images"]:
        raise bad(f"'csv' has {s['csv']['rows']} rows but 'n_images' is {s['n_images']}")
    failures_rows = 0 if s["failures_csv"] is None else s["failures_csv"]["rows"]
    if failures_rows != s["n_failed"]:
        raise bad(f"'failures_csv' has {failures_rows} rows but 'n_failed' is {s['n_failed']}")


def _verify_csvs(csv_path: str, s: dict[str, Any], failures_csv: str) -> None:
    """Refuse a shard CSV, or its failure list, whose bytes differ from what its summary recorded."""
    label = f"shard {s['shard']['index']}/{s['shard']['count']}"
    _verify_file(csv_path, s["csv"], label)
    if s["failures_csv"] is not None:
        _verify_file(failures_csv, s["failures_csv"], label)


def _verify_file(path: str, record: dict[str, Any], label: str) -> None:
    rerun = f"re-run {label} (`cnnkit infer DIR --shard {label.split()[1]}`)"
    if not os.path.isfile(path):
        raise ShardError(f"{path}: missing or not a regular file, but {label}'s summary lists it; {rerun}")
    digest = file_sha256(path)
    if digest == record["sha256"]:
        return
    rows = _count_rows(path)
    what = (
        f"{rows:,} rows instead of {record['rows']:,}" if rows != record["rows"] else f"same {rows:,} rows, other bytes"
    )
    raise ShardError(
        f"{path}: changed since {label} wrote it ({what}: SHA-256 {digest[:12]}... vs "
        f"{record['sha256'][:12]}... in its summary); {rerun}"
    )


def _count_rows(path: str) -> int:
    """Data rows of a CSV (header left out); only to say what differs in an error."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _same(summaries: list[tuple[str, dict[str, Any]]], key: str, what: str) -> Any:
    first_path, first = summaries[0]
    for path, s in summaries[1:]:
        if s.get(key) != first.get(key):
            raise ShardError(
                f"{path} and {first_path} come from different {what} "
                f"({s.get(key)!r} vs {first.get(key)!r}); merge the shards of one run only"
            )
    return first.get(key)


def _rows(
    path: str, summary: dict[str, Any], columns: tuple[str, ...], counts: dict[str, int]
) -> Iterator[tuple[str, list[str]]]:
    """(file path, row as written) of one shard CSV, checked: 4 columns, paths strictly increasing.

    The row keeps its cells as written (spreadsheet-escaped, `cnnkit.csvcells`), so the merge writes
    the same bytes; the path is the original, which orders the rows and names the file on disk."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != columns:
            raise ShardError(f"{path}: not a predictions CSV (header {header!r}, expected {','.join(columns)})")
        prev: str | None = None
        n = 0
        for row in reader:
            if len(row) != len(columns):
                raise ShardError(f"{path}, row {n + 2}: {len(row)} columns instead of {len(columns)}")
            rel = unescape(row[0])
            if prev is not None and rel <= prev:
                raise ShardError(
                    f"{path}, row {n + 2}: paths out of order; was the file edited? "
                    f"rerun shard {summary['shard']['index']}"
                )
            prev = rel
            n += 1
            yield rel, row
    counts[path] = n


def _merge_confusion(res: MergeResult, summaries: list[dict[str, Any]]) -> None:
    """Accuracy and confusion of the shards together: matrices added up, or, for a model with more than
    MAX_MATRIX_CLASSES classes, the right answers and confused pairs; none if a shard has neither."""
    confusions = [s.get("confusion") for s in summaries]
    k = len(res.classes)
    if all(c is not None for c in confusions):
        total = [[sum(c[i][j] for c in confusions if c is not None) for j in range(k)] for i in range(k)]
        seen = sum(map(sum, total))
        res.confusion = total
        res.accuracy = sum(total[i][i] for i in range(k)) / seen if seen else None
    elif all(s.get("confused_pairs") is not None and s.get("n_correct") is not None for s in summaries):
        conf = Confusion(k)
        for s in summaries:
            conf.add_pairs(s["n_correct"], s["n_images"], s["confused_pairs"])
        res.confused_pairs = conf.pairs()
        res.accuracy = conf.n_correct / conf.n_total if conf.n_total else None


def merge(csvs: list[str], output: str, *, check_folder: bool = False) -> MergeResult:
    """Merge the CSVs of `cnnkit infer --shard K/N` runs into `output` (and `<output>.json`).

    Both files are written atomically, also when shards are missing or files are duplicated (then
    `problems` says so and the summary has `"complete": false`); with duplicates, the first row of a
    file is kept. The shards' `<csv>.failures.csv` lists are merged into `<output>.failures.csv`
    (sorted by path; removed when no file failed). An input named `<csv>.failures.csv` next to a shard
    CSV (a shell glob such as `out/*.csv` picks those up) is that shard's failure list and is skipped.

    Args:
        csvs: the shards' predictions CSVs, each with its summary `<csv>.json` next to it.
        output: the merged CSV to write.
        check_folder: also walk the folder the shards listed, and report its files that are in no
            output and the rows whose file is gone.

    Returns:
        A `MergeResult` (`to_dict()` is what `<output>.json` holds).

    Raises:
        ShardError: an input without its summary, or inputs that are not shards of one run (another
            model file, folder or N, one shard twice, an edited CSV).
    """
    csvs = [p for p in csvs if not _is_failure_list(p)]
    if not csvs:
        raise ShardError("no shard outputs given")
    outputs = [output, summary_path(output), failures_path(output)]
    # An input is a shard's CSV, its summary and its failure list; all are refused as outputs before any work.
    check_not_an_input(outputs, [f(p) for p in csvs for f in (str, summary_path, failures_path)])
    for out in outputs:
        check_writable(out)
    summaries = _load_shards(csvs)
    res = _new_result(summaries, output, check_folder)
    if check_folder:
        check_outside(outputs, res.folder, "the folder --check-folder walks")
    failed, truncated = _failed_files(summaries)
    check = _FolderCheck(res, {path for path, _ in failed}) if check_folder else None
    _write_merged(res, summaries, check)
    res.n_failed = sum(s["n_failed"] for _, s in summaries)
    res.n_converted = sum(s["n_converted"] for _, s in summaries)
    res.failures = failed[:FAILURES_KEPT]
    _write_failures(res.failures_output, failed)
    _merge_confusion(res, [s for _, s in summaries])
    res.problems = _problems(res, summaries, truncated)
    write_json(res.summary, res.to_dict())
    return res


def _is_failure_list(path: str) -> bool:
    """`<csv>.failures.csv` next to a shard CSV `<csv>` (and no summary of its own)."""
    return (
        path.endswith(FAILURES_SUFFIX)
        and not os.path.exists(summary_path(path))
        and os.path.exists(summary_path(path[: -len(FAILURES_SUFFIX)]))
    )


def _load_shards(csvs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(CSV, summary) of every input, checked to be shards of one run whose CSVs are as they wrote
    them, before anything is written; in shard order."""
    summaries = [(p, _load_summary(p)) for p in csvs]
    _same(summaries, "assignment", "shard assignments (cnnkit versions?)")
    count = _same([(p, {"n": s["shard"]["count"]}) for p, s in summaries], "n", "numbers of shards (N)")
    _same(summaries, "model_sha256", "model files (SHA-256)")
    _same(summaries, "folder", "folders")
    _same(summaries, "classes", "class lists")
    for p, s in summaries:
        _verify_csvs(p, s, failures_path(p))
    by_index: dict[int, str] = {}
    for p, s in summaries:
        k = s["shard"]["index"]
        if k in by_index:
            raise ShardError(f"shard {k}/{count} given twice: {by_index[k]} and {p}")
        by_index[k] = p
    return sorted(summaries, key=lambda ps: ps[1]["shard"]["index"])


def _new_result(summaries: list[tuple[str, dict[str, Any]]], output: str, check_folder: bool) -> MergeResult:
    """The `MergeResult` of shards of one run (`_load_shards`), before their rows are read."""
    first = summaries[0][1]
    count = first["shard"]["count"]
    present = [s["shard"]["index"] for _, s in summaries]
    given = set(present)
    return MergeResult(
        output=output,
        summary=summary_path(output),
        failures_output=failures_path(output),
        count=count,
        present=present,
        missing=[k for k in range(count) if k not in given],
        inputs=[p for p, _ in summaries],
        model=first["model"],
        model_sha256=first["model_sha256"],
        folder=first["folder"],
        classes=list(first["classes"]),
        checked_folder=check_folder,
    )


def _failed_files(summaries: list[tuple[str, dict[str, Any]]]) -> tuple[list[tuple[str, str]], bool]:
    """Every failed file of the shards (from their failure lists), sorted; and whether some shard had
    no list, so that only the first ones its summary holds are known."""
    failed: list[tuple[str, str]] = []
    truncated = False
    for p, s in summaries:
        rows = _failure_rows(failures_path(p), FAILURE_COLUMNS) if s["n_failed"] else []
        if rows is None:  # no list next to it (another cnnkit version?): the summary's first ones
            rows = [(f["path"], f["reason"]) for f in s.get("failures", [])]
            truncated = truncated or s["n_failed"] > len(rows)
        failed += rows
    failed.sort()
    return failed, truncated


class _FolderCheck:
    """With `check_folder`: walks the folder alongside the merged rows (both in sorted path order) and
    counts, on the result, the folder's files in no output and the rows whose file is gone."""

    def __init__(self, res: MergeResult, failed_paths: set[str]):
        self.res, self.failed_paths, self.missing = res, failed_paths, set(res.missing)
        self.walked = Listing(root=res.folder, files=[])
        self.files = iter_pngs(res.folder, self.walked)
        self.next_file = next(self.files, None)  # raises DataError without the folder

    def row(self, path: str) -> None:
        """A row of the merged CSV (in path order)."""
        while self.next_file is not None and self.next_file < path:
            self._unlisted(self.next_file)
            self.next_file = next(self.files, None)
        if self.next_file == path:
            self.next_file = next(self.files, None)
        else:
            self.res.n_gone += 1
            if len(self.res.gone) < LISTED:
                self.res.gone.append(path)

    def finish(self) -> None:
        """After the last row: the rest of the folder is in no output."""
        while self.next_file is not None:
            self._unlisted(self.next_file)
            self.next_file = next(self.files, None)
        for path, _ in self.walked.skipped:  # unusable entries: each shard reports its own as failures
            self._unlisted(path)

    def _unlisted(self, path: str) -> None:
        """A file of the folder that is in no output."""
        if path in self.failed_paths:
            return
        if shard_of(path, self.res.count) in self.missing:
            self.res.n_in_missing_shards += 1
            return
        self.res.n_unassigned += 1
        if len(self.res.unassigned) < LISTED:
            self.res.unassigned.append(path)


def _write_merged(res: MergeResult, summaries: list[tuple[str, dict[str, Any]]], check: _FolderCheck | None) -> None:
    """Write the merged CSV: the rows of every shard in path order, the first row of a file found twice."""
    counts: dict[str, int] = {}
    streams = [_rows(p, s, CSV_COLUMNS, counts) for p, s in summaries]
    with atomic_path(res.output) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        prev: str | None = None
        batch: list[list[str]] = []
        for path, row in heapq.merge(*streams, key=lambda r: r[0]):
            if path == prev:
                res.n_duplicates += 1
                if len(res.duplicates) < LISTED:
                    res.duplicates.append(path)
                continue
            prev = path
            batch.append(row)
            if len(batch) >= 4096:
                writer.writerows(batch)
                batch.clear()
            res.n_images += 1
            if check is not None:
                check.row(path)
        writer.writerows(batch)
        if check is not None:
            check.finish()
        for p, s in summaries:  # inside the `with`: a mismatch leaves no merged CSV
            if counts.get(p) != s["n_images"]:
                raise ShardError(
                    f"{p} holds {counts.get(p)} rows but its summary says {s['n_images']}: "
                    f"was one of them rewritten? rerun shard {s['shard']['index']}/{res.count}"
                )


def _write_failures(path: str, failed: list[tuple[str, str]]) -> None:
    """`<output>.failures.csv` of the merge: every failed file of the shards; none when none failed."""
    if failed:
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(FAILURE_COLUMNS)
            writer.writerows([(escape(p), escape(reason)) for p, reason in failed])
    elif os.path.exists(path):  # a stale list from an earlier merge
        os.unlink(path)


def _problems(res: MergeResult, summaries: list[tuple[str, dict[str, Any]]], truncated: bool) -> list[str]:
    """What keeps the merge from being the output of one unsharded run, one line each."""
    problems: list[str] = []
    if res.missing:
        problems.append(
            f"{len(res.missing)} of {res.count} shards missing: {_ranges(res.missing)} "
            f"(run `cnnkit infer {res.folder} --shard K/{res.count}` for each)"
        )
    if res.n_duplicates:
        problems.append(f"{res.n_duplicates:,} file(s) in more than one shard, e.g. {res.duplicates[0]}")
    listed = {s["n_listed"] for _, s in summaries}
    if len(listed) > 1:
        problems.append(
            f"the folder changed while the shards ran: their listings saw "
            f"{min(listed):,} to {max(listed):,} files"
            + ("" if res.checked_folder else " (--check-folder lists the files in no output)")
        )
    elif not res.missing and not res.n_duplicates and res.n_images + res.n_failed != next(iter(listed)):
        problems.append(
            f"the shards hold {res.n_images + res.n_failed:,} files but each listed "
            f"{next(iter(listed)):,} in the folder"
        )
    if res.n_unassigned:
        problems.append(
            f"{res.n_unassigned:,} file(s) of the folder are in no output although their shard "
            f"ran (added after it listed the folder?), e.g. {res.unassigned[0]}"
            + ("; some shards' failure lists were truncated, so some may have failed" if truncated else "")
        )
    if res.n_gone:
        problems.append(f"{res.n_gone:,} file(s) in the outputs are no longer in the folder, e.g. {res.gone[0]}")
    return problems


def _failure_rows(path: str, columns: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """The (path, reason) rows of a shard's failure list, unescaped; None when there is none."""
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header) != columns:
                raise ShardError(f"{path}: not a failure list (header {header!r})")
            return [(unescape(r[0]), unescape(r[1])) for r in reader if len(r) >= 2]
    except FileNotFoundError:
        return None


def _ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts: list[str] = []
    start = prev = ks[0]
    for k in [*ks[1:], None]:
        if k is not None and k == prev + 1:
            prev = k
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if k is not None:
            start = prev = k
    return ", ".join(parts)


def format_merge(res: MergeResult) -> str:
    """A short human-readable report of a merge."""
    lines = [
        f"shards    {len(res.present)} of {res.count} merged"
        + (f" (missing: {_ranges(res.missing)})" if res.missing else ""),
        f"model     {printable(res.model)} (sha256 {res.model_sha256[:12]})",  # from the summaries: escaped
        f"folder    {printable(res.folder)}",
        f"images    {res.n_images:,} predicted, {res.n_failed:,} failed, {res.n_converted:,} converted",
        f"output    {res.output} (summary {res.summary})",
    ]
    if res.n_failed:
        lines.append(f"failures  {res.n_failed:,} file(s) could not be used, listed in {res.failures_output}")
    if res.accuracy is not None:
        lines.append(f"accuracy  {res.accuracy:.4f}")
        lines += summary_lines(res.classes, res.confusion, res.confused_pairs, table)
    if res.checked_folder and not res.n_unassigned and not res.n_gone:
        lines.append(
            "folder    checked: every file is in exactly one output"
            + (f" or in a missing shard ({res.n_in_missing_shards:,})" if res.missing else "")
        )
    lines += [f"PROBLEM   {printable(p)}" for p in res.problems]  # raw in the JSON, escaped here
    return "\n".join(lines)
