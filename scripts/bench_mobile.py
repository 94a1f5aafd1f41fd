"""Folded vs unfolded BatchNorm, dynamic vs fixed batch: graph size, onnxruntime's mobile verdict and
model-only speed of the ONNX files `cnnkit export` writes, all from one checkpoint in one run.

Usage: python scripts/bench_mobile.py CHECKPOINT DATA [--rounds 5] [--images 4096] [--results FILE.json]

Exports four files into a temporary folder through cnnkit's gate (`cnnkit.export.export`): dynamic
batch with and without folding (`--no-fold`), and `--batch 1` with and without. Speed: cnnkit's own
session (`cnnkit.runtime.session.create_session`, CPU provider, 1 thread) over `--images` images of
DATA in runs of 64, the folded and unfolded dynamic files alternated for `--rounds` rounds; the
table keeps the best round of each (absolute numbers drift with the machine's load, the ratio less).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine, write_results  # noqa: E402

VARIANTS = {
    "folded": {},
    "unfolded": {"fold": False},
    "folded-b1": {"batch": 1},
    "unfolded-b1": {"fold": False, "batch": 1},
}


def _export_all(checkpoint: str, data: str, folder: str) -> dict[str, dict]:
    """name -> {path, nodes, ops, parity max |diff|, mobile verdict} for each of `VARIANTS`."""
    import onnx

    from cnnkit.export import export

    out = {}
    for name, kwargs in VARIANTS.items():
        result = export(checkpoint, data=data, out=os.path.join(folder, f"{name}.onnx"), **kwargs)
        nodes = [n.op_type for n in onnx.load(result.path).graph.node]
        out[name] = {
            "path": result.path,
            "nodes": len(nodes),
            "batchnorm_nodes": nodes.count("BatchNormalization"),
            "parity_max_abs_diff": result.parity.max_abs_diff,
            "mobile": result.mobile,
        }
    return out


def _speed(paths: dict[str, str], data: str, n_images: int, rounds: int) -> dict[str, list[float]]:
    """name -> images/s per round, model only, the files alternated within each round."""
    from cnnkit.export import sample_images
    from cnnkit.runtime.session import create_session

    sessions = {name: create_session(p, "cpu", threads=1) for name, p in paths.items()}
    meta = next(iter(sessions.values())).meta
    images = sample_images(data, meta, n_images)
    per: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(images[:256])  # warm-up
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for i in range(0, len(images), 64):
                s.run(images[i : i + 64])
            per[name].append(round(len(images) / (time.perf_counter() - t0), 1))
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="a folder of PNGs (the gate's and the timing's images)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--results", default=None, help="write the results JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        files = _export_all(args.checkpoint, args.data, folder)
        per = _speed({k: files[k]["path"] for k in ("folded", "unfolded")}, args.data, args.images, args.rounds)
    best = {name: max(v) for name, v in per.items()}
    median = {name: statistics.median(v) for name, v in per.items()}
    for name, f in files.items():
        f.pop("path")
        print(f"{name:12} {f['nodes']:3} nodes ({f['batchnorm_nodes']} BN), parity {f['parity_max_abs_diff']:.2g}")
    print(f"model-only img/s (best of {args.rounds}): " + ", ".join(f"{k} {v:,.0f}" for k, v in best.items()))
    print("model-only img/s (median): " + ", ".join(f"{k} {v:,.0f}" for k, v in median.items()))
    result = {
        "what": "BatchNorm folding and fixed batch: graph, mobile verdict, model-only images/s (1 thread, runs of 64)",
        "command": "python " + " ".join(sys.argv),
        "checkpoint": args.checkpoint,
        "machine": describe_machine(),
        "files": files,
        "images_per_second_per_round": per,
        "images_per_second_best": best,
        "images_per_second_median": median,
        "folded_over_unfolded_best": round(best["folded"] / best["unfolded"], 3),
        "folded_over_unfolded_median": round(median["folded"] / median["unfolded"], 3),
    }
    if args.results:
        write_results(args.results, result)


if __name__ == "__main__":
    main()
