"""The architectures cnnkit trains: the built-in ones (`ARCHS`) and a user's own (`module.path:ClassName`).

Every model takes the shared input contract (`cnnkit.meta`): a uint8 tensor (N, C, H, W), C = 1
(grayscale) or 3 (RGB). The scaling to [0, 1] is the model's first step (`ToFloat`, in `Classifier`),
so the exported graph carries its own preprocessing; a user's network sees float32 in [0, 1].

A user arch is imported by name, which runs the module's code: `check_arch_trusted` is the rule for
archs named by a file (a checkpoint) rather than by the caller (SECURITY.md).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ModelError
from cnnkit.meta import OUTPUT_LOGITS, OUTPUT_SIGMOID, is_user_arch


class ToFloat(nn.Module):
    """uint8 pixels -> float32 in [0, 1], the lecture's `X / 255`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) / 255.0


class Classifier(nn.Module):
    """`ToFloat` followed by the network proper (`net`), so state_dict keys read `net.0.weight`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.prep = ToFloat()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prep(x))


class FlattenLinear(nn.Linear):
    """`Flatten` then `Linear` in one module; the weight's columns are in the usual (C, H, W) order.

    A channels_last input (what training uses) is read in its memory order, (H, W, C), against a
    permuted copy of the weight: permuting 2304 x K weights is cheaper than copying the activations,
    and the gradient then flows back channels_last, so the pooling before it keeps its fast kernel
    (with `nn.Flatten` its backward converts layouts, several times slower: docs/benchmarks.md). Any other input is
    flattened as `nn.Flatten` does. Both give the same numbers (tests/test_train.py).
    """

    def __init__(self, in_shape: tuple[int, int, int], out_features: int):
        c, h, w = in_shape
        super().__init__(c * h * w, out_features)
        self.in_shape = in_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            c, h, w = self.in_shape
            weight = self.weight.view(-1, c, h * w).transpose(1, 2).reshape(-1, c * h * w)
            return F.linear(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), weight, self.bias)
        return F.linear(x.flatten(1), self.weight, self.bias)


def lecture(num_classes: int, height: int, width: int, in_channels: int = 1) -> tuple[nn.Sequential, str]:
    """The lecture's network: Conv2d(1,16,(5,5)) -> ReLU -> MaxPool2d((2,2)) -> Flatten -> Linear
    (Conv2d(3, 16, ...) for RGB input).

    Two classes: Linear(2304, 1) + Sigmoid, trained with BCELoss (exactly the lecture's).
    K > 2 classes: Linear(2304, K) giving logits, trained with cross-entropy.

    Computed as Conv2d -> MaxPool2d -> ReLU -> FlattenLinear, the same function: ReLU is monotone,
    so max(relu(a), relu(b)) = relu(max(a, b)), and ReLU then runs on a quarter of the values.
    """
    hp, wp = (height - 4) // 2, (width - 4) // 2  # 12 x 12 for 28 x 28: 2304 features
    if hp < 1 or wp < 1:
        raise ModelError(f"arch 'lecture' needs images of at least 6 x 6, got {height} x {width}")
    if num_classes == 2:
        head: list[nn.Module] = [FlattenLinear((16, hp, wp), 1), nn.Sigmoid()]
        output = OUTPUT_SIGMOID
    else:
        head, output = [FlattenLinear((16, hp, wp), num_classes)], OUTPUT_LOGITS
    net = nn.Sequential(nn.Conv2d(in_channels, 16, (5, 5)), nn.MaxPool2d((2, 2)), nn.ReLU(), *head)
    return net, output


def _block(cin: int, cout: int, pool: bool = True) -> list[nn.Module]:
    # Pool right after the convolution: BatchNorm and ReLU then run on a quarter of the values
    # (faster training steps than conv -> BN -> ReLU -> pool; docs/benchmarks.md).
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return [conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small(
    num_classes: int, height: int, width: int, in_channels: int = 1, widths: tuple[int, int, int] = (16, 48, 96)
) -> tuple[nn.Sequential, str]:
    """cnnkit's default: two blocks of 3x3 conv -> 2x2 max-pool -> BatchNorm -> ReLU, a third 3x3 conv
    -> BatchNorm -> ReLU at 7 x 7, then a linear head on the flattened map.

    Pooling right after the first convolution keeps the wider convolutions at 14 x 14 and 7 x 7,
    where they are cheap on a CPU. The last map is not pooled: the head sees all 7 x 7 positions.
    95,898 parameters for 10 classes (the head is half of them). How it was chosen, with the numbers:
    docs/training.md.
    """
    h, w = height // 4, width // 4
    if h < 1 or w < 1:
        raise ModelError(f"arch 'small' needs images of at least 4 x 4, got {height} x {width}")
    c1, c2, c3 = widths
    net = nn.Sequential(
        *_block(in_channels, c1),  # 28 -> 14
        *_block(c1, c2),  # 14 -> 7
        *_block(c2, c3, pool=False),  # stays 7 x 7
        FlattenLinear((c3, h, w), num_classes),
    )
    return net, OUTPUT_LOGITS


def wide(num_classes: int, height: int, width: int, in_channels: int = 1) -> tuple[nn.Sequential, str]:
    """`small` with twice the channels in the first two stages and 4/3 in the third (32-64-128):
    155,626 parameters for 10 classes, about twice the compute. A candidate for longer training."""
    return small(num_classes, height, width, in_channels, widths=(32, 64, 128))


ARCHS: dict[str, Callable[[int, int, int, int], tuple[nn.Sequential, str]]] = {
    "small": small,
    "wide": wide,
    "lecture": lecture,
}
DEFAULT_ARCH = "small"


@dataclass(frozen=True)
class Recipe:
    """An arch's default training settings (each overridable on the command line)."""

    epochs: int
    batch_size: int
    lr: float
    schedule: str  # "constant" or "cosine" (linear warm-up over 5% of the steps, then cosine to 0)
    augment: str = "none"
    min_steps: int = 0  # small datasets get more epochs, up to this many optimizer steps in all

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The default epoch count for data giving `steps_per_epoch` steps: `epochs`, or more to reach
        `min_steps`."""
        return max(self.epochs, math.ceil(self.min_steps / max(1, steps_per_epoch)))


RECIPES = {
    # The lecture's: Adam with its default learning rate, batch 128, 5 epochs.
    "lecture": Recipe(epochs=5, batch_size=128, lr=1e-3, schedule="constant"),
    # Chosen on validation accuracy only (scripts/search_defaults.py; the search and its numbers are
    # in docs/training.md). min_steps: a small training set (the bundled digits' 3,600 images give
    # 15 steps an epoch) trains for more epochs, here 60, so that it sees as many updates.
    "small": Recipe(epochs=14, batch_size=256, lr=5e-3, schedule="cosine", augment="shift", min_steps=900),
    "wide": Recipe(epochs=14, batch_size=256, lr=5e-3, schedule="cosine", augment="shift", min_steps=900),
}


USER_RECIPE = Recipe(epochs=10, batch_size=128, lr=1e-3, schedule="constant")
"""A user arch's defaults: the lecture's (Adam 1e-3 constant, batch 128, no augmentation), 10 epochs."""


def recipe_for(arch: str) -> Recipe:
    """The default training settings of `arch`: its `RECIPES` entry, or `USER_RECIPE` for a user arch.

    Raises:
        ModelError: neither a built-in arch nor a well-formed `module.path:ClassName`.
    """
    if is_user_arch(arch):
        _split_arch(arch)
        return USER_RECIPE
    if arch not in RECIPES:
        raise ModelError(f"unknown arch {arch!r}; choose one of: {', '.join(RECIPES)}, or module.path:ClassName")
    return RECIPES[arch]


def _split_arch(arch: str) -> tuple[str, str]:
    """(module path, class name) of `module.path:ClassName`; a ModelError if it is not that shape."""
    module, _, name = arch.partition(":")
    if not all(p.isidentifier() for p in module.split(".")) or not all(p.isidentifier() for p in name.split(".")):
        raise ModelError(f"arch {arch!r}: expected a built-in name or an import string module.path:ClassName")
    return module, name


def load_arch(arch: str) -> type[nn.Module]:
    """Import the class a user arch names (this runs the module's code: see `check_arch_trusted`).

    Raises:
        ModelError: the module does not import, has no such attribute, or it is not an nn.Module subclass.
    """
    module_name, name = _split_arch(arch)
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module's own code raises
        raise ModelError(f"arch {arch!r}: cannot import module {module_name!r} ({_one_line(e)})") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"arch {arch!r}: module {module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelError(f"arch {arch!r}: {name} is not an nn.Module subclass (got {type(obj).__name__})")
    return obj


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def user_net(arch: str, num_classes: int, height: int, width: int, in_channels: int) -> nn.Module:
    """Build a user arch: `Class(in_channels=C, num_classes=K)`, plus `height=H` and `width=W` for each
    of the two the constructor names as a parameter (found with `inspect.signature`; `**kwargs` does
    not count, so a constructor that forwards them elsewhere is not handed sizes it did not ask for).

    Raises:
        ModelError: `load_arch`'s errors, or the constructor refuses these arguments.
    """
    cls = load_arch(arch)
    kwargs = {"in_channels": in_channels, "num_classes": num_classes}
    try:
        params = inspect.signature(cls).parameters.values()
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    except (TypeError, ValueError):  # no signature to read (a C extension): pass the two required ones
        named = set()
    kwargs.update({k: v for k, v in (("height", height), ("width", width)) if k in named})
    try:
        return cls(**kwargs)
    except Exception as e:
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise ModelError(
            f"arch {arch!r}: {cls.__name__}({args}) failed ({_one_line(e)}); its constructor must take the "
            "keyword arguments in_channels and num_classes (and may take height and width)"
        ) from None


def checked_classifier(net: nn.Module, arch: str, num_classes: int, input_shape: tuple[int, int, int]) -> Classifier:
    """`Classifier(net)` once a probe batch (`example_batch`) shows that `net` maps float32 (N, C, H, W)
    in [0, 1] to logits (N, num_classes): a wrong network fails here in one line, not in the first
    training step or inside an exporter. The probe runs in eval mode without gradients, so BatchNorm
    statistics are untouched; the module's train/eval mode is restored after.

    Raises:
        ModelError: the forward pass fails or returns anything but a float tensor of that shape.
    """
    model, probe = Classifier(net), example_batch(input_shape)
    training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(probe)
    except Exception as e:
        raise ModelError(
            f"arch {arch!r}: the forward pass fails on a probe batch {tuple(probe.shape)} ({_one_line(e)})"
        ) from None
    finally:
        model.train(training)
    want = (len(probe), num_classes)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want or not out.is_floating_point():
        raise ModelError(
            f"arch {arch!r}: on a probe batch of shape {tuple(probe.shape)} (float32 in [0, 1]) it returns {got}, "
            f"expected float logits of shape {want}"
        )
    return model


def check_arch_trusted(arch: str, trusted: str | None, source: str, how: str = "--trust-arch") -> None:
    """Refuse to rebuild a user arch named by `source` (a checkpoint) unless the caller named the same
    import string (`trusted`): importing a module runs its code, and a file from someone else could name
    any installed module. A built-in arch needs nothing. `how` says, in the error, how to allow it.

    Raises:
        ModelError: `arch` is a user arch and `trusted` is not the same string, or `trusted` names
            another user arch than the one `source` records.
    """
    if trusted is not None and is_user_arch(trusted) and trusted != arch:
        raise ModelError(f"{source}: records arch {arch!r}, not {trusted!r}")
    if is_user_arch(arch) and trusted != arch:
        raise ModelError(
            f"{source}: names the user arch {arch!r}; rebuilding it imports module {arch.partition(':')[0]!r}, "
            f"which runs its code: if you trust it, pass {how} {arch}"
        )


def build_model(arch: str, num_classes: int, height: int, width: int, in_channels: int = 1) -> tuple[Classifier, str]:
    """Build an architecture by name, for (in_channels, height, width) uint8 input: a built-in arch
    (`ARCHS`), or a user's `module.path:ClassName` (`user_net`, checked on a probe batch), whose output
    kind is always `logits`. The name comes from the caller: an arch read from a file must pass
    `check_arch_trusted` first.

    Returns:
        (model, output kind: `logits` or `sigmoid`).
    """
    if arch not in ARCHS and not is_user_arch(arch):
        raise ModelError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}, or module.path:ClassName")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least two classes, got {num_classes}")
    if is_user_arch(arch):
        net = user_net(arch, num_classes, height, width, in_channels)
        return checked_classifier(net, arch, num_classes, (in_channels, height, width)), OUTPUT_LOGITS
    net, output = ARCHS[arch](num_classes, height, width, in_channels)
    return Classifier(net), output


def example_batch(input_shape: tuple[int, int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random uint8 batch for tracing and exporting.

    Exporters get a batch of 2: with 1, tracers and torch.export specialize the batch dimension.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8, generator=gen)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
