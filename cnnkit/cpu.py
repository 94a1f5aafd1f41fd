"""The CPU's integer and bf16 instruction sets, and the class of them that decides whether INT8 pays (torch-free).

An INT8 model is only faster than its fp32 twin where the CPU has integer dot-product instructions:
onnxruntime's quantized kernels (QLinearConv, QGemm) rest on them. So a speedup measured on one CPU
holds on another CPU of the same *ISA class* and says nothing about one of another class.

The classes, best first (`isa_class`):

  amx          x86 with AMX-INT8 tiles (`amx_int8`; Sapphire Rapids and later)
  avx512-vnni  x86 with AVX512-VNNI (`avx512_vnni`; Cascade Lake, Ice Lake, AMD Zen 4 and later)
  avx-vnni     x86 with the VEX-coded AVX-VNNI only (`avx_vnni`; Alder Lake and later client cores)
  avx2         x86 with AVX2 and no VNNI: int8 products through vpmaddubsw, no faster than fp32
  arm-i8mm     ARM with the int8 matrix multiply (`i8mm`, FEAT_I8MM; smmla)
  arm-dotprod  ARM with the int8 dot product (`asimddp`, FEAT_DotProd; sdot) and no i8mm
  none         a CPU whose flags were read and have none of the above
  unknown      the flags could not be read (not Linux or macOS, or no permission)

Sources: Linux `/proc/cpuinfo` (`flags` on x86, `Features` on ARM), macOS `sysctl -a` (`hw.optional.*`),
else nothing ("unknown").
"""

from __future__ import annotations

import functools
import platform
import re
import subprocess
import sys
from dataclasses import dataclass

ISA_CLASSES = ("amx", "avx512-vnni", "avx-vnni", "avx2", "arm-i8mm", "arm-dotprod", "none", "unknown")
# The features doctor reports, by cnnkit's name, with the Linux flag that says so.
FEATURES = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    "asimddp": "asimddp",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
}
# macOS `sysctl` keys (set to 1) -> the Linux flag of the same feature.
SYSCTL_FLAGS = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SVE": "sve",
}
MAX_MODEL_CHARS = 200  # a model name longer than any real one is cut (it travels in model records)


@dataclass(frozen=True)
class CpuInfo:
    """What was read about this CPU.

    Attributes:
        model: the model name (`lscpu`'s "Model name"), or the machine type when none is given.
        flags: the instruction-set flags, Linux spelling (lower case).
        source: where they came from: `/proc/cpuinfo`, `sysctl` or `none` (then `flags` is empty).
    """

    model: str
    flags: frozenset[str]
    source: str

    def features(self) -> dict[str, bool | None]:
        """Each of `FEATURES`: present, absent, or None when the flags could not be read."""
        return {name: (flag in self.flags if self.source != "none" else None) for name, flag in FEATURES.items()}


def parse_cpuinfo(text: str) -> CpuInfo:
    """A `CpuInfo` from the text of Linux `/proc/cpuinfo` (x86 `flags` or ARM `Features`, first CPU)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = value.strip()
    flags = fields.get("flags") or fields.get("features") or ""
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or ""
    return CpuInfo(_clean(model) or platform.machine(), frozenset(flags.lower().split()), "/proc/cpuinfo")


def parse_sysctl(text: str) -> CpuInfo:
    """A `CpuInfo` from the text of macOS `sysctl -a` (`hw.optional.*: 1`, `machdep.cpu.brand_string`)."""
    flags, model = set(), ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in SYSCTL_FLAGS and value == "1":
            flags.add(SYSCTL_FLAGS[key])
        elif key == "machdep.cpu.brand_string":
            model = value
    return CpuInfo(_clean(model) or platform.machine(), frozenset(flags), "sysctl")


def isa_class_of(info: CpuInfo) -> str:
    """The INT8 ISA class (`ISA_CLASSES`, module docstring) of what `info` says."""
    f = info.flags
    if info.source == "none":
        return "unknown"
    for flag, name in (
        ("amx_int8", "amx"),
        ("avx512_vnni", "avx512-vnni"),
        ("avx_vnni", "avx-vnni"),
        ("avx2", "avx2"),
        ("i8mm", "arm-i8mm"),
        ("asimddp", "arm-dotprod"),
    ):
        if flag in f:
            return name
    return "none"


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's `CpuInfo` (read once): `/proc/cpuinfo` on Linux, `sysctl -a` on macOS, else none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10).stdout
            return parse_sysctl(out)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return CpuInfo(_clean(platform.processor()) or platform.machine(), frozenset(), "none")


def isa_class() -> str:
    """This CPU's INT8 ISA class (`isa_class_of(cpu_info())`)."""
    return isa_class_of(cpu_info())


def _clean(text: str) -> str:
    """A model name as one short printable line."""
    return re.sub(r"\s+", " ", "".join(c for c in text if c.isprintable())).strip()[:MAX_MODEL_CHARS]
