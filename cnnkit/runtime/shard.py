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
from cnnkit.errors import CnnkitError
from cnnkit.files import atomic_path, write_json

ASSIGNMENT = "blake2b-64(utf-8 relative path) mod N"
SHARD_KIND = "cnnkit-infer-shard"
MERGED_KIND = "cnnkit-infer-merged"
SUMMARY_VERSION = 1
LISTED = 20  # paths listed per kind of problem (all are counted)


class ShardError(CnnkitError):
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
        raise ShardError(f"{hint} (got {text!r}: the last of {count} shards is {count - 1}/{count}; "
                         "for 1-based array ids pass $((ID - 1))/N)")
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
            if int.from_bytes(blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") \
                    % count == index:
                yield rel


def summary_path(csv_path: str) -> str:
    """Where the summary of a shard's (or a merge's) CSV lives: `<csv>.json`."""
    return os.fspath(csv_path) + ".json"


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
            "version": SUMMARY_VERSION,
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
        },
    )
    return path


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
    path = summary_path(csv_path)
    if not os.path.isfile(csv_path):
        raise ShardError(f"{csv_path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{csv_path}: no summary {path} next to it; is it the output of "
                         "`cnnkit infer --shard K/N` (did that run finish)?") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not a readable summary ({e})") from None
    kind = summary.get("kind") if isinstance(summary, dict) else None
    if kind == MERGED_KIND:
        raise ShardError(f"{csv_path}: this is a merged output, not a shard's; leave it out")
    if kind != SHARD_KIND or summary.get("version") != SUMMARY_VERSION:
        raise ShardError(f"{path}: not a summary of `cnnkit infer --shard` (version {SUMMARY_VERSION})")
    return summary


def _same(summaries: list[tuple[str, dict[str, Any]]], key: str, what: str) -> Any:
    first_path, first = summaries[0]
    for path, s in summaries[1:]:
        if s.get(key) != first.get(key):
            raise ShardError(f"{path} and {first_path} come from different {what} "
                             f"({s.get(key)!r} vs {first.get(key)!r}); merge the shards of one run only")
    return first.get(key)


def _rows(path: str, summary: dict[str, Any], columns: tuple[str, ...], counts: dict[str, int]) -> Iterator[list[str]]:
    """The data rows of one shard CSV, checked: 4 columns, paths strictly increasing."""
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
            if prev is not None and row[0] <= prev:
                raise ShardError(f"{path}, row {n + 2}: paths out of order; was the file edited? "
                                 f"rerun shard {summary['shard']['index']}")
            prev = row[0]
            n += 1
            yield row
    counts[path] = n


def _merge_confusion(res: MergeResult, summaries: list[dict[str, Any]]) -> None:
    """Accuracy and confusion of the shards together: matrices added up, or, for a model with more than
    MAX_MATRIX_CLASSES classes, the right answers and confused pairs; none if a shard has neither."""
    confusions = [s.get("confusion") for s in summaries]
    k = len(res.classes)
    if all(c is not None for c in confusions):
        total = [[sum(c[i][j] for c in confusions) for j in range(k)] for i in range(k)]
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

    Raises:
        ShardError: an input without its summary, or inputs that are not shards of one run (another
            model file, folder or N, one shard twice, an edited CSV).
    """
    from cnnkit.listing import Listing, iter_pngs
    from cnnkit.runtime.infer import CSV_COLUMNS, FAILURE_COLUMNS, FAILURES_KEPT, FAILURES_SUFFIX, failures_path

    csvs = [p for p in csvs if not (p.endswith(FAILURES_SUFFIX) and not os.path.exists(summary_path(p))
                                    and os.path.exists(summary_path(p[: -len(FAILURES_SUFFIX)])))]
    if not csvs:
        raise ShardError("no shard outputs given")
    out_abs = os.path.abspath(output)
    for p in csvs:
        if os.path.abspath(p) in (out_abs, os.path.abspath(summary_path(output))):
            raise ShardError(f"{p}: the merge output is also an input; write the merge elsewhere")
    summaries = [(p, _load_summary(p)) for p in csvs]
    _same(summaries, "assignment", "shard assignments (cnnkit versions?)")
    count = _same([(p, {"n": s["shard"]["count"]}) for p, s in summaries], "n", "numbers of shards (N)")
    model_sha = _same(summaries, "model_sha256", "model files (SHA-256)")
    folder = _same(summaries, "folder", "folders")
    classes = _same(summaries, "classes", "class lists")
    by_index: dict[int, str] = {}
    for p, s in summaries:
        k = s["shard"]["index"]
        if k in by_index:
            raise ShardError(f"shard {k}/{count} given twice: {by_index[k]} and {p}")
        by_index[k] = p
    summaries.sort(key=lambda ps: ps[1]["shard"]["index"])
    present = sorted(by_index)
    missing = [k for k in range(count) if k not in by_index]
    res = MergeResult(
        output=output,
        summary=summary_path(output),
        failures_output=failures_path(output),
        count=count,
        present=present,
        missing=missing,
        inputs=[p for p, _ in summaries],
        model=summaries[0][1]["model"],
        model_sha256=model_sha,
        folder=folder,
        classes=list(classes),
        checked_folder=check_folder,
    )

    failed: list[tuple[str, str]] = []  # every failed file of the shards (their failures.csv), sorted
    truncated = False
    for p, s in summaries:
        rows = _failure_rows(failures_path(p), FAILURE_COLUMNS) if s["n_failed"] else []
        if rows is None:  # no list next to it (another cnnkit version?): the summary's first ones
            rows = [(f["path"], f["reason"]) for f in s.get("failures", [])]
            truncated = truncated or s["n_failed"] > len(rows)
        failed += rows
    failed.sort()
    failed_paths = {path for path, _ in failed}
    walked = Listing(root=folder, files=[])
    listing = iter_pngs(folder, walked) if check_folder else None  # raises DataError without the folder
    nxt = next(listing, None) if listing is not None else None
    missing_set = set(missing)

    def unlisted(path: str) -> None:
        """A file of the folder that is in no output."""
        if path in failed_paths:
            return
        if shard_of(path, count) in missing_set:
            res.n_in_missing_shards += 1
            return
        res.n_unassigned += 1
        if len(res.unassigned) < LISTED:
            res.unassigned.append(path)

    counts: dict[str, int] = {}
    streams = [_rows(p, s, CSV_COLUMNS, counts) for p, s in summaries]
    with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        prev: str | None = None
        batch: list[list[str]] = []
        for row in heapq.merge(*streams, key=lambda r: r[0]):
            path = row[0]
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
            if listing is not None:
                while nxt is not None and nxt < path:
                    unlisted(nxt)
                    nxt = next(listing, None)
                if nxt == path:
                    nxt = next(listing, None)
                else:
                    res.n_gone += 1
                    if len(res.gone) < LISTED:
                        res.gone.append(path)
        writer.writerows(batch)
        if listing is not None:
            while nxt is not None:
                unlisted(nxt)
                nxt = next(listing, None)
            for path, _ in walked.skipped:  # unusable entries: each shard reports its own as failures
                unlisted(path)
        for p, s in summaries:
            if counts.get(p) != s["n_images"]:
                raise ShardError(f"{p} holds {counts.get(p)} rows but its summary says {s['n_images']}: "
                                 f"was one of them rewritten? rerun shard {s['shard']['index']}/{count}")

    res.n_failed = sum(s["n_failed"] for _, s in summaries)
    res.n_converted = sum(s["n_converted"] for _, s in summaries)
    res.failures = failed[:FAILURES_KEPT]
    if failed:
        with atomic_path(res.failures_output) as tmp, \
                open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(FAILURE_COLUMNS)
            writer.writerows(failed)
    elif os.path.exists(res.failures_output):  # a stale list from an earlier merge
        os.unlink(res.failures_output)
    _merge_confusion(res, [s for _, s in summaries])

    if missing:
        res.problems.append(f"{len(missing)} of {count} shards missing: {_ranges(missing)} "
                            f"(run `cnnkit infer {folder} --shard K/{count}` for each)")
    if res.n_duplicates:
        res.problems.append(f"{res.n_duplicates:,} file(s) in more than one shard, e.g. {res.duplicates[0]}")
    listed = {s["n_listed"] for _, s in summaries}
    if len(listed) > 1:
        res.problems.append(f"the folder changed while the shards ran: their listings saw "
                            f"{min(listed):,} to {max(listed):,} files"
                            + ("" if check_folder else " (--check-folder lists the files in no output)"))
    elif not missing and not res.n_duplicates and res.n_images + res.n_failed != next(iter(listed)):
        res.problems.append(f"the shards hold {res.n_images + res.n_failed:,} files but each listed "
                            f"{next(iter(listed)):,} in the folder")
    if res.n_unassigned:
        res.problems.append(f"{res.n_unassigned:,} file(s) of the folder are in no output although their shard "
                            f"ran (added after it listed the folder?), e.g. {res.unassigned[0]}"
                            + ("; some shards' failure lists were truncated, so some may have failed" if truncated
                               else ""))
    if res.n_gone:
        res.problems.append(f"{res.n_gone:,} file(s) in the outputs are no longer in the folder, e.g. {res.gone[0]}")
    write_json(res.summary, res.to_dict())
    return res


def _failure_rows(path: str, columns: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """The (path, reason) rows of a shard's failure list; None when there is none."""
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header) != columns:
                raise ShardError(f"{path}: not a failure list (header {header!r})")
            return [(r[0], r[1]) for r in reader if len(r) >= 2]
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
    from cnnkit.console import table

    lines = [
        f"shards    {len(res.present)} of {res.count} merged"
        + (f" (missing: {_ranges(res.missing)})" if res.missing else ""),
        f"model     {res.model} (sha256 {res.model_sha256[:12]})",
        f"folder    {res.folder}",
        f"images    {res.n_images:,} predicted, {res.n_failed:,} failed, {res.n_converted:,} converted",
        f"output    {res.output} (summary {res.summary})",
    ]
    if res.n_failed:
        lines.append(f"failures  {res.n_failed:,} file(s) could not be used, listed in {res.failures_output}")
    if res.accuracy is not None:
        lines.append(f"accuracy  {res.accuracy:.4f}")
        lines += summary_lines(res.classes, res.confusion, res.confused_pairs, table)
    if res.checked_folder and not res.n_unassigned and not res.n_gone:
        lines.append("folder    checked: every file is in exactly one output"
                     + (f" or in a missing shard ({res.n_in_missing_shards:,})" if res.missing else ""))
    lines += [f"PROBLEM   {p}" for p in res.problems]
    return "\n".join(lines)
