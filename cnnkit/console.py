"""Human-facing output: everything goes to stderr, so stdout stays free for `--json`."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence


def log(msg: str = "") -> None:
    """A human line (or lines) on stderr, every line through `printable`: paths and class names are
    anyone's choice, and one holding an escape sequence or a carriage return must not reach the
    terminal raw, whichever message quotes it."""
    print("\n".join(map(printable, msg.split("\n"))), file=sys.stderr, flush=True)


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a few lines otherwise).

    Usage:
        with Progress(total, "epoch 1/5", unit="img") as bar:
            bar.update(n, loss=0.12)
    """

    def __init__(
        self, total: int | None, desc: str, unit: str = "it", min_interval: float = 0.2, enabled: bool = True
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.fields: dict[str, object] = {}
        self.t0 = self._last = time.perf_counter()
        self.min_interval = min_interval
        self.tty = sys.stderr.isatty()
        self.enabled = enabled  # False: count, print nothing (e.g. on the non-zero ranks of a job)

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
        now = time.perf_counter()
        # On a terminal redraw often; in a log file, a line every 10 s at most.
        interval = self.min_interval if self.tty else 10.0
        if now - self._last >= interval:
            self._last = now
            self._draw(final=False)

    def _line(self) -> str:
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(frac * 20)
            head = f"{self.desc} [{bar:<20}] {self.n:,}/{self.total:,} {self.unit}"
        else:
            head = f"{self.desc} {self.n:,} {self.unit}"
        extras = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        return f"{head} {self.rate:,.0f} {self.unit}/s {extras}".rstrip()

    def _draw(self, final: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[K" + self._line() + ("\n" if final else ""))
        else:
            sys.stderr.write(self._line() + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(final=True)


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
