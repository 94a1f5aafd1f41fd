"""Own images, measured: Fashion-MNIST as grayscale PNG, as JPEG and as 3-channel PNG, and a color
set cut from scikit-learn's sample photographs.

    python scripts/own_data.py --fashion /tmp/fmnist --work /tmp/own --results docs/results/own-data.json

What it runs, each as a user would (`python -m cnnkit ... --json`, default arch and recipe, the
checkpoint chosen on validation carved from training, testing measured once per run):

1. Fashion-MNIST three ways, the same images: the PNG tree as given (8-bit gray), re-encoded as JPEG
   (Pillow, quality 90, one gray component) and as 3-channel PNG (gray repeated; `--color auto` makes
   that an RGB model). `cnnkit train` for each and each seed: test accuracy, mean and spread.
2. Speed: seed 0's gray model exported to ONNX; `cnnkit infer` over the 60,000 training images as
   PNG and as JPEG, alternating, `--rounds` times each (median images/s).
3. Color: 32 x 32 patches cut from `china.jpg` and `flower.jpg` (scikit-learn's bundled photos).
   `photo`: which photo a patch comes from (2 classes, saved as color JPEG, quality 95; training
   patches from the left 70% of each photo, testing from the rest). `hue`: 4 classes that differ in
   hue only: each patch's luminance (BT.601, the one cnnkit's grayscale uses) is kept and its color
   replaced by a chroma of fixed radius at the class's angle (+-20 degrees), so a grayscale model sees
   the same distribution in every class and can only guess, while an RGB model can read the hue.
   Both trained `--color rgb` and `--color gray`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine, run_json, write_results  # noqa: E402

CNNKIT = [sys.executable, "-m", "cnnkit"]


def _convert_tree(src: str, dst: str, kind: str) -> str:
    """A copy of the PNG tree `src` as `kind` ("jpeg": quality 90 gray JPEG; "rgb": 3-channel PNG)."""
    if os.path.isdir(dst):
        return dst
    tmp = dst + ".part"
    for folder, _, files in os.walk(src):
        out = os.path.join(tmp, os.path.relpath(folder, src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            with Image.open(os.path.join(folder, name)) as im:
                if kind == "jpeg":
                    im.convert("L").save(os.path.join(out, name[:-4] + ".jpg"), quality=90)
                else:
                    im.convert("RGB").save(os.path.join(out, name), compress_level=1)
    os.rename(tmp, dst)
    return dst


def _train(tree: str, seed: int, out: str, *extra: str) -> dict:
    result, wall = run_json([*CNNKIT, "train", tree, "--seed", str(seed), "--out", out, *extra, "--json"])
    keep = ("test_accuracy", "val_accuracy", "best_epoch", "epochs", "input_shape", "color", "train_seconds")
    return {"seed": seed, **{k: result.get(k) for k in keep}, "wall_seconds": round(wall, 1)}


def _summary(runs: list[dict]) -> dict:
    acc = [r["test_accuracy"] for r in runs]
    spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
    return {"test_accuracy_mean": round(statistics.mean(acc), 4), "test_accuracy_stdev": round(spread, 4)}


def fashion_accuracy(trees: dict[str, str], seeds: list[int], work: str) -> dict:
    out = {}
    for name, tree in trees.items():
        runs = [_train(tree, s, os.path.join(work, "runs", f"{name}-{s}")) for s in seeds]
        out[name] = {"command": f"cnnkit train {tree} --seed S", "runs": runs, **_summary(runs)}
        print(name, out[name]["test_accuracy_mean"], out[name]["test_accuracy_stdev"], file=sys.stderr)
    return out


def infer_speed(model: str, folders: dict[str, str], rounds: int, work: str) -> dict:
    speeds: dict[str, list[float]] = {name: [] for name in folders}
    for _ in range(rounds):
        for name, folder in folders.items():
            csv = os.path.join(work, f"speed-{name}.csv")
            result, _ = run_json([*CNNKIT, "infer", folder, "--model", model, "--output", csv, "--json"])
            speeds[name].append(result["n_images"] / result["seconds"])
    out = {
        name: {"images_per_second": [round(v) for v in vs], "median": round(statistics.median(vs))}
        for name, vs in speeds.items()
    }
    first, *rest = folders
    for name in rest:
        out[name]["vs_" + first] = round(out[name]["median"] / out[first]["median"], 3)
    return out


def _patches(img: np.ndarray, n: int, cols: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    h, w, _ = img.shape
    x0, x1 = int(cols[0] * w), int(cols[1] * w) - 32
    ys, xs = rng.integers(0, h - 32, n), rng.integers(x0, x1, n)
    return np.stack([img[y : y + 32, x : x + 32] for y, x in zip(ys, xs, strict=True)])


def _recolor(patches: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each patch's BT.601 luminance (scaled into 70..185) and give it a chroma of radius 35 at
    `angle` +- 20 degrees: no channel clips, so the luminance survives rounding within 1."""
    y = patches.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    y = 70 + 115 * (y - y.min(axis=(1, 2), keepdims=True)) / np.maximum(np.ptp(y, axis=(1, 2), keepdims=True), 1)
    theta = np.deg2rad(angle + rng.uniform(-20, 20, (len(patches), 1, 1)))
    cb, cr = 35 * np.cos(theta), 35 * np.sin(theta)
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def color_sets(work: str, seed: int = 0) -> dict[str, str]:
    """The `photo` and `hue` trees (see the module docstring), written once."""
    from sklearn.datasets import load_sample_image

    photos = {name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")}
    rng = np.random.default_rng(seed)
    roots = {"photo": os.path.join(work, "photo"), "hue": os.path.join(work, "hue")}
    if all(os.path.isdir(r) for r in roots.values()):
        return roots
    for split, cols, n in (("training", (0.0, 0.7), 400), ("testing", (0.7, 1.0), 100)):
        for name, img in photos.items():
            for i, p in enumerate(_patches(img, n, cols, rng)):
                _save(Image.fromarray(p), roots["photo"], split, name, f"{i}.jpg", quality=95)
        for k, angle in enumerate((0, 90, 180, 270)):
            mixed = np.concatenate([_patches(img, n // 2, cols, rng) for img in photos.values()])
            for i, p in enumerate(_recolor(mixed, angle, rng)):
                _save(Image.fromarray(p), roots["hue"], split, f"hue{k * 90:03d}", f"{i}.png")
    return roots


def _save(im: Image.Image, root: str, split: str, label: str, name: str, **kw: object) -> None:
    folder = os.path.join(root, split, label)
    os.makedirs(folder, exist_ok=True)
    im.save(os.path.join(folder, name), **kw)


def color_accuracy(roots: dict[str, str], seeds: list[int], work: str) -> dict:
    out = {}
    for name, root in roots.items():
        for color in ("rgb", "gray"):
            runs = [_train(root, s, os.path.join(work, "runs", f"{name}-{color}-{s}"), "--color", color) for s in seeds]
            key = f"{name}-{color}"
            out[key] = {"command": f"cnnkit train {root} --color {color} --seed S", "runs": runs, **_summary(runs)}
            print(key, out[key]["test_accuracy_mean"], out[key]["test_accuracy_stdev"], file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fashion", required=True, help="Fashion-MNIST PNG tree (training/, testing/)")
    ap.add_argument("--work", default="/tmp/own")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["fashion", "speed", "color"])
    ap.add_argument("--results", required=True)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    trees = {
        "png": args.fashion,
        "jpeg": _convert_tree(args.fashion, os.path.join(args.work, "fashion-jpeg"), "jpeg"),
        "rgb_png": _convert_tree(args.fashion, os.path.join(args.work, "fashion-rgb"), "rgb"),
    }
    results: dict = {"script": "scripts/own_data.py", "argv": sys.argv[1:], "machine": describe_machine()}
    results["date"] = time.strftime("%Y-%m-%d")
    if "fashion" not in args.skip:
        results["fashion"] = fashion_accuracy(trees, args.seeds, args.work)
    if "speed" not in args.skip:
        model = os.path.join(args.work, "runs", "png-0", "model.onnx")
        if not os.path.exists(model):
            run_json([*CNNKIT, "export", os.path.join(args.work, "runs", "png-0", "best.pt"), "--json"])
        folders = {"png": os.path.join(trees["png"], "training"), "jpeg": os.path.join(trees["jpeg"], "training")}
        results["infer_speed"] = {
            "model": "small, trained (png seed 0)",
            **infer_speed(model, folders, args.rounds, args.work),
        }
    if "color" not in args.skip:
        results["color"] = color_accuracy(color_sets(args.work), args.seeds, args.work)
    results["seconds"] = round(time.time() - t0)
    write_results(args.results, results)


if __name__ == "__main__":
    main()
