"""One place that reads a device name and chooses the mixed-precision dtype (torch-free).

Every command's `--device` takes `auto`, `cpu`, `cuda` or `cuda:N`. `parse_device` turns that text
into a `DeviceSpec`; training maps it to a `torch.device`, the runtime to onnxruntime's CUDA
provider options (`device_id`), so `cuda:1` means the same GPU everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cnnkit.errors import DeviceError

DEVICE_HELP = "auto (CUDA when it works here), cpu, cuda, or cuda:N for the N-th GPU"
_PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed `--device`: `kind` is auto, cpu or cuda; `index` the GPU for `cuda:N` (None: default)."""

    kind: str
    index: int | None = None

    @property
    def cuda_index(self) -> int:
        """The GPU to use when this runs on CUDA: N for `cuda:N`, else 0."""
        return self.index or 0

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: str | DeviceSpec) -> DeviceSpec:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a DeviceSpec.

    Raises:
        DeviceError: anything else (`cpu:1`, `gpu`, `cuda:-1`, ...), in one line.
    """
    if isinstance(text, DeviceSpec):
        return text
    m = _PATTERN.fullmatch(str(text).strip().lower())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"unknown device {text!r}; use {DEVICE_HELP}")
    return DeviceSpec(m.group(1), int(m.group(2)) if m.group(2) is not None else None)


def amp_dtype(capability: tuple[int, int], native_bf16: bool) -> str:
    """The autocast dtype for a CUDA device: "bfloat16" where the GPU computes it natively (compute
    capability 8.0 and later: A100, RTX 30xx, H100, ...), else "float16" with a gradient scaler.

    T4 (7.5) and V100 (7.0) report bf16 as supported because torch emulates it, slowly; they get fp16.
    """
    return "bfloat16" if native_bf16 and tuple(capability) >= (8, 0) else "float16"
