"""cnnkit: train a small image CNN, export it with a parity gate, and classify images fast.

The Python API (docs/api.md); each name is imported on first use, so `import cnnkit` costs nothing
and never imports torch, torchvision or onnx (only `cnnkit.train` and `cnnkit.export` need them):

    Predictor, Prediction   classify images with an exported ONNX model (`cnnkit.runtime.predictor`)
    train(...)              `cnnkit train`; returns the dict `--json` prints (`cnnkit.api`)
    infer(...)              `cnnkit infer`; returns the dict `--json` prints (`cnnkit.api`)
    cnnkit.export.export    `cnnkit export` (a subpackage: `from cnnkit.export import export`)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnnkit.version import __version__

if TYPE_CHECKING:
    from cnnkit.api import infer, train
    from cnnkit.runtime.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor", "__version__", "infer", "train"]
_HOMES = {
    "Predictor": "cnnkit.runtime.predictor",
    "Prediction": "cnnkit.runtime.predictor",
    "train": "cnnkit.api",
    "infer": "cnnkit.api",
}


def __getattr__(name: str) -> Any:
    """Import the public names on first use (PEP 562), so that `import cnnkit` stays light."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
