"""torch.distributed for `torchrun ... -m cnnkit train`: one process per GPU (NCCL) or per CPU slot (gloo).

A plain `cnnkit train` is the one-process case of the same code: every helper here is a no-op when
the world has one process, so the single-process path has no branches of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cnnkit.devices import amp_dtype, parse_device
from cnnkit.errors import DeviceError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over all processes (float64 so counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def auto_uses_cuda(local_world: int = 1) -> bool:
    """`--device auto`: CUDA when torch sees a GPU for every process on this machine, else the CPU.

    Every process decides alike, so a torchrun job with more processes than GPUs trains on gloo/CPU
    as a whole rather than failing on the ranks that have no GPU of their own.
    """
    return torch.cuda.is_available() and torch.cuda.device_count() >= max(1, local_world)


def setup(device: str) -> tuple[Dist, torch.device]:
    """Resolve the device and, under torchrun (WORLD_SIZE > 1), join the process group.

    `auto|cpu|cuda|cuda:N` -> a torch.device (`cnnkit.devices.parse_device`). Distributed: NCCL with
    one GPU per process (`cuda:LOCAL_RANK`) when CUDA is used, gloo on the CPU. An explicit `cuda`
    without CUDA, or a `cuda:N` this machine does not have, is an error.
    """
    spec = parse_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = auto_uses_cuda(local_world) if spec.kind == "auto" else spec.kind == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec}: torch sees no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}; use --device cpu or auto)"
        )
    index = local_rank if world > 1 else spec.cuda_index
    if world > 1 and spec.index is not None:
        raise DeviceError(
            f"--device {spec}: under torchrun each process takes the GPU of its LOCAL_RANK; "
            "pass --device cuda (or limit the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if use_cuda and index >= torch.cuda.device_count():
        raise DeviceError(
            f"--device {spec}: GPU {index} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    dev = torch.device("cuda", index) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if not use_cuda:
            # Processes on one machine share its cores; torchrun sets OMP_NUM_THREADS=1 for this,
            # a manual launch may not.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank, world, local_rank), dev


def amp_for(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on `device`: None on the CPU (full float32); on CUDA bf16 where
    the GPU has it natively, else fp16 (`cnnkit.devices.amp_dtype`; fp16 needs a GradScaler)."""
    if device.type != "cuda":
        return None
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return getattr(torch, amp_dtype(torch.cuda.get_device_capability(device), native))


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
