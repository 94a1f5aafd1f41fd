"""Users' own networks for tests/test_user_nets.py, importable as `usernets` (pytest puts tests/ on
sys.path): `cnnkit train --arch usernets:TinyNet`. Each takes float32 (N, C, H, W) in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """conv -> relu -> 2x2 pool -> linear: takes height and width to size its head."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4 * (height // 2) * (width // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


class PoolNet(nn.Module):
    """Any input size (global average pooling): its constructor does not ask for height and width."""

    seen: dict[str, int] = {}

    def __init__(self, *, in_channels: int, num_classes: int, **kwargs: int):
        super().__init__()
        PoolNet.seen = {"in_channels": in_channels, "num_classes": num_classes, **kwargs}
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class WrongOutput(TinyNet):
    """One output too many."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.cat([out, out[:, :1]], dim=1)


class BadConstructor(nn.Module):
    """Takes `channels`, not `in_channels`."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()


class NotAModule:
    """A plain class."""
