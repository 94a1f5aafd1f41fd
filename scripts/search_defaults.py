"""Choose training defaults on validation only: run `cnnkit train` on a training-only view of DATA.

The view is a folder holding nothing but a link to DATA/training, so no run can see testing/: each
one holds out `--val-split` (default 0.1) of training, stratified and seeded, and the results file
records only validation numbers (best and last epoch), the selected epoch and the time each run took.
The test split is measured once, afterwards, by `scripts/bench_train.py` on the chosen setting.

Usage:
    python scripts/search_defaults.py /tmp/fmnist --name fashion \
        --try "base:" --try "lr5e-3:--lr 5e-3" --try "shift:--augment shift" [--seeds 0 1]

Writes docs/results/search-<name>.json (one record per setting and seed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from machine import describe_machine, run_json  # noqa: E402


def training_only_view(data: str) -> str:
    """A temporary folder whose only entry is `training` -> DATA/training."""
    view = tempfile.mkdtemp(prefix="cnnkit-trainonly-")
    os.symlink(os.path.join(os.path.abspath(data), "training"), os.path.join(view, "training"))
    return view


def run_one(view: str, args: list[str], seed: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "cnnkit", "train", view, "--seed", str(seed), "--out", out, "--json", *args]
    res, wall = run_json(cmd)
    assert res.get("test_accuracy") is None, "the view must not contain testing/"
    hist = json.load(open(os.path.join(out, "metrics.json")))["history"]  # --json leaves the history out
    return {
        "args": shlex.join(args),
        "seed": seed,
        "wall_seconds": wall,
        "steal": res["steal"],
        "epochs": res["epochs"],
        "selected_epoch": res["best_epoch"],
        "val_accuracy": res["val_accuracy"],
        "last_val_accuracy": hist[-1]["val_accuracy"],
        "train_seconds": res["train_seconds"],
        "train_images_per_second": res["train_images_per_second"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="folder with training/ (testing/ is never looked at)")
    ap.add_argument("--name", required=True, help="results go to docs/results/search-<name>.json")
    ap.add_argument("--try", dest="tries", action="append", required=True, metavar="LABEL:ARGS")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", default="bench-train-runs/search")
    args = ap.parse_args()
    view = training_only_view(args.data)
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "results", f"search-{args.name}.json")
    doc = json.load(open(path)) if os.path.exists(path) else {"runs": []}
    doc.update(
        {
            "script": "scripts/search_defaults.py",
            "data": os.path.abspath(args.data),
            "protocol": "training/ only; selection and comparison on the held-out validation split",
            "machine": describe_machine(),
        }
    )
    for spec in args.tries:
        label, _, extra = spec.partition(":")
        for seed in args.seeds:
            out = os.path.join(args.work, f"{args.name}-{label}-s{seed}")
            rec = {"label": label, **run_one(view, shlex.split(extra), seed, out)}
            doc["runs"] = [r for r in doc["runs"] if (r["label"], r["seed"]) != (label, seed)] + [rec]
            with open(path + ".tmp", "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(path + ".tmp", path)
            print(
                f"{label:<20} seed {seed}  val {rec['val_accuracy']:.4f} (epoch {rec['selected_epoch']}/"
                f"{rec['epochs']}, last {rec['last_val_accuracy']:.4f})  {rec['wall_seconds']:.0f} s  "
                f"{rec['train_images_per_second']:,.0f} img/s  steal {rec['steal']:.0%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
