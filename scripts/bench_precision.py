"""End-to-end `cnnkit infer` of a run folder at each precision, and cheap INT8 pipeline variants.

Each method runs `cnnkit infer FOLDER --model RUN ...` in a fresh process, in turn (round-robin over
`--rounds`), so that load from other jobs on a shared machine hits every method alike; the table
compares best and median runs (images/s as `cnnkit infer` reports it: listing to last prediction);
the load average before and after is recorded (other users' jobs on a shared machine).
Methods:
    fp32        --precision fp32
    auto        --precision auto (what it picks and why is recorded)
    int8        --precision int8
    int8-b1024  --precision int8 --batch-size 1024 (fewer, larger model calls)
    int8-w1     --precision int8 --workers 1 (one decoder process, so the model's thread has a core)
    int8-t2     --precision int8 with 2 onnxruntime threads beside the 2 decoders (Python API: the CLI
                has no --threads)

Usage:
    python scripts/bench_precision.py FOLDER --run RUN_DIR [--rounds 3] [--methods fp32,auto,...]
        [--results docs/results/precision-<model>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine, run_json  # noqa: E402

METHODS = {
    "fp32": ["--precision", "fp32"],
    "auto": ["--precision", "auto"],
    "int8": ["--precision", "int8"],
    "int8-b1024": ["--precision", "int8", "--batch-size", "1024"],
    "int8-w1": ["--precision", "int8", "--workers", "1"],
    "int8-t2": None,  # the Python API, threads=2
}
API = (
    "import json, sys; from cnnkit.runtime.infer import infer; "
    "r = infer(sys.argv[1], model=sys.argv[2], precision='int8', output=sys.argv[3], threads=2, progress=False); "
    "print(json.dumps(r.to_dict()))"
)
KEEP = ("images_per_second", "seconds", "accuracy", "n_images", "precision", "precision_reason", "workers", "threads")


def command(method: str, folder: str, run: str, out: str) -> list[str]:
    flags = METHODS[method]
    if flags is None:
        return [sys.executable, "-c", API, folder, run, out]
    return [sys.executable, "-m", "cnnkit", "infer", folder, "--model", run, "--output", out, "--json", *flags]


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: best and median images/s, accuracy, and what ran."""
    table = {}
    for method, rs in runs.items():
        rates = [r["images_per_second"] for r in rs]
        table[method] = {
            "best_images_per_second": max(rates),
            "median_images_per_second": statistics.median(rates),
            "accuracy": rs[0]["accuracy"],
            "precision": rs[0]["precision"],
            "precision_reason": rs[0]["precision_reason"],
            "workers": rs[0]["workers"],
            "threads": rs[0]["threads"],
        }
    base = table.get("fp32")
    if base:
        for row in table.values():
            row["accuracy_points_vs_fp32"] = round((row["accuracy"] - base["accuracy"]) * 100, 4)
            row["speedup_vs_fp32_best"] = round(row["best_images_per_second"] / base["best_images_per_second"], 3)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--run", required=True, help="run folder with model.onnx and model.int8.onnx")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--results", help="write the results JSON here")
    p.add_argument("--note", default="", help="what the model is (recorded)")
    a = p.parse_args()
    methods = a.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as work:
        for r in range(a.rounds):
            for m in methods:
                out, _ = run_json(command(m, a.folder, a.run, os.path.join(work, f"{m}.csv")))
                runs[m].append({k: out[k] for k in (*KEEP, "steal")})
                print(
                    f"round {r + 1} {m}: {out['images_per_second']:,.0f} img/s acc {out['accuracy']:.4f}",
                    file=sys.stderr,
                )
    from cnnkit.meta import int8_speed
    from cnnkit.runtime.session import read_meta

    body = {
        "script": "scripts/bench_precision.py",
        "argv": sys.argv[1:],
        "machine": describe_machine(),
        "model": {
            "run": a.run,
            "note": a.note,
            "int8_speed": int8_speed(read_meta(os.path.join(a.run, "model.int8.onnx"))),
        },
        "commands": {m: " ".join(command(m, a.folder, a.run, "OUT.csv")[1:]) for m in methods},
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "runs": runs,
        "summary": summarize(runs),
    }
    text = json.dumps(body, indent=2)
    if a.results:
        from cnnkit.files import write_json

        write_json(a.results, body)
    print(text)


if __name__ == "__main__":
    main()
