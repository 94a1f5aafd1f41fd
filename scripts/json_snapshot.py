"""The `--json` output of train, export, infer and bench on the bundled digits, with what varies from
run to run taken out, so that two commits can be compared with `diff` (a refactor must not change it).

    python scripts/json_snapshot.py OUT.json [--work DIR]

Runs, in a fresh folder, each as a user would (`python -m cnnkit ...`, device cpu, seed 0, one
worker): `data sample`, `train --epochs 2 --arch lecture`, `export` to onnx and torchscript,
`infer` of testing/, `bench --limit 64`. Removed before writing: wall times and speeds (keys naming
seconds, images per second, latency or milliseconds), the scratch folder's path (replaced by `WORK`),
host names, and file sizes (a TorchScript archive's size varies by a few bytes between two runs).
Everything else (accuracies, parity figures, keys, counts, file names) stays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

VARYING = re.compile(r"(seconds|per_second|latency|_ms$|^ms_|time|host|created|date|pid|^bytes$)", re.I)


def cnnkit(work: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "cnnkit", *args, "--json"],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    if proc.returncode not in (0, 4):
        raise SystemExit(f"cnnkit {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scrub(value, work: str):
    """The value with varying fields removed and the scratch path replaced."""
    if isinstance(value, dict):
        return {k: scrub(v, work) for k, v in sorted(value.items()) if not VARYING.search(k)}
    if isinstance(value, list):
        return [scrub(v, work) for v in value]
    if isinstance(value, str):
        return re.sub(r"train-\d{8}-\d{6}", "train-RUN", value.replace(work, "WORK"))
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--work", help="scratch folder (default: a new temporary one, removed after)")
    a = ap.parse_args()
    work = os.path.realpath(a.work or tempfile.mkdtemp(prefix="cnnkit-snapshot-"))
    os.makedirs(work, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "cnnkit", "data", "sample", "--out", "digits"], cwd=work, check=True, capture_output=True
    )
    snap = {
        "train": cnnkit(
            work,
            "train",
            "digits",
            "--epochs",
            "2",
            "--arch",
            "lecture",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            "run",
        )
    }
    snap["export onnx"] = cnnkit(work, "export", "run/best.pt", "--format", "onnx")
    snap["export torchscript"] = cnnkit(work, "export", "run/best.pt", "--format", "torchscript")
    snap["infer"] = cnnkit(
        work, "infer", "digits/testing", "--model", "run/model.onnx", "--device", "cpu", "--output", "predictions.csv"
    )
    snap["bench"] = cnnkit(work, "bench", "--run", "run", "--device", "cpu", "--limit", "64")
    with open(a.out, "w") as f:
        json.dump(scrub(snap, work), f, indent=1, sort_keys=True)
        f.write("\n")
    if not a.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
