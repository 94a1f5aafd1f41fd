"""Benchmark `cnnkit infer` against three ways of doing the same job, on the same folder and model.

Results
-------
Each run with `--results docs/results/infer-<model>.json` writes the machine (lscpu model and ISA
flags, cores, versions), the model (arch, parameters, trained or not, its run's config, selection and
test accuracy), the command, every run and the summary table. The README quotes those files.

Method: each method runs in a fresh process, in turn (round-robin over repeats), optionally started
only when no other process is runnable (`--wait-quiet`); a run can only be slowed by other jobs, so
the table compares best runs. The page cache is warmed first (every file read once).
Compared (images/s: from listing the folder to the last prediction, imports of torch/onnxruntime
excluded for the peers, while cnnkit's number, from `InferResult`, includes its own onnxruntime
import and session; wall: the whole process, interpreter start to exit):
    lecture        torch.stack([torchvision.io.read_image(f) for f in files]) + eager model, batch 256
    imagefolder    torchvision ImageFolder(Grayscale + PILToTensor) + DataLoader(num_workers=2,
                   batch 256) + eager model
    ort+pillow     Pillow decode loop + onnxruntime CPU session (default options), batches of 256
    cnnkit         cnnkit.runtime.infer.infer(): 2 pyspng decode processes + onnxruntime (1 thread,
                   runs of 64) in the main process, predictions CSV written
    predictor      cnnkit.Predictor(model).predict(list of paths): the same decoding and session, from
                   Python; its images/s counts the listing, creating the Predictor (onnxruntime's import,
                   the session, the decoder processes) and predict, as cnnkit's counts its own steps;
                   `predict_seconds` is predict alone (a Predictor already made)
    cnnkit-int8    as cnnkit, on the INT8 file (`--int8-model`, default model.int8.onnx beside --model)
    openvino       as cnnkit with backend="openvino" (`cnnkit infer --backend openvino`: f32 precision
                   hint, 1 thread beside the decoders); the first run pays the first-use parity check
                   against onnxruntime (256 images), later runs reuse its verdict (a cache per benchmark)
    openvino-int8  the same on the INT8 file
With an openvino method, the model-only table also times OpenVINO on both files, and `backend_parity`
compares OpenVINO with onnxruntime on every decoded image of the folder (full outputs: max |diff|,
argmax agreement), fp32 and INT8.
The torch peers run the checkpoint's weights (`--checkpoint`, default runs/latest/best.pt); without
one they run random weights, and the results file says `"trained": false`.

Tuning notes behind cnnkit's defaults (2026-11-28, a 2-core Xeon 2.5 GHz VM, the lecture CNN with random
    weights, 60,000 Fashion-MNIST PNGs; 5 alternating runs per setting, medians; not re-measured since):
    CPU per image: decode ~25 us in a worker (libspng + zlib ~12 us, open/read/close ~4 us; it was
    80 us before `read_image` stopped asking `f.read()` for 256 MB per call), onnxruntime ~11 us
    on one core in runs of 64 images vs ~17 us in runs of 256+ (the conv activations of 64 images,
    2.4 MB, stay in cache), CSV ~1 us per row with plain f-strings (~2 us with the csv module).
    decode workers 2 vs 3: 40.6k vs 40.5k img/s; in another series 2 / 1 / 0 workers: 33.6k / 31.4k
    / 25.6k; onnxruntime threads 1 vs 2 (with 2 workers): 40.6k vs 36.0k (the second thread
    preempts the decoders and costs more CPU in all);
    run slices of 32 / 64 / 128: 41.9k / 40.6k / 39.2k; decode task of 512 / 1024 / 2048 / 4096
    files: 33.8k / 36.5k / 37.2k / 35.2k (each task is a round trip through the process pool);
    pickled batches vs a shared-memory ring (decoding alone, 2 workers): main process 1.8 vs 1.1 us
    per image, 61-64k vs 68k img/s: too small a gain to justify the code, so batches are pickled.
    Workers or not: break-even near 4,000 files (0.2-0.4 s runs), hence workers from 4,096 files.
Whole process (`python -c "...infer(folder, model)"`, same machine and model, quiet): 60,000 images in
    1.87-1.95 s (34,000-37,000 img/s reported), 1 image in 0.24-0.29 s, 180,000 images (the
    same files hard-linked three times) in 4.5-4.9 s. Peak RSS: main 84 MB at 60k files, 96 MB at
    180k (the file list, ~90 bytes per file); each decode worker 36 / 48 MB.

Usage:
    python scripts/bench_infer.py FOLDER --model M.onnx [--device cpu|cuda] [--repeat 2]
        [--checkpoint best.pt] [--methods lecture,imagefolder,ort+pillow,cnnkit,predictor] [--wait-quiet]
        [--json]
        [--results docs/results/infer-<model>.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

METHODS = ("lecture", "imagefolder", "ort+pillow", "cnnkit", "predictor", "cnnkit-int8", "openvino", "openvino-int8")
BATCH = 256
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# The methods (each runs in its own process; prints one JSON line on stdout)


def _eager_model(onnx_path: str, checkpoint: str | None):
    from cnnkit.meta import is_user_arch
    from cnnkit.models import build_model
    from cnnkit.runtime.session import read_meta

    if checkpoint and os.path.isfile(checkpoint):
        from cnnkit.checkpoint import model_from_checkpoint

        model, _, _ = model_from_checkpoint(checkpoint)
        return model, "checkpoint"
    meta = read_meta(onnx_path)
    if is_user_arch(meta.arch):  # building it would import a module the file names: never done unasked
        raise SystemExit(f"{onnx_path}: user arch {meta.arch!r}; this script rebuilds built-in archs only")
    c, h, w = meta.input_shape
    model, _ = build_model(meta.arch, meta.num_classes, h, w, c)
    return model.eval(), "random init"


def _files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))


def run_lecture(a: argparse.Namespace) -> dict:
    import torch
    import torchvision

    dev = torch.device(a.device)
    model, weights = _eager_model(a.model, a.checkpoint)
    model.to(dev)
    t0 = time.perf_counter()
    files = _files(a.folder)
    x = torch.stack([torchvision.io.read_image(f) for f in files])
    preds = []
    with torch.inference_mode():
        for i in range(0, len(x), BATCH):
            preds.append(model(x[i : i + BATCH].to(dev)).argmax(1).cpu())
    n = len(torch.cat(preds))
    return {"n": n, "seconds": time.perf_counter() - t0, "weights": weights}


def _gray_tensor_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.Grayscale(), transforms.PILToTensor()])


def run_imagefolder(a: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dev = torch.device(a.device)
    model, weights = _eager_model(a.model, a.checkpoint)
    model.to(dev)
    t0 = time.perf_counter()
    ds = ImageFolder(a.folder, transform=_gray_tensor_transform())
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, shuffle=False)
    n = 0
    with torch.inference_mode():
        for x, _ in loader:
            n += len(model(x.to(dev)).argmax(1).cpu())
    return {"n": n, "seconds": time.perf_counter() - t0, "weights": weights}


def run_ort_pillow(a: argparse.Namespace) -> dict:
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    t0 = time.perf_counter()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if a.device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(a.model, providers=providers)
    name = sess.get_inputs()[0].name
    files = _files(a.folder)
    n = 0
    for i in range(0, len(files), BATCH):
        x = np.stack([np.asarray(Image.open(f).convert("L")) for f in files[i : i + BATCH]])[:, None]
        n += len(sess.run(None, {name: x})[0].argmax(1))
    return {"n": n, "seconds": time.perf_counter() - t0, "provider": sess.get_providers()[0]}


def run_cnnkit(a: argparse.Namespace, model: str | None = None, backend: str = "onnxruntime") -> dict:
    from cnnkit.runtime.infer import infer

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "predictions.csv")
        res = infer(a.folder, model or a.model, device=a.device, output=out, backend=backend)
    d = res.to_dict()
    return {
        "n": d["n_images"],
        "seconds": d["seconds"],
        "provider": d["provider"],
        "workers": d["workers"],
        "threads": d["threads"],
        "n_failed": d["n_failed"],
        "accuracy": d["accuracy"],
        "backend": d["backend"],
        "backend_config": d["backend_config"],
        "backend_parity": d["backend_parity"],
    }


def _int8_model(a: argparse.Namespace) -> str:
    return a.int8_model or os.path.join(os.path.dirname(os.path.abspath(a.model)), "model.int8.onnx")


def backend_parity(a: argparse.Namespace) -> dict:
    """OpenVINO vs onnxruntime (cnnkit's sessions, 1 thread) on every decodable image of the folder."""
    import numpy as np

    from cnnkit.batches import load_images
    from cnnkit.meta import predict
    from cnnkit.runtime.backends import create_session

    out = {}
    for name, model in (("fp32", a.model), ("int8", _int8_model(a))):
        ort = create_session(model, device="cpu", threads=1)
        ov = create_session(model, device="cpu", threads=1, backend="openvino")
        images = load_images(a.folder, ort.meta, limit=None).images
        x, y = ort.run(images).astype(np.float64), ov.run(images).astype(np.float64)
        same = predict(x, ort.meta.output)[0] == predict(y, ort.meta.output)[0]
        out[name] = {
            "model": os.path.abspath(model),
            "n_images": len(images),
            "max_abs_diff": float(np.abs(x - y).max()),
            "argmax_agreement": float(same.mean()),
            "n_disagree": int((~same).sum()),
        }
    return out


def run_predictor(a: argparse.Namespace) -> dict:
    from cnnkit import Predictor
    from cnnkit.listing import list_pngs

    t0 = time.perf_counter()
    paths = [os.path.join(a.folder, f) for f in list_pngs(a.folder).files]
    with Predictor(a.model, device=a.device) as p:
        t1 = time.perf_counter()
        n = len(p.predict(paths))
        t2 = time.perf_counter()
        provider = p.provider
    return {"n": n, "seconds": t2 - t0, "predict_seconds": t2 - t1, "provider": provider}


def run_models(a: argparse.Namespace) -> dict:
    """Model-only throughput at a large batch on the CPU: eager torch, TorchScript (traced), onnxruntime."""
    import warnings

    import onnxruntime as ort
    import torch

    from cnnkit.runtime.session import create_session, read_meta

    model, _ = _eager_model(a.model, a.checkpoint)
    c, h, w = read_meta(a.model).input_shape
    big = 8192
    x = torch.randint(0, 256, (big, c, h, w), dtype=torch.uint8)
    xn = x.numpy()

    def best_rate(fn, reps: int = 5) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return big / best

    out = {}
    with torch.inference_mode():
        out["eager torch"] = best_rate(lambda: model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x[:2])
    with torch.inference_mode():
        out["torchscript (trace)"] = best_rate(lambda: traced(x))
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    out["onnxruntime cpu (default options)"] = best_rate(lambda: sess.run(None, {"images": xn}))
    cn = create_session(a.model, device="cpu", threads=1)
    out["onnxruntime cpu (cnnkit session: 1 thread, runs of 64)"] = best_rate(lambda: cn.run(xn))
    cn2 = create_session(a.model, device="cpu")
    out["onnxruntime cpu (cnnkit session: all cores, runs of 64)"] = best_rate(lambda: cn2.run(xn))
    if os.path.isfile(_int8_model(a)):
        q = create_session(_int8_model(a), device="cpu", threads=1)
        out["onnxruntime cpu int8 (cnnkit session: 1 thread)"] = best_rate(lambda: q.run(xn))
    if a.openvino:
        from cnnkit.runtime.openvino import create_openvino_session

        for label, model in (("", a.model), (" int8", _int8_model(a))):
            ov = create_openvino_session(model, device="cpu", threads=1)
            out[f"openvino cpu{label} (cnnkit session: f32 hint, 1 thread, batch 256)"] = best_rate(
                lambda ov=ov: [ov.run(xn[i : i + BATCH]) for i in range(0, big, BATCH)]
            )
    return {"rates": out, "batch": big, "torch_threads": torch.get_num_threads()}


RUNNERS = {
    "lecture": run_lecture,
    "imagefolder": run_imagefolder,
    "ort+pillow": run_ort_pillow,
    "cnnkit": run_cnnkit,
    "predictor": run_predictor,
    "cnnkit-int8": lambda a: run_cnnkit(a, _int8_model(a)),
    "openvino": lambda a: run_cnnkit(a, backend="openvino"),
    "openvino-int8": lambda a: run_cnnkit(a, _int8_model(a), backend="openvino"),
    "models": run_models,
    "backend_parity": backend_parity,
}


# --------------------------------------------------------------------------------------------
# The driver


def _tree_pss_kb(pid: int) -> int:
    """Proportional set size of a process and its descendants (shared pages split, not counted twice)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def wait_quiet(max_wait: float = 120.0) -> bool:
    """Wait (up to max_wait s) until no other process has been runnable for a second (Linux only)."""
    t = time.perf_counter()
    while time.perf_counter() - t < max_wait:
        for _ in range(4):
            try:
                with open("/proc/stat") as f:
                    running = next(int(x.split()[1]) for x in f if x.startswith("procs_running"))
            except (OSError, StopIteration):
                return False
            if running > 1:  # this process is the one running
                break
            time.sleep(0.25)
        else:
            return True
        time.sleep(0.5)
    return False


def run_one(method: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", method, a.folder, "--model", a.model]
    cmd += ["--device", a.device] + (["--checkpoint", a.checkpoint] if a.checkpoint else [])
    cmd += (["--int8-model", a.int8_model] if a.int8_model else []) + (["--openvino"] if a.openvino else [])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["CNNKIT_CACHE"] = a.cache  # openvino's parity verdicts: this benchmark's own
    quiet = wait_quiet() if a.wait_quiet else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak_pss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_pss
        while not stop.wait(0.05):
            peak_pss = max(peak_pss, _tree_pss_kb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(method=method, wall=wall, tree_pss_mb=peak_pss / 1024, quiet=quiet)
    if "n" in res:
        res["ips"] = res["n"] / res["seconds"]
    return res


def _child(argv: list[str]) -> None:
    import resource

    p = argparse.ArgumentParser()
    p.add_argument("--_run", dest="method")
    p.add_argument("folder")
    p.add_argument("--model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint")
    p.add_argument("--int8-model")
    p.add_argument("--openvino", action="store_true")
    a = p.parse_args(argv)
    res = RUNNERS[a.method](a)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res.update(rss_mb=self_kb / 1024, child_rss_mb=kids_kb / 1024)  # child: max of any one child
    print(json.dumps(res))


def main() -> None:
    if "--_run" in sys.argv:
        return _child(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--model", required=True, help="ONNX model exported by cnnkit")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="weights for the torch peers (default runs/latest/best.pt)")
    p.add_argument("--methods", default=",".join(METHODS[:5]))
    p.add_argument(
        "--int8-model", default=None, help="for cnnkit-int8/openvino-int8 (default model.int8.onnx beside --model)"
    )
    p.add_argument("--no-models", action="store_true", help="skip the model-only throughput table")
    p.add_argument("--json", action="store_true", help="print every run as JSON on stdout")
    p.add_argument("--wait-quiet", action="store_true", help="before each run, wait until no other process is runnable")
    p.add_argument(
        "--results",
        help="write the runs, the model and the machine to this JSON file (docs/results/infer-<model>.json)",
    )
    a = p.parse_args()
    if a.checkpoint is None and os.path.isfile("runs/latest/best.pt"):
        a.checkpoint = "runs/latest/best.pt"
    methods = [m for m in a.methods.split(",") if m]
    a.openvino = any(m.startswith("openvino") for m in methods)
    a.cache = tempfile.mkdtemp(prefix="bench-infer-cache-")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    t = time.perf_counter()
    files = _files(a.folder)
    for f in files:  # warm the page cache so that no method pays for the disk
        with open(f, "rb") as fh:
            fh.read()
    print(
        f"{len(files):,} PNGs under {a.folder}, page cache warmed in {time.perf_counter() - t:.1f} s", file=sys.stderr
    )

    runs: list[dict] = []
    for r in range(a.repeat):  # round-robin: drift on a shared machine hits every method alike
        for m in methods if r % 2 == 0 else methods[::-1]:
            res = run_one(m, a)
            runs.append(res)
            print(
                f"  run {r + 1}/{a.repeat} {m:12s} {res['ips']:9,.0f} img/s  wall {res['wall']:.2f} s"
                + ("" if res["quiet"] is None else f"  (started quiet: {res['quiet']})"),
                file=sys.stderr,
            )
    models = None if a.no_models else run_one("models", a)
    parity = run_one("backend_parity", a) if a.openvino else None

    from cnnkit.console import table

    # Best run per method: on a shared machine a run can only be slowed down by other jobs, never
    # sped up, so the best run is the least disturbed one (and long runs are disturbed more often,
    # which makes best-vs-best the comparison least favourable to the fast method).
    best = {m: max((x for x in runs if x["method"] == m), key=lambda x: x["ips"]) for m in methods}
    ref = best["cnnkit"]["ips"] if "cnnkit" in best else None
    rows = []
    for m in methods:
        b, per = best[m], [x["ips"] for x in runs if x["method"] == m]
        speedup = f"{ref / b['ips']:.1f}x" if ref else "-"
        rows.append(
            [m, round(b["ips"]), round(statistics.median(per)), speedup]
            + [round(max(x["rss_mb"] for x in runs if x["method"] == m))]
            + [round(max(x["tree_pss_mb"] for x in runs if x["method"] == m)), round(b["wall"], 2)]
        )
    # peak RSS: the method's main process (ru_maxrss). tree PSS: peak of the summed proportional set
    # size of the process and its workers, sampled every 50 ms (shared pages counted once).
    head = ["method", "best img/s", "median img/s", "cnnkit speed-up", "peak RSS MB", "tree PSS MB", "wall s"]
    print(table(head, rows))
    if models:
        print()
        print(f"model only, batch {models['batch']} (torch threads {models['torch_threads']}):")
        print(table(["runtime", "images/s"], [[k, round(v)] for k, v in models["rates"].items()]))
    if parity:
        for k in ("fp32", "int8"):
            print(
                f"openvino vs onnxruntime, {k}: " + ", ".join(f"{n} {v}" for n, v in parity[k].items() if n != "model")
            )
    if a.json:
        print(json.dumps({"runs": runs, "models": models, "backend_parity": parity}, indent=2))
    if a.results:
        summary = {
            m: {
                "best_ips": r[1],
                "median_ips": r[2],
                "cnnkit_speedup": r[3],
                "peak_rss_mb": r[4],
                "tree_pss_mb": r[5],
                "best_wall_s": r[6],
            }
            for m, r in zip(methods, rows, strict=True)
        }
        body = {"summary": summary, "runs": runs, "models": models, "files": len(files)}
        if parity:
            body["backend_parity"] = parity
        if "predictor" in summary and "cnnkit" in summary:  # the Python API's target: within 10% of the CLI
            predict_only = [x["n"] / x["predict_seconds"] for x in runs if x["method"] == "predictor"]
            body["predictor_predict_only_median_ips"] = round(statistics.median(predict_only))
            body["predictor_vs_cnnkit_median"] = round(
                summary["predictor"]["median_ips"] / summary["cnnkit"]["median_ips"], 3
            )
        _write_results(a, body)


def describe_model(onnx_path: str, checkpoint: str | None) -> dict:
    """Which model was measured: arch, parameters, trained or not, and how it scored where it was trained."""
    from cnnkit.runtime.session import read_meta

    meta = read_meta(onnx_path)
    info = {
        "onnx": os.path.abspath(onnx_path),
        "arch": meta.arch,
        "classes": meta.num_classes,
        "input_shape": list(meta.input_shape),
        "trained": False,
    }
    if checkpoint and os.path.isfile(checkpoint):
        from cnnkit.models import count_parameters

        model, _ = _eager_model(onnx_path, checkpoint)
        info["parameters"] = count_parameters(model)
        metrics = os.path.join(os.path.dirname(checkpoint), "metrics.json")
        if os.path.isfile(metrics):
            m = json.load(open(metrics))
            info.update(
                trained=True,
                checkpoint=os.path.abspath(checkpoint),
                config=m.get("config"),
                selection=m.get("selection"),
                test_accuracy=m.get("test_accuracy"),
            )
    return info


def _write_results(a: argparse.Namespace, body: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe_machine

    doc = {
        "script": "scripts/bench_infer.py",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe_machine(),
        "model": describe_model(a.model, a.checkpoint),
        "folder": os.path.abspath(a.folder),
        **body,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    with open(a.results + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(a.results + ".tmp", a.results)
    print(f"wrote {a.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
