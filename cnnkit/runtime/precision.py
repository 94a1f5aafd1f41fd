"""Which of a run's ONNX files to run: `cnnkit infer --model RUN_DIR --precision auto|fp32|int8|fp16` (torch-free).

A run folder holds up to three ONNX files of one model (`cnnkit.runs`): `model.onnx` (fp32),
`model.int8.onnx` and `model.fp16.onnx`, each written only when its export gate passed. `auto` picks:

  - fp16 on a CUDA device, when the run has the file;
  - else int8, when the INT8 file's record says its accuracy gate passed and its measured model-only
    speedup over fp32 (`cnnkit.meta.int8_speed`) is above 1 *on this CPU's ISA class*
    (`cnnkit.cpu.isa_class`);
  - else fp32.

A speedup measured on another ISA class is not trusted: INT8 speed rests on integer dot-product
instructions, so it does not carry from a VNNI CPU to one without (or back). `auto` then runs fp32 and
says why, rather than measuring at run time: a few hundred images timed while the decoders start are
a noisy verdict on a shared machine, and fp32 is the reference the INT8 file was gated against, so the
fallback is never wrong, only sometimes slower. `--precision int8` runs the INT8 file anyway; exporting
it on a CPU of this class records a speedup that holds here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cnnkit.cpu as cpu
from cnnkit.devices import parse_device
from cnnkit.errors import DataError, ModelError
from cnnkit.meta import ModelMeta, int8_speed
from cnnkit.runs import FP16_NAME, INT8_NAME, ONNX_NAME, latest_file, latest_run
from cnnkit.runtime.backends import ONNXRUNTIME, AnySession, create_session
from cnnkit.runtime.session import CUDA, read_meta

PRECISIONS = ("auto", "fp32", "int8", "fp16")
FILES = {"fp32": ONNX_NAME, "int8": INT8_NAME, "fp16": FP16_NAME}
HOW = {
    "fp32": "`cnnkit export --format onnx`",
    "int8": "`cnnkit export --quantize int8`",
    "fp16": "`cnnkit export --half`",
}


@dataclass(frozen=True)
class Choice:
    """The file picked and why.

    Attributes:
        path: the ONNX file.
        precision: `fp32`, `int8` or `fp16`.
        reason: one line for the user (and `--json`'s `precision_reason`).
        asked: the precision was named, not picked by `auto`.
    """

    path: str
    precision: str
    reason: str
    asked: bool = False


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DataError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return precision


def of_file(path: str, meta: ModelMeta) -> Choice:
    """The `Choice` of a model named as one file: the precision its record gives (fp32 when none)."""
    export = meta.extra.get("export")
    precision = export.get("precision") if isinstance(export, dict) else None
    return Choice(path, precision if precision in FILES else "fp32", "--model names one file", asked=True)


def expects_cuda(device: str) -> bool:
    """Whether `device` will run on CUDA: `cuda[:N]`, or `auto` where onnxruntime has the CUDA provider
    (whether it loads is known only once a session exists: `open_choice` checks)."""
    spec = parse_device(device)
    if spec.kind != "auto":
        return spec.kind == "cuda"
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def choose(run_dir: str, precision: str = "auto", cuda: bool = False) -> Choice:
    """The file of run folder `run_dir` to run at `precision` (module docstring), on CUDA or not.

    Raises:
        ModelError: an explicit precision whose file the run lacks; `auto` without an fp32 file.
    """
    if check_precision(precision) != "auto":
        path = os.path.join(run_dir, FILES[precision])
        if not os.path.isfile(path):
            raise ModelError(f"--precision {precision}: no {path}; make it with {HOW[precision]}")
        return Choice(path, precision, "asked for (--precision)", asked=True)
    fp16 = os.path.join(run_dir, FP16_NAME)
    if cuda and _own_file(fp16, "fp16"):
        return Choice(fp16, "fp16", "a CUDA device, and the run has an FP16 file (written only when its gate passed)")
    int8 = os.path.join(run_dir, INT8_NAME)
    ok, why = (False, "a CUDA device and no FP16 file") if cuda else int8_verdict(int8)
    if ok:
        return Choice(int8, "int8", why)
    fp32 = os.path.join(run_dir, ONNX_NAME)
    if not os.path.isfile(fp32):
        raise ModelError(f"{run_dir}: no {ONNX_NAME} ({why}); make it with {HOW['fp32']}")
    return Choice(fp32, "fp32", why)


def _own_file(path: str, precision: str) -> bool:
    """Whether `path` is a regular file of the run (not a symlink to elsewhere) whose record says cnnkit
    exported it at `precision` (a file of that precision is written only when its gate passed)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        export = read_meta(path).extra.get("export", {})
    except ModelError:
        return False
    return isinstance(export, dict) and export.get("precision") == precision


def int8_verdict(path: str) -> tuple[bool, str]:
    """(whether `auto` runs the INT8 file at `path` on this CPU, why in one line)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False, f"no {INT8_NAME} in the run (a symlink is not the run's own)"
    try:
        meta = read_meta(path)
        speed = int8_speed(meta)
    except ModelError as e:
        return False, f"its INT8 file cannot be used: {e}"
    export = meta.extra.get("export", {})
    gate = export.get("quantization", {}).get("accuracy_gate") if isinstance(export, dict) else None
    if not (isinstance(gate, dict) and gate.get("passed") is True):
        return False, "its INT8 file records no passed accuracy gate"
    if speed is None:
        return False, "its INT8 file records no speed measurement (export it again to record one)"
    here, x, there = cpu.isa_class(), speed["int8_speedup"], speed["isa_class"]
    if here == "unknown" or there != here:
        return False, (
            f"its {x:.2f}x speedup was measured on {there} ({speed['cpu']}), this CPU is {here}: not trusted "
            "here (export on a CPU of this class, or pass --precision int8)"
        )
    if x <= 1:
        return False, f"int8 ran {x:.2f}x fp32's speed on {there}: not faster"
    return True, f"its accuracy gate passed and it ran {x:.2f}x fp32's speed on {there}, this CPU's class"


def resolve(model: str | None, precision: str | None, device: str) -> tuple[Choice, str | None]:
    """(the file to run, the run folder or None) for `--model` and `--precision`.

    `--model` a file: that file, as before (`--precision` other than auto is an error). `--model` a
    folder: the run's artifacts, `precision` (default auto) choosing among them. Neither given:
    `runs/latest/model.onnx`; only `precision`: the run `runs/latest`.
    """
    if precision is not None:
        check_precision(precision)
    if model is not None and not os.path.isdir(model):
        if precision not in (None, "auto"):
            raise DataError(f"--precision {precision} chooses among a run folder's files; {model} is one file")
        return of_file(model, read_meta(model)), None
    if model is None and precision is None:
        path = latest_file(ONNX_NAME, "export one with `cnnkit export --format onnx`, or pass the model path")
        return of_file(path, read_meta(path)), None
    run_dir = model if model is not None else latest_run()
    return choose(run_dir, precision or "auto", cuda=expects_cuda(device)), run_dir


def open_choice(
    choice: Choice, run_dir: str | None, device: str, threads: int | None, backend: str = ONNXRUNTIME
) -> tuple[AnySession, Choice]:
    """A session for `choice` on `backend`; an `auto` fp16 pick whose session fell back to the CPU is
    chosen again for the CPU (an FP16 file is for CUDA) and reopened."""
    session = create_session(choice.path, device=device, threads=threads, backend=backend)
    if run_dir is None or choice.precision != "fp16" or session.provider == CUDA or choice.asked:
        return session, choice
    again = choose(run_dir, "auto", cuda=False)
    session = create_session(again.path, device=device, threads=threads, backend=backend)
    session.notes.append(f"the CUDA provider did not load, so not the FP16 file: precision {again.precision}")
    return session, again
