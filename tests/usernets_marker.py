"""A module with a side effect on import: writes the file named by $USERNETS_MARKER. A checkpoint that
names it (`usernets_marker:Net`) must not get it imported without the caller's permission."""

from __future__ import annotations

import os

from usernets import TinyNet as Net

if os.environ.get("USERNETS_MARKER"):
    with open(os.environ["USERNETS_MARKER"], "w") as f:
        f.write("imported\n")

__all__ = ["Net"]
