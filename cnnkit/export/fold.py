"""Fold BatchNorm into the convolution before it, on an eval-mode copy of the model, before ONNX export.

Two patterns in an `nn.Sequential` network (`Classifier.net`, the built-in archs):
  - Conv2d -> BatchNorm2d: always foldable (both are affine per output channel).
  - Conv2d -> MaxPool2d -> BatchNorm2d (`small` and `wide` pool before BN): BN is the per-channel
    affine map y = s * x + t with s = gamma / sqrt(var + eps). When every s > 0 it commutes with max,
    so BN(maxpool(conv(x))) = maxpool(conv'(x)), where conv' has its weights scaled by s per output
    channel and the bias s * (b - mean) + beta. A block with any s <= 0 is left as it is (a negative
    scale turns max into min), and `fold_batchnorm` says so.

Why: ONNX Runtime's CoreML execution provider has no BatchNormalization, and the exporters fold BN only
when it directly follows a convolution; a folded graph also has fewer nodes. The export gate compares
the folded graph against the unfolded eager model, so a wrong fold can never ship.
"""

from __future__ import annotations

import copy
from typing import Any


def _scale_shift(bn: Any) -> tuple[Any, Any]:
    """BatchNorm2d in eval mode as y = s * x + t, per channel."""
    import torch

    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return s, bn.bias - bn.running_mean * s


def _folded_conv(conv: Any, s: Any, t: Any) -> Any:
    """A copy of `conv` whose output is s * conv(x) + t (weights scaled per output channel, a bias added)."""
    import torch

    new = copy.deepcopy(conv)
    with torch.no_grad():
        new.weight.mul_(s.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
        new.bias = torch.nn.Parameter(s * bias + t)
    return new


def _foldable_bn(layers: list[Any], i: int) -> tuple[int, str | None] | None:
    """For a Conv2d at `layers[i]`: (index of the BatchNorm2d it may absorb, why not or None), or None
    when no BN follows it in a foldable position."""
    from torch import nn

    j = i + 1 + (i + 1 < len(layers) and isinstance(layers[i + 1], nn.MaxPool2d))
    if j >= len(layers) or not isinstance(layers[j], nn.BatchNorm2d):
        return None
    bn = layers[j]
    if not bn.track_running_stats or bn.running_var is None or not bn.affine:
        return j, "BatchNorm without running statistics or affine parameters"
    if bn.num_features != layers[i].out_channels:
        return j, "channel counts differ"
    if j > i + 1:
        s, _ = _scale_shift(bn)
        n_bad = int((s <= 0).sum())
        if n_bad:
            return j, f"{n_bad} of {bn.num_features} channel scales are <= 0, which do not commute with max-pooling"
    return j, None


def fold_batchnorm(model: Any) -> tuple[Any, dict[str, Any]]:
    """An eval-mode copy of `model` with BatchNorm folded into convolutions where that is exact.

    Args:
        model: a `cnnkit.models.Classifier` (or any module with an `nn.Sequential` `net`); not changed.

    Returns:
        (the copy, info): info["folded"] lists the BN layers folded (`net.<index>`), info["unfolded"]
        those left in place with the reason. A network that is not an `nn.Sequential` is copied as is.
    """
    from torch import nn

    model = copy.deepcopy(model).to("cpu").eval()
    net = getattr(model, "net", None)
    info: dict[str, Any] = {"folded": [], "unfolded": []}
    if not isinstance(net, nn.Sequential):
        return model, info
    layers = list(net)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        found = _foldable_bn(layers, i)
        if found is None:
            continue
        j, why = found
        if why is not None:
            info["unfolded"].append({"layer": f"net.{j}", "why": why})
            continue
        layers[i] = _folded_conv(layer, *_scale_shift(layers[j]))
        layers[j] = nn.Identity()  # kept in place: every other layer keeps its name (`cnnkit diff` maps by name)
        info["folded"].append(f"net.{j}")
    model.net = nn.Sequential(*layers).eval()
    return model, info
