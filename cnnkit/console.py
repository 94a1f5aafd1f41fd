"""Human-facing output: everything goes to stderr, so stdout stays free for `--json`."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any


def log(msg: str = "") -> None:
    """A human line (or lines) on stderr, every line through `printable`: paths and class names are
    anyone's choice, and one holding an escape sequence or a carriage return must not reach the
    terminal raw, whichever message quotes it."""
    print("\n".join(map(printable, msg.split("\n"))), file=sys.stderr, flush=True)


class Progress:
    """A progress bar on stderr: rich's live bar on a terminal, a plain line every 10 s otherwise (a log
    file gets a readable record, not redraw codes). rich is imported only when a terminal shows the bar,
    so `--json` and piped runs do not pay for it.

    Usage:
        with Progress(total, "epoch 1/5", unit="img") as bar:
            bar.update(n, loss=0.12)
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True):
        self.total, self.desc, self.unit = total, printable(desc), unit
        self.n = 0
        self.fields: dict[str, object] = {}
        self.t0 = self._last = time.perf_counter()
        self.enabled = enabled  # False: count, print nothing (e.g. on the non-zero ranks of a job)
        self._live: Any = None  # rich's bar and its task, on a terminal
        if enabled and sys.stderr.isatty():
            self._live = _rich_bar(total, self.desc)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.n / dt if dt > 0 else 0.0

    def update(self, n: int = 1, **fields: object) -> None:
        self.n += n
        self.fields.update(fields)
        if self._live is not None:
            bar, task = self._live
            bar.update(task, completed=self.n, extras=self._extras())
        elif self.enabled and time.perf_counter() - self._last >= 10.0:
            self._last = time.perf_counter()
            log(self._line())

    def _extras(self) -> str:
        text = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        return f"{self.rate:,.0f} {self.unit}/s {printable(text)}".rstrip()

    def _line(self) -> str:
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        return f"{self.desc} {done} {self.unit} {self._extras()}"

    def close(self) -> None:
        if self._live is not None:
            bar, task = self._live
            bar.update(task, completed=self.n, extras=self._extras())
            bar.stop()
            self._live = None
        elif self.enabled:
            log(self._line())
            self.enabled = False  # closed: a second close prints nothing


def _rich_bar(total: int | None, desc: str) -> tuple[Any, Any]:
    """A started rich bar on stderr and its one task; text columns without markup (names are anyone's)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[extras]}", markup=False),
        console=Console(stderr=True),
    )
    task = bar.add_task(desc, total=total, extras="")
    bar.start()
    return bar, task


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def printable(text: str) -> str:
    """`text` for a terminal, on one line: control characters (escape sequences, carriage returns,
    line breaks) and undecodable bytes (surrogates) as Python escapes. A class or file name is
    anyone's choice; printed raw, `\\x1b[2J` would clear the screen and `\\r` overwrite the line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned; text through `printable`)."""
    headers = [printable(h) for h in headers]
    cells = [[_fmt(c) if not isinstance(c, str) else printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(r: Sequence[str], raw: Sequence[object]) -> str:
        out = []
        for i, c in enumerate(r):
            num = isinstance(raw[i], (int, float)) and not isinstance(raw[i], bool)
            out.append(c.rjust(widths[i]) if num else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers), list(headers)), sep, *(line(c, r) for c, r in zip(cells, rows, strict=True))])
