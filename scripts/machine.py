"""What every results file records about the machine it ran on (shared by the scripts in scripts/)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "asimddp")


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests, summed over this VM's CPUs (0 off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_json(cmd: list[str], cwd: str | None = None) -> tuple[dict, float]:
    """Run `cmd`; (its last stdout line as JSON plus `steal`: the share of this VM's CPU time the
    hypervisor gave other guests meanwhile, wall seconds). Exits with the command's stderr on failure."""
    t0, s0 = time.perf_counter(), steal_seconds()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-2000:]}")
    steal = (steal_seconds() - s0) / (wall * (os.cpu_count() or 1))
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "steal": steal}, wall


def describe_machine() -> dict:
    """CPU model (lscpu), core count, the instruction sets that matter for inference, Python and torch."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def write_results(path: str, doc: dict) -> None:
    """Write a results file atomically (a temporary file renamed over it), indented, ending in a newline."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
