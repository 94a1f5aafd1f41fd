"""Exercise every CUDA path of cnnkit once and print a pass/fail table (driven by scripts/gpu_check.sh).

Rows, in order (each a fresh `cnnkit` process, as a user runs it):
    CPU rows, always:
        doctor           `cnnkit doctor --json`: the onnxruntime install and which providers really load
        train cpu        `cnnkit train DATA --device cpu --epochs 5`: the reference for the rows below
        export onnx      `cnnkit export --format onnx` of that run (parity gate on the CPU provider)
        infer cpu        `cnnkit infer DATA/testing --device cpu`
    GPU rows, when torch sees a CUDA device (else the script says so and stops, exit 0):
        doctor cuda      the CUDA provider loads (no silent CPU fallback) and torch sees the GPU
        train cuda       `cnnkit train DATA --device cuda` with AMP: images/s, test accuracy
        resume cuda      the same run killed after epoch 1 (SIGTERM) and `--resume`d vs uninterrupted:
                         same selected epoch, test accuracy within 0.5 points (cuDNN kernels are not
                         bit-deterministic, so "same" is stated as a tolerance, and the diff is shown)
        export *         onnx, torchscript, pt2 of the CUDA run (gates on the CPU reference), and
                         `--half --device cuda --strict`: the fp16 gate on the CUDA provider, TF32 off
        bench cuda       `cnnkit bench --device cuda`: every artifact row runs on the GPU (TF32 on, as
                         infer runs), none errors, diffs within each precision's tier
        infer cuda       `cnnkit infer DATA/training --device cuda`: images/s, GPU utilisation sampled
                         with nvidia-smi, predictions equal to the CPU provider's on the same files
        torchrun         `torchrun --nproc-per-node N -m cnnkit train` (N = GPUs, at most 2; NCCL when
                         N > 1)
        tensorrt         not a cnnkit provider (yet): reported as skipped

Exit status: 0 when every row that ran passed (and on a machine without a GPU after the CPU rows),
1 otherwise. `--json FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

ROWS: list[dict] = []
PY = sys.executable
JSON_OUT: list[str] = []  # where the rows are saved after each one (a check cut short keeps the rows so far)


def cnnkit(*args: str, cwd: str, timeout: float = 600, env: dict | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(
        [PY, "-m", "cnnkit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def row(name: str, fn, *args) -> dict | None:
    """Run one check; record pass / FAIL with its seconds and a one-line detail. Returns fn's value."""
    t0 = time.perf_counter()
    try:
        ok, detail, value = fn(*args)
    except Exception as e:  # a check that crashed is a failed row, and the next rows still run
        ok, detail, value = False, f"{type(e).__name__}: {last_line(str(e))}", None
    ROWS.append({"check": name, "passed": ok, "seconds": round(time.perf_counter() - t0, 1), "detail": detail})
    print(f"{'pass' if ok else 'FAIL':<5} {name:<18} {ROWS[-1]['seconds']:>7.1f} s  {detail}", flush=True)
    save_rows()
    return value


def save_rows() -> None:
    for path in JSON_OUT:
        with open(path + ".tmp", "w") as f:
            json.dump(ROWS, f, indent=1)
        os.replace(path + ".tmp", path)


def skip(name: str, why: str) -> None:
    ROWS.append({"check": name, "passed": None, "seconds": 0.0, "detail": why})
    print(f"{'skip':<5} {name:<18} {0.0:>7.1f} s  {why}", flush=True)
    save_rows()


# --------------------------------------------------------------------------------------------
# checks: each returns (passed, detail, value)


def check_doctor(work: str, want_cuda: bool):
    code, out, err = cnnkit("doctor", "--json", cwd=work)
    d = last_json(out)
    if not want_cuda:
        return code in (0, 1) and bool(d), f"exit {code}; {len(json.dumps(d))} bytes of report", d
    ort = d.get("onnxruntime", {})
    loads = "CUDAExecutionProvider" in ort.get("working", []) and code == 0
    said = ort.get("errors", {}).get("CUDAExecutionProvider") or ort.get("cuda_library_loader") or ""
    return (
        loads,
        (
            f"exit {code}; onnxruntime {ort.get('version')}: CUDA provider "
            f"{'loads' if loads else 'does NOT load'}{'; ' + said[:200] if said and not loads else ''}; "
            f"GPU {d.get('gpu', {}).get('name', '?')}, driver {d.get('gpu', {}).get('driver', '?')}"
        ),
        d,
    )


def check_train(work: str, data: str, device: str, out: str, epochs: int, min_acc: float):
    code, stdout, err = cnnkit(
        "train", data, "--device", device, "--epochs", str(epochs), "--out", out, "--json", cwd=work
    )
    r = last_json(stdout)
    if code != 0 or not r:
        return False, f"exit {code}: {last_line(err)}", None
    ok = r["device"].startswith(device.split(":")[0]) and (r["test_accuracy"] or 0) >= min_acc
    return (
        ok,
        (
            f"{r['device']}, {r['train_images_per_second']:,.0f} img/s, test acc {r['test_accuracy']:.4f} "
            f"(epoch {r['best_epoch']}/{r['epochs']} by validation)"
        ),
        r,
    )


def check_resume(work: str, data: str, reference: dict, epochs: int):
    """Kill a run after epoch 1's checkpoint, resume it, compare with the uninterrupted `reference`."""
    out = os.path.join(work, "resumed")
    cmd = [PY, "-m", "cnnkit", "train", data, "--device", "cuda", "--epochs", str(epochs), "--out", out, "--json"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.json")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.load(open(metrics))["history"]) >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    if proc.returncode != 130:
        return False, f"the interrupted run exited {proc.returncode}, expected 130", None
    code, stdout, err = cnnkit("train", "--resume", out, "--device", "cuda", "--json", cwd=work)
    r = last_json(stdout)
    if code != 0 or not r:
        return False, f"resume exit {code}: {last_line(err)}", None
    diff = abs(r["test_accuracy"] - reference["test_accuracy"]) * 100
    ok = r["epochs"] == reference["epochs"] and r["best_epoch"] == reference["best_epoch"] and diff <= 0.5
    return (
        ok,
        (
            f"selected epoch {r['best_epoch']} vs {reference['best_epoch']}, test acc {r['test_accuracy']:.4f} vs "
            f"{reference['test_accuracy']:.4f} ({diff:.2f} points)"
        ),
        r,
    )


def check_export(work: str, ckpt: str, *args: str):
    code, stdout, err = cnnkit("export", ckpt, *args, "--json", cwd=work)
    r = last_json(stdout)
    if code != 0 or not r:
        return False, f"exit {code}: {last_line(err)}", None
    p = r.get("parity") or {}
    ok = bool(r.get("verified")) and bool(p.get("passed"))
    diff = p.get("max_abs_diff", float("nan"))
    return (
        ok,
        (
            f"{r['precision']} gate on {r.get('verified_on')}: max abs diff {diff:.1e}, "
            f"agreement {p.get('argmax_agreement', 0):.2%}"
        ),
        r,
    )


def check_bench(work: str, run: str):
    code, stdout, err = cnnkit("bench", "--run", run, "--device", "cuda", "--json", cwd=work)
    r = last_json(stdout)
    if code != 0 or not r:
        return False, f"exit {code}: {last_line(err)}", None
    tiers = {"onnx-int8": 0.5, "onnx-fp16": 5e-2}
    bad = [
        x["artifact"]
        for x in r["rows"]
        if x.get("error") or x.get("max_abs_diff") is None or x["max_abs_diff"] >= tiers.get(x["artifact"], 1e-2)
    ]
    shown = ", ".join(f"{x['artifact']} {x.get('images_per_second') or 0:,.0f} img/s" for x in r["rows"])
    return not bad and bool(r["rows"]), (f"failed: {', '.join(bad)}; " if bad else "") + shown, r


class GpuSampler:
    """Mean GPU utilisation (nvidia-smi, every 0.2 s) while a block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def predictions(path: str) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return {r["path"]: r["predicted"] for r in csv.DictReader(f)}


def check_infer(work: str, folder: str, model: str, device: str, out: str, reference: str | None):
    with GpuSampler() as gpu:
        code, stdout, err = cnnkit(
            "infer", folder, "--model", model, "--device", device, "--output", out, "--json", cwd=work
        )
    r = last_json(stdout)
    if code != 0 or not r:
        return False, f"exit {code}: {last_line(err)}", None
    ok = r["provider"].startswith("CUDA") if device.startswith("cuda") else True
    detail = f"{r['provider']}, {r['n_images']:,} images at {r['images_per_second']:,.0f} img/s"
    if gpu.samples and device.startswith("cuda"):
        detail += f", GPU busy {sum(gpu.samples) / len(gpu.samples):.0f}% (mean of {len(gpu.samples)} samples)"
    if reference:
        a, b = predictions(out), predictions(reference)
        differ = sum(a[k] != b.get(k) for k in a)
        ok = ok and a.keys() == b.keys() and differ <= max(1, len(a) // 1000)
        detail += f"; {differ} of {len(a):,} predictions differ from the CPU provider's"
    return ok, detail, r


def check_torchrun(work: str, data: str, n: int):
    torchrun = shutil.which("torchrun", path=os.path.dirname(PY)) or shutil.which("torchrun")
    if torchrun is None:
        return False, "torchrun not found next to this Python", None
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            str(n),
            "-m",
            "cnnkit",
            "train",
            data,
            "--device",
            "cuda",
            "--epochs",
            "1",
            "--out",
            os.path.join(work, "ddp"),
            "--json",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    r = last_json(proc.stdout)
    ok = proc.returncode == 0 and r.get("world_size") == n
    tail = last_line(proc.stderr)
    return (
        ok,
        (
            f"{n} process(es), world size {r.get('world_size')}, test acc {r.get('test_accuracy')}"
            if ok
            else f"exit {proc.returncode}: {tail}"
        ),
        r,
    )


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", help="folder with training/ and testing/ (default: the bundled digits)")
    ap.add_argument("--work", default="gpu-check", help="scratch folder (replaced)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--min-accuracy", type=float, default=0.8)
    ap.add_argument("--json", dest="json_out", help="also write the rows here")
    a = ap.parse_args()
    if a.json_out:
        JSON_OUT.append(os.path.abspath(a.json_out))
    work = os.path.abspath(a.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data = os.path.abspath(a.data) if a.data else os.path.join(work, "digits")
    if not a.data:
        subprocess.run([PY, "-m", "cnnkit", "data", "sample", "--out", data], check=True, capture_output=True)

    import torch

    cuda = torch.cuda.is_available()
    print(
        f"# cnnkit GPU check: torch {torch.__version__} (CUDA build {torch.version.cuda}), "
        f"{torch.cuda.device_count()} GPU(s){': ' + torch.cuda.get_device_name(0) if cuda else ''}; data {data}"
    )
    row("doctor", check_doctor, work, False)
    cpu_run = os.path.join(work, "cpu")
    row("train cpu", check_train, work, data, "cpu", cpu_run, a.epochs, a.min_accuracy)
    row("export onnx cpu", check_export, work, os.path.join(cpu_run, "best.pt"), "--format", "onnx")
    cpu_csv = os.path.join(work, "cpu.csv")
    row(
        "infer cpu",
        check_infer,
        work,
        os.path.join(data, "testing"),
        os.path.join(cpu_run, "model.onnx"),
        "cpu",
        cpu_csv,
        None,
    )
    if not cuda:
        print("# no CUDA device here (torch.cuda.is_available() is False): GPU rows skipped; CPU rows above")
        return finish()

    row("doctor cuda", check_doctor, work, True)
    gpu_run = os.path.join(work, "cuda")
    ref = row("train cuda", check_train, work, data, "cuda", gpu_run, a.epochs, a.min_accuracy)
    if ref:
        row("resume cuda", check_resume, work, data, ref, a.epochs)
    ckpt = os.path.join(gpu_run, "best.pt")
    for fmt in ("onnx", "torchscript", "pt2"):
        row(f"export {fmt}", check_export, work, ckpt, "--format", fmt)
    row("export fp16 cuda", check_export, work, ckpt, "--half", "--device", "cuda", "--strict")
    row("bench cuda", check_bench, work, gpu_run)
    model = os.path.join(gpu_run, "model.onnx")
    big = os.path.join(data, "training")
    cpu_big = os.path.join(work, "cpu-big.csv")
    row("infer cpu (ref)", check_infer, work, big, model, "cpu", cpu_big, None)
    row("infer cuda", check_infer, work, big, model, "cuda", os.path.join(work, "cuda-big.csv"), cpu_big)
    row("torchrun", check_torchrun, work, data, min(2, torch.cuda.device_count()))
    skip("tensorrt", "cnnkit has no TensorRT provider option")
    return finish()


def finish() -> int:
    failed = [r["check"] for r in ROWS if r["passed"] is False]
    print(
        f"# {sum(r['passed'] is True for r in ROWS)} passed, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
    )
    save_rows()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
