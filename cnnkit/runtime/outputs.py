"""The files `cnnkit infer` writes, and `cnnkit merge` reads back: their names and columns. Torch-free.

    <output>                 the predictions, one row per image: CSV_COLUMNS
    <output>.failures.csv    every file that could not be used, with its reason: FAILURE_COLUMNS
    <output>.json            with --shard (and after a merge): the run's summary
    <output>.mistakes.png    labelled images: the most confident wrong predictions (`cnnkit.mistakes`)

Both `cnnkit.runtime.infer` (which writes them) and `cnnkit.runtime.shard` (which merges them) import
these names from here, so neither has to import the other to agree on a file's shape.
"""

from __future__ import annotations

import os

CSV_COLUMNS = ("path", "predicted", "score", "label")
FAILURE_COLUMNS = ("path", "reason")
FAILURES_SUFFIX = ".failures.csv"
MISTAKES_SUFFIX = ".mistakes.png"
FAILURES_KEPT = 1000  # failures listed in a result or summary (all are counted, and all go to the failures file)


def failures_path(output: str) -> str:
    """Where `infer` lists the files that failed: `<output>.failures.csv`."""
    return output + FAILURES_SUFFIX


def summary_path(csv_path: str) -> str:
    """Where the summary of a shard's (or a merge's) CSV lives: `<csv>.json`."""
    return os.fspath(csv_path) + ".json"


def mistakes_path(output: str) -> str:
    """Where `infer` draws the most confident wrong predictions of a labelled folder: `<output>.mistakes.png`."""
    return output + MISTAKES_SUFFIX
