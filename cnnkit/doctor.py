"""`cnnkit doctor`: why the CUDA provider is (not) running, with the command that fixes each problem.

Torch-free: onnxruntime is imported inside the checks, torch never (its CUDA build is read from the
installed `torch/version.py`, as text). Checks, in order:

  1. onnxruntime distributions: exactly one package that installs the `onnxruntime/` folder
     (`onnxruntime`, `onnxruntime-gpu`, `onnxruntime-directml`, ...). Two at once overwrite each
     other's files and the CUDA provider silently disappears.
  2. onnxruntime imports; its compiled-in providers, and which of them can actually create a session
     for a tiny in-memory model (a provider whose libraries do not load is dropped by onnxruntime
     without an error: the check is `session.get_providers()`).
  3. CUDA majors: torch's CUDA build (`torch.version.cuda`) versus the one onnxruntime-gpu is built
     for (its `nvidia-*` requirements when it declares them, else the rule: 1.27 and later use CUDA 13,
     earlier ones CUDA 12). torch 2.12+ wheels use CUDA 13. Two majors in one environment means one
     of them has no libraries (pip installs only the `nvidia-*-cu13` or `-cu12` wheels each asks for).
  4. GPU and driver (`nvidia-smi`): name, driver version, the highest CUDA the driver supports.
  5. The CPU's integer and bf16 instruction sets and its INT8 class (`cnnkit.cpu`): whether an INT8
     model can be faster here than fp32 (`cnnkit infer --precision auto` decides by that class).

Status per check: `ok`, `note` (worth knowing, not broken) or `problem` (with `fix`, the command).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import cnnkit.cpu as cpu
from cnnkit.runtime.session import CUDA, load_cuda_libraries, quiet_session

ORT_CUDA13_FROM = (1, 27)  # onnxruntime-gpu 1.27+ wheels on PyPI are CUDA 13 builds; earlier: CUDA 12
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525}  # NVIDIA driver branch a CUDA major needs (Linux)
FIX_BOTH = "pip uninstall -y {names} && pip install 'cnnkit[{extra}]'"


@dataclass
class Check:
    """One finding.

    Attributes:
        name: what was checked.
        status: `ok`, `note` or `problem`.
        detail: what was found.
        fix: the command (or action) that fixes a problem; empty otherwise.
    """

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    """Everything `doctor` found; `healthy` is False when any check is a problem."""

    healthy: bool
    checks: list[Check]
    onnxruntime: dict[str, Any] = field(default_factory=dict)
    torch: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "problem"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": len(self.problems)}


# --------------------------------------------------------------------------------------------
# Probes (small functions, so tests can replace any of them)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ort_distributions() -> dict[str, str]:
    """Installed distributions that provide the `onnxruntime` package: {name: version}."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = _normalize(dist.metadata.get("Name") or "")
        if not (name.startswith("onnxruntime") or name.startswith("ort-nightly")):
            continue
        files = dist.files or []
        top = (dist.read_text("top_level.txt") or "").split()
        # onnxruntime-extensions / -genai install other folders (onnxruntime_extensions/ ...): not runtimes.
        if "onnxruntime" in top or any(str(f).startswith("onnxruntime/") for f in files):
            found[name] = dist.version
    return dict(sorted(found.items()))


def ort_requires(dist: str) -> list[str]:
    try:
        return list(metadata.requires(dist) or [])
    except metadata.PackageNotFoundError:
        return []


def torch_build() -> dict[str, Any] | None:
    """{version, cuda} of the installed torch, read without importing it; None when not installed."""
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return None
    cuda = None
    try:
        text = dist.locate_file("torch/version.py").read_text()  # type: ignore[union-attr]
        m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        cuda = m.group(1) if m else None
    except OSError:
        pass
    return {"version": dist.version, "cuda": cuda}


def nvidia_smi() -> dict[str, Any] | None:
    """{name, driver, cuda} of the first GPU from `nvidia-smi`; None when there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        q = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        head = subprocess.run([exe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    if q.returncode != 0:
        return {
            "error": (q.stderr or q.stdout).strip().splitlines()[0]
            if (q.stderr or q.stdout).strip()
            else f"nvidia-smi exited with {q.returncode}"
        }
    first = (q.stdout.strip().splitlines() or [""])[0]
    parts = [p.strip() for p in first.split(",")]
    m = re.search(r"CUDA Version:\s*([0-9.]+)", head.stdout)
    return {
        "name": parts[0] if parts else "",
        "driver": parts[1] if len(parts) > 1 else "",
        "memory": parts[2] if len(parts) > 2 else "",
        "cuda": m.group(1) if m else None,
        "count": len(q.stdout.strip().splitlines()),
    }


def probe_providers() -> dict[str, Any]:
    """Import onnxruntime and try each compiled-in provider on a one-node in-memory model."""
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or a broken mix of two distributions failing in its __init__
        return {"import_error": f"{type(e).__name__}: {e}"}
    available = list(ort.get_available_providers())
    loader = load_cuda_libraries(ort) if CUDA in available else ""
    model = _tiny_model()
    works, errors = [], {}
    ort.set_default_logger_severity(4)  # provider libraries that fail to load log pages of errors
    try:
        for provider in available:
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            try:
                session, said = quiet_session(ort, model, sess_options=opts, providers=[provider])
                used = session.get_providers()
            except Exception as e:
                errors[provider] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                continue
            if provider in used:
                works.append(provider)
            else:
                errors[provider] = said or f"session fell back to {', '.join(used)}"
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)
    report = {"version": ort.__version__, "available": available, "working": works, "errors": errors}
    if loader:
        report["cuda_library_loader"] = loader
    return report


def _tiny_model() -> bytes:
    """A serialized ONNX model y = x + x (opset 13, IR 7): a float Add, which every provider implements.

    Written by hand (protobuf wire format) so that doctor needs neither onnx nor torch.
    """

    def key(field_no: int, wire: int) -> bytes:
        return _varint(field_no << 3 | wire)

    def ld(field_no: int, payload: bytes) -> bytes:
        return key(field_no, 2) + _varint(len(payload)) + payload

    def value_info(name: str) -> bytes:
        dim = ld(1, ld(1, key(1, 0) + _varint(1)))  # TensorShapeProto.dim {dim_value: 1}
        tensor = key(1, 0) + _varint(1) + ld(2, dim)  # elem_type FLOAT, shape
        return ld(1, name.encode()) + ld(2, ld(1, tensor))  # ValueInfoProto {name, type.tensor_type}

    node = ld(1, b"x") + ld(1, b"x") + ld(2, b"y") + ld(4, b"Add")
    graph = ld(1, node) + ld(2, b"doctor") + ld(11, value_info("x")) + ld(12, value_info("y"))
    opset = ld(1, b"") + key(2, 0) + _varint(13)
    return key(1, 0) + _varint(7) + ld(7, graph) + ld(8, opset)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --------------------------------------------------------------------------------------------
# The checks


def _major(version: str | None) -> int | None:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def ort_gpu_cuda_major(version: str, requires: list[str]) -> int:
    """The CUDA major an onnxruntime-gpu build needs: from its nvidia-* requirements, else the rule."""
    for req in requires:
        m = re.match(r"nvidia-cuda-runtime(?:-cu(\d+))?\s*[~=<>!]*\s*(\d+)?", req.replace(" ", ""))
        if m and (m.group(1) or m.group(2)):
            return int(m.group(1) or m.group(2))
    return 13 if _version_tuple(version) >= ORT_CUDA13_FROM else 12


def doctor() -> DoctorReport:
    """Run every check (a few seconds at most: one tiny session per provider, nvidia-smi).

    Returns:
        A `DoctorReport`: `healthy` unless a check found a problem; `format_report` is the human text.
    """
    gpu = nvidia_smi()
    has_gpu = bool(gpu) and "error" not in gpu
    extra = "gpu" if has_gpu else "cpu"  # the cnnkit extra a fix installs
    dists = ort_distributions()
    prov = probe_providers() if dists else {"import_error": "not installed"}
    torch_info = torch_build()
    ort_gpu = dists.get("onnxruntime-gpu")
    need = ort_gpu_cuda_major(ort_gpu, ort_requires("onnxruntime-gpu")) if ort_gpu else None
    checks = [
        *_check_distributions(dists, has_gpu, extra),
        *_check_providers(prov, dists, gpu, has_gpu, extra),
        *_check_cuda_majors(torch_info, ort_gpu, need),
        *_check_gpu(gpu, need, torch_info),
        _check_cpu(cpu.cpu_info()),
    ]
    return DoctorReport(
        healthy=not any(c.status == "problem" for c in checks),
        checks=checks,
        onnxruntime={"distributions": dists, **prov},
        torch=torch_info or {},
        gpu=gpu or {},
        cpu=cpu_report(cpu.cpu_info()),
    )


def _check_distributions(dists: dict[str, str], has_gpu: bool, extra: str) -> list[Check]:
    """1. Exactly one onnxruntime package installs the `onnxruntime/` folder."""
    if not dists:
        return [
            Check(
                "onnxruntime distribution",
                "problem",
                "no onnxruntime package is installed",
                f"pip install 'cnnkit[{extra}]'",
            )
        ]
    if len(dists) > 1:
        names = " ".join(dists)
        return [
            Check(
                "onnxruntime distribution",
                "problem",
                f"{' and '.join(f'{n} {v}' for n, v in dists.items())} are installed together: they share the "
                "onnxruntime/ folder, so whichever installed last overwrote the other's files and the CUDA "
                "provider can silently disappear",
                FIX_BOTH.format(names=names, extra=extra)
                + ("" if has_gpu else "   (or 'cnnkit[gpu]' on a GPU machine)"),
            )
        ]
    ((name, version),) = dists.items()
    return [Check("onnxruntime distribution", "ok", f"{name} {version}")]


def _check_providers(
    prov: dict[str, Any], dists: dict[str, str], gpu: dict[str, Any] | None, has_gpu: bool, extra: str
) -> list[Check]:
    """2. onnxruntime imports, and the providers compiled in can create a session."""
    if "import_error" in prov:
        return (
            [
                Check(
                    "onnxruntime import",
                    "problem",
                    prov["import_error"],
                    FIX_BOTH.format(names=" ".join(dists), extra=extra),
                )
            ]
            if dists
            else []
        )
    checks = [
        Check(
            "providers",
            "ok",
            f"onnxruntime {prov['version']}: compiled in {', '.join(prov['available'])}; "
            f"create a session: {', '.join(prov['working']) or 'none'}",
        )
    ]
    if CUDA in prov["available"] and CUDA not in prov["working"]:
        why = prov["errors"].get(CUDA, "")
        if has_gpu:
            checks.append(
                Check(
                    "CUDA provider",
                    "problem",
                    f"compiled in but cannot create a session ({why}); inference would silently run on the CPU",
                    "pip install 'onnxruntime-gpu[cuda,cudnn]'   (CUDA 13 runtime + cuDNN 9 as pip wheels; "
                    "or put the system CUDA/cuDNN libraries on LD_LIBRARY_PATH)",
                )
            )
        else:
            checks.append(
                Check(
                    "CUDA provider",
                    "note",
                    "compiled in, but there is no NVIDIA GPU here (no nvidia-smi): inference runs on the CPU provider",
                )
            )
    elif CUDA not in prov["available"] and has_gpu:
        cpu_only = [n for n in dists if n != "onnxruntime-gpu"]
        checks.append(
            Check(  # a note: running on the CPU may be deliberate
                "CUDA provider",
                "note",
                f"this machine has a GPU ({gpu.get('name')}) but {', '.join(dists)} has no CUDA provider; "
                "to use the GPU",
                FIX_BOTH.format(names=" ".join(sorted({*cpu_only, "onnxruntime-gpu"})), extra="gpu"),
            )
        )
    for provider, why in prov["errors"].items():
        if provider != CUDA:
            checks.append(Check(f"{provider}", "note", f"compiled in but not usable here: {why}"))
    return checks


def _check_cuda_majors(torch_info: dict[str, Any] | None, ort_gpu: str | None, need: int | None) -> list[Check]:
    """3. torch and onnxruntime-gpu are built for the same CUDA major."""
    if torch_info is None:
        return [Check("torch", "note", "not installed (fine for inference: cnnkit infer is torch-free)")]
    torch_major = _major(torch_info["cuda"])
    detail = f"torch {torch_info['version']}, " + (
        f"built for CUDA {torch_info['cuda']}" if torch_info["cuda"] else "a CPU-only build"
    )
    if ort_gpu and torch_major and need and torch_major != need:
        return [
            Check(
                "CUDA major",
                "problem",
                f"{detail}, but onnxruntime-gpu {ort_gpu} needs CUDA {need}: one of them finds no CUDA libraries "
                "of its major in this environment",
                "pip install -U 'onnxruntime-gpu>=1.27'   (CUDA 13, like torch 2.12+)"
                if torch_major >= 13
                else "pip install 'onnxruntime-gpu<1.27'   (CUDA 12, like this torch), "
                "or upgrade torch to a CUDA 13 build",
            )
        ]
    tail = f"; onnxruntime-gpu {ort_gpu} needs CUDA {need}" if ort_gpu else ""
    return [Check("torch", "ok", detail + tail)]


def _check_gpu(gpu: dict[str, Any] | None, need: int | None, torch_info: dict[str, Any] | None) -> list[Check]:
    """4. A GPU and a driver new enough for the CUDA major the packages need."""
    if gpu is None:
        return [Check("GPU", "note", "no nvidia-smi: no NVIDIA GPU or driver here")]
    if "error" in gpu:
        return [
            Check(
                "GPU",
                "problem",
                f"nvidia-smi failed: {gpu['error']}",
                "reinstall or load the NVIDIA driver (`sudo modprobe nvidia`; check `dmesg`)",
            )
        ]
    driver_cuda = _major(gpu.get("cuda"))
    detail = f"{gpu['name']} (x{gpu['count']}), driver {gpu['driver']}, supports CUDA up to {gpu.get('cuda')}"
    wanted = need or _major(torch_info["cuda"] if torch_info else None)
    if wanted and driver_cuda and driver_cuda < wanted:
        return [
            Check(
                "GPU driver",
                "problem",
                f"{detail}; the installed packages need CUDA {wanted}",
                f"upgrade the NVIDIA driver to the {MIN_DRIVER_FOR_CUDA.get(wanted, '')} branch or "
                "newer (e.g. `sudo apt-get install nvidia-driver-580`)",
            )
        ]
    return [Check("GPU", "ok", detail)]


def cpu_report(info: cpu.CpuInfo) -> dict[str, Any]:
    """`--json`'s `cpu`: model name, where the flags came from, the INT8 class and each feature."""
    return {
        "model": info.model,
        "source": info.source,
        "isa_class": cpu.isa_class_of(info),
        "features": info.features(),
    }


def _check_cpu(info: cpu.CpuInfo) -> Check:
    """5. The CPU's INT8 class: a note where INT8 models are not expected to be faster."""
    klass = cpu.isa_class_of(info)
    have = [name for name, on in info.features().items() if on]
    detail = f"{info.model}: INT8 class {klass} ({', '.join(have) or 'none of ' + ', '.join(cpu.FEATURES)})"
    if klass in ("avx2", "none", "unknown"):
        return Check(
            "CPU",
            "note",
            detail + "; no integer dot-product instructions known: INT8 models are unlikely "
            "to be faster than fp32 here",
        )
    return Check("CPU", "ok", detail)


def format_report(report: DoctorReport) -> str:
    marks = {"ok": "ok     ", "note": "note   ", "problem": "PROBLEM"}
    lines = []
    for c in report.checks:
        lines.append(f"{marks.get(c.status, c.status)} {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"        fix: {c.fix}")
    n = len(report.problems)
    lines.append("healthy" if report.healthy else f"{n} problem{'s' if n != 1 else ''} found")
    return "\n".join(lines)
