"""TorchScript export (`torch.jit.trace`) with the metadata record as an extra file.

TorchScript is deprecated upstream: torch 2.14 emits several `FutureWarning`s per trace/save/load.
They are silenced here and replaced by one line in the log; the format still loads and runs with
this torch version (the parity gate checks the saved file, not the in-memory module).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

from cnnkit.console import log
from cnnkit.errors import ModelError
from cnnkit.files import atomic_path, check_model_file
from cnnkit.meta import EXTRA_FILE, ModelMeta

EXPORTER = "torch.jit.trace"


@contextlib.contextmanager
def _no_deprecation_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_torchscript(model: Any, meta: ModelMeta, path: str) -> dict[str, Any]:
    """Trace `model` and save it to `path` (atomically) with `meta` as the extra file `EXTRA_FILE`.

    Args:
        model: a `cnnkit.models.Classifier` (moved to the CPU, set to eval mode).
        meta: its record; saved with `extra["export"]` added.
        path: the file to write.

    Returns:
        Plain info: format, exporter, seconds, bytes, torch version.

    Raises:
        ModelError: the traced module does not run at batch size 1 or an odd batch size.
    """
    import torch

    from cnnkit.models import example_batch

    model = model.to("cpu").eval()
    example = example_batch(meta.input_shape)  # then prove batch sizes 1 and 7 work too
    log(f"note: TorchScript is deprecated upstream; torch {torch.__version__} still traces, saves and loads it")
    t0 = time.perf_counter()
    with _no_deprecation_warnings(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        for n in (1, 7):
            x = example_batch(meta.input_shape, n, seed=n)
            try:
                got, want = traced(x), model(x)
            except Exception as e:
                raise ModelError(f"traced TorchScript module fails at batch size {n}: {e}") from None
            if got.shape != want.shape:
                raise ModelError(f"traced TorchScript module gives {tuple(got.shape)} at batch size {n}")
    record = meta.with_export(
        format="torchscript",
        exporter=EXPORTER,
        opset=None,
        ir_version=None,
        torch=str(torch.__version__),
    )
    with _no_deprecation_warnings(), atomic_path(path) as tmp:
        torch.jit.save(traced, tmp, _extra_files={EXTRA_FILE: record.to_json()})
    return {
        "format": "torchscript",
        "exporter": EXPORTER,
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes": os.path.getsize(path),
        "torch": str(torch.__version__),
    }


def load_torchscript(path: str, data: bytes | None = None) -> tuple[Any, ModelMeta]:
    """Load a cnnkit TorchScript file on the CPU. Loading runs code from the file: only for files
    cnnkit wrote (`cnnkit.provenance`) or the user trusts.

    Args:
        path: the file (named in messages).
        data: its bytes, already read and checked (`provenance.read_proven`): loaded instead of
            opening `path` again, which could have been swapped since the check.

    Returns:
        (the module in eval mode, its metadata record).

    Raises:
        ModelError: missing file, not TorchScript, or no/invalid cnnkit record inside.
    """
    import torch

    if data is None:
        check_model_file(path, "TorchScript file", "make one with `cnnkit export --format torchscript`")
    extra = {EXTRA_FILE: ""}
    try:
        with _no_deprecation_warnings():
            module = torch.jit.load(path if data is None else io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path}: not a readable TorchScript file ({first})") from None
    if not extra[EXTRA_FILE]:
        raise ModelError(f"{path}: a TorchScript file without {EXTRA_FILE}; not exported by cnnkit")
    return module.eval(), ModelMeta.from_json(extra[EXTRA_FILE])
