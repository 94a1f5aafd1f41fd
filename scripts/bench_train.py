"""Training speed and accuracy, measured honestly: the lecture's own loop vs `cnnkit train`, and
cnnkit's settings over several seeds, written to docs/results/train-<name>.json.

What it runs (each a fresh process, on DATA with training/ and testing/):
    speed:    (1) the lecture's loop: `torch.stack([read_image(f) ...]) / 255`, TensorDataset +
              DataLoader(batch 128), Adam, the lecture's network widened to K classes, 5 epochs;
              (2) `cnnkit train --arch lecture --epochs 5 --batch-size 128 --val-split 0` on the same
              folder (the lecture trains on all of training/ too); alternated, --speed-repeat times.
    settings: each `--setting LABEL:ARGS` as `cnnkit train DATA --seed S ARGS` for every seed. These
              runs use the default protocol: 10% of training/ held out (stratified, seeded) for
              selection, testing/ evaluated once on the selected weights. The results file keeps the
              test accuracy, the selected epoch's validation accuracy, wall time (process start to
              exit, loading and evaluation included), and the CPU steal while each ran.

The settings themselves were chosen on validation only (scripts/search_defaults.py,
docs/results/search-*.json, docs/training.md); this script is where testing/ is looked at, once per
setting and seed. Numbers and the machine they ran on: docs/results/train-*.json.

Usage:
    python scripts/bench_train.py /tmp/fmnist --name fashion --seeds 0 1 2 \
        --setting "default:" --setting "longer:--epochs 25 --augment flip+shift" [--speed-repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine, run_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LECTURE_LOOP = r"""
import json, sys, time, os
import torch, torchvision
root, epochs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
t0 = time.perf_counter()
classes = sorted(os.listdir(os.path.join(root, "training")))
xs, ys = [], []
for i, c in enumerate(classes):
    d = os.path.join(root, "training", c)
    files = sorted(os.listdir(d))
    xs.append(torch.stack([torchvision.io.read_image(os.path.join(d, f)) for f in files]))
    ys += [i] * len(files)
X = torch.concat(xs) / 255
y = torch.tensor(ys)
load_s = time.perf_counter() - t0
two = len(classes) == 2
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 16, (5, 5)), torch.nn.ReLU(), torch.nn.MaxPool2d((2, 2)), torch.nn.Flatten(),
    *([torch.nn.Linear(2304, 1), torch.nn.Sigmoid()] if two else [torch.nn.Linear(2304, len(classes))]))
loss_fn = torch.nn.BCELoss() if two else torch.nn.CrossEntropyLoss()
target = y.float().reshape(-1, 1) if two else y
optimizr = torch.optim.Adam(net.parameters())
dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, target), batch_size=128)
t1 = time.perf_counter()
for epoc in range(epochs):
    for xi, yi in dl:
        netout = net(xi)
        loss = loss_fn(netout, yi)
        loss.backward()
        optimizr.step()
        optimizr.zero_grad()
train_s = time.perf_counter() - t1
print(json.dumps({"load_seconds": load_s, "train_seconds": train_s,
                  "train_images_per_second": len(X) * epochs / train_s, "n": len(X)}))
"""


def speed(data: str, work: str, repeat: int, epochs: int) -> dict:
    """Training images/s of the lecture's loop and of `cnnkit train --arch lecture`, alternated."""
    py = sys.executable
    rounds = []
    for r in range(repeat):  # alternate, so drift on a shared machine hits both alike
        lec, lec_wall = run_json([py, "-c", LECTURE_LOOP, data, str(epochs)], work)
        cmd = [
            py,
            "-m",
            "cnnkit",
            "train",
            data,
            "--json",
            "--arch",
            "lecture",
            "--epochs",
            str(epochs),
            "--batch-size",
            "128",
            "--val-split",
            "0",
            "--out",
            os.path.join(work, f"lecture-{r}"),
        ]
        ck, ck_wall = run_json(cmd, work)
        ratio = ck["train_images_per_second"] / lec["train_images_per_second"]
        rounds.append(
            {
                "lecture_loop": {**lec, "wall": lec_wall},
                "cnnkit_lecture": {
                    k: ck[k] for k in ("train_images_per_second", "load_seconds", "images_loaded", "steal")
                }
                | {"wall": ck_wall},
                "ratio": ratio,
            }
        )
        print(
            f"# speed round {r + 1}: lecture loop {lec['train_images_per_second']:,.0f} img/s, cnnkit "
            f"{ck['train_images_per_second']:,.0f} img/s, ratio {ratio:.2f} (steal {lec['steal']:.0%}, "
            f"{ck['steal']:.0%})",
            file=sys.stderr,
            flush=True,
        )
    return {"epochs": epochs, "rounds": rounds, "ratios": [x["ratio"] for x in rounds]}


def setting(data: str, work: str, name: str, label: str, args: list[str], seeds: list[int]) -> dict:
    """`cnnkit train DATA ARGS` for each seed; per-run numbers and their mean and spread."""
    runs = []
    for seed in seeds:
        out = os.path.join(work, f"{name}-{label}-s{seed}")
        res, wall = run_json(
            [sys.executable, "-m", "cnnkit", "train", data, "--json", "--seed", str(seed), "--out", out, *args], work
        )
        hist = json.load(open(os.path.join(out, "metrics.json")))["history"]
        runs.append(
            {
                "seed": seed,
                "test_accuracy": res["test_accuracy"],
                "val_accuracy": res["val_accuracy"],
                "selected_epoch": res["best_epoch"],
                "epochs": res["epochs"],
                "parameters": res["parameters"],
                "selection": res["selection"],
                "wall_seconds": wall,
                "load_seconds": res["load_seconds"],
                "train_seconds": res["train_seconds"],
                "train_images_per_second": res["train_images_per_second"],
                "steal": res["steal"],
                "last_epoch_val_accuracy": hist[-1]["val_accuracy"],
            }
        )
        r = runs[-1]
        print(
            f"# {label} seed {seed}: test {r['test_accuracy']:.4f}, val {r['val_accuracy']:.4f} (epoch "
            f"{r['selected_epoch']}/{r['epochs']}), wall {wall:.0f} s, steal {r['steal']:.0%}",
            file=sys.stderr,
            flush=True,
        )

    def stats(key: str) -> dict:
        xs = [r[key] for r in runs]
        return {
            "mean": statistics.fmean(xs),
            "min": min(xs),
            "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        }

    return {
        "label": label,
        "args": shlex.join(args),
        "command": shlex.join(["cnnkit", "train", data, *args]),
        "seeds": seeds,
        "runs": runs,
        "test_accuracy": stats("test_accuracy"),
        "val_accuracy": stats("val_accuracy"),
        "wall_seconds": stats("wall_seconds"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="folder with training/ and testing/")
    ap.add_argument("--name", required=True, help="results go to docs/results/train-<name>.json")
    ap.add_argument("--setting", action="append", default=[], metavar="LABEL:ARGS")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--speed-repeat", type=int, default=0, help="rounds of lecture loop vs cnnkit (0: skip)")
    ap.add_argument("--speed-epochs", type=int, default=5)
    args = ap.parse_args()
    data = os.path.abspath(args.data)
    work = os.path.abspath("bench-train-runs")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(REPO, "docs", "results", f"train-{args.name}.json")
    doc = json.load(open(path)) if os.path.exists(path) else {}
    doc.update({"script": "scripts/bench_train.py", "data": data, "machine": describe_machine()})
    doc.setdefault("settings", {})

    def save() -> None:
        doc["date"] = time.strftime("%Y-%m-%d")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)

    if args.speed_repeat:
        doc["speed"] = speed(data, work, args.speed_repeat, args.speed_epochs)
        save()
    for spec in args.setting:
        label, _, extra = spec.partition(":")
        res = setting(data, work, args.name, label, shlex.split(extra), args.seeds)
        doc["settings"][label] = res
        save()
        t, w = res["test_accuracy"], res["wall_seconds"]
        print(
            f"{label}: test accuracy {t['mean']:.4f} (min {t['min']:.4f}, max {t['max']:.4f}, seeds "
            f"{' '.join(map(str, args.seeds))}), wall {w['mean']:.0f} s (max {w['max']:.0f} s)"
        )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
