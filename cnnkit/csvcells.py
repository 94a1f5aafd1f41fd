"""Spreadsheet-safe CSV cells, for every CSV cnnkit writes and reads back. Torch-free.

A cell that starts with `=`, `+`, `-` or `@` (or a tab or carriage return) is a formula to Excel,
LibreOffice and Google Sheets, and a file or class name is anyone's choice: `=HYPERLINK(...)` as a file
name would run when a predictions CSV is opened (OWASP "CSV injection"). Such a cell is written with
a single quote in front, which spreadsheets show as text and do not evaluate. A cell that really
starts with a quote gets one more, so `unescape` recovers every original exactly:
`'=x` is "=x" and `''x` is "'x".
"""

from __future__ import annotations

RISKY_START = "=+-@\t\r'"  # the quote itself, so that escaping can be undone
_RISKY = frozenset(RISKY_START)


def escape(text: str) -> str:
    """`text` as a CSV cell a spreadsheet will not evaluate."""
    return "'" + text if text[:1] in _RISKY else text


def unescape(cell: str) -> str:
    """The original text of a cell written by `escape`."""
    return cell[1:] if cell[:1] == "'" else cell
