"""The architectures cnnkit trains.

Every model takes the shared input contract (`cnnkit.meta`): a uint8 tensor (N, 1, H, W). The scaling
to [0, 1] is the model's first step (`ToFloat`), so the exported graph carries its own preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.errors import ModelError
from cnnkit.meta import OUTPUT_LOGITS, OUTPUT_SIGMOID


class ToFloat(nn.Module):
    """uint8 pixels -> float32 in [0, 1], the lecture's `X / 255`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) / 255.0


class Classifier(nn.Module):
    """`ToFloat` followed by the network proper (`net`), so state_dict keys read `net.0.weight`."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.prep = ToFloat()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prep(x))


def lecture(num_classes: int, height: int, width: int) -> tuple[nn.Sequential, str]:
    """The lecture's network: Conv2d(1,16,(5,5)) -> ReLU -> MaxPool2d((2,2)) -> Flatten -> Linear.

    Two classes: Linear(2304, 1) + Sigmoid, trained with BCELoss (exactly the lecture's).
    K > 2 classes: Linear(2304, K) giving logits, trained with cross-entropy.
    """
    features = 16 * ((height - 4) // 2) * ((width - 4) // 2)  # 2304 for 28 x 28
    if features < 16:
        raise ModelError(f"arch 'lecture' needs images of at least 6 x 6, got {height} x {width}")
    if num_classes == 2:
        head: list[nn.Module] = [nn.Linear(features, 1), nn.Sigmoid()]
        output = OUTPUT_SIGMOID
    else:
        head, output = [nn.Linear(features, num_classes)], OUTPUT_LOGITS
    net = nn.Sequential(
        nn.Conv2d(1, 16, (5, 5)),
        nn.ReLU(),
        nn.MaxPool2d((2, 2)),
        nn.Flatten(),
        *head,
    )
    return net, output


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small(num_classes: int, height: int, width: int) -> tuple[nn.Sequential, str]:
    """cnnkit's default: three 3x3 conv blocks with BatchNorm, pooling after each.

    Pooling right after the first block keeps the wider convolutions at 14 x 14 and 7 x 7, where
    they are cheap on a CPU; the last 3 x 3 map is flattened (not averaged) so the linear head keeps
    the spatial layout. ~29k parameters for 10 classes.
    """
    h, w = height // 8, width // 8
    if h < 1 or w < 1:
        raise ModelError(f"arch 'small' needs images of at least 8 x 8, got {height} x {width}")
    net = nn.Sequential(
        *_conv_bn(1, 16),
        nn.MaxPool2d(2),  # 28 -> 14
        *_conv_bn(16, 32),
        nn.MaxPool2d(2),  # 14 -> 7
        *_conv_bn(32, 64),
        nn.MaxPool2d(2),  # 7 -> 3
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64 * h * w, num_classes),
    )
    return net, OUTPUT_LOGITS


ARCHS: dict[str, Callable[[int, int, int], tuple[nn.Sequential, str]]] = {"small": small, "lecture": lecture}
DEFAULT_ARCH = "small"


@dataclass(frozen=True)
class Recipe:
    """An arch's default training settings (each overridable on the command line)."""

    epochs: int
    batch_size: int
    lr: float
    schedule: str  # "constant" or "cosine" (linear warm-up over 5% of the steps, then cosine to 0)


RECIPES = {
    # The lecture's: Adam with its default learning rate, batch 128, 5 epochs.
    "lecture": Recipe(epochs=5, batch_size=128, lr=1e-3, schedule="constant"),
    # Tuned on Fashion-MNIST on a 2-core CPU (scripts/bench_train.py): 10 epochs of 60,000 images
    # reach ~0.92 test accuracy in about 3 minutes with loading and evaluation (9 epochs: 0.9197).
    # Batch 256 is the fastest per image there (512: 0.75x, its activations fall out of cache).
    "small": Recipe(epochs=10, batch_size=256, lr=3e-3, schedule="cosine"),
}


def build_model(arch: str, num_classes: int, height: int, width: int) -> tuple[Classifier, str]:
    """Build an architecture by name.

    Returns:
        (model, output kind: `logits` or `sigmoid`).
    """
    if arch not in ARCHS:
        raise ModelError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least two classes, got {num_classes}")
    net, output = ARCHS[arch](num_classes, height, width)
    return Classifier(net), output


def example_batch(input_shape: tuple[int, int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random uint8 batch for tracing and exporting.

    Exporters get a batch of 2: with 1, tracers and torch.export specialize the batch dimension.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8, generator=gen)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
