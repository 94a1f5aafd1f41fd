"""Human output: the progress bar off and on a terminal, and the plain table."""

from __future__ import annotations

import io
import sys

from cnnkit.console import Progress, table


def test_progress_off_a_terminal_prints_one_plain_line_at_the_end(capsys):
    with Progress(100, "epoch 1/2", unit="img") as bar:
        bar.update(40, loss=0.5)
        bar.update(60)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert err.startswith("epoch 1/2 100/100 img ") and "img/s loss=0.5" in err


def test_a_disabled_progress_counts_and_prints_nothing(capsys):
    with Progress(10, "rank 1", enabled=False) as bar:
        bar.update(10)
    assert bar.n == 10 and capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_rich_and_shows_names_as_text(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(1000, "epoch [bold]1/2\x1b[2J", unit="img") as bar:  # markup and an escape in a name
        bar.update(1000, loss=0.25)
    out = err.getvalue()
    assert "━" in out and "1000/1000" in out and "loss=0.25" in out  # rich's bar, count and fields
    assert "[bold]1/2\\x1b[2J" in out  # markup shown as text, the escape made printable


def test_table_right_aligns_numbers_and_escapes_text():
    text = table(["name", "n"], [["a\x1b", 5], ["bb", 123]])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "n"]
    assert lines[2] == "a\\x1b    5" and lines[3] == "bb     123"
