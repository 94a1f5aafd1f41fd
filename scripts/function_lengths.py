"""Print the functions in a package longer than a limit, counted two ways.

`lines` runs from `def` to the last line; `code` leaves out the docstring (what a reader must hold).
Usage: python scripts/function_lengths.py [cnnkit] [--limit 60]; exits 1 when any function is over (all lines).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def lengths(root: Path) -> list[tuple[int, int, str]]:
    """(lines, code lines without the docstring, "path::name") for every function under `root`."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                doc = node.body[0] if ast.get_docstring(node) is not None else None
                code = lines - (doc.end_lineno - doc.lineno + 1 if doc else 0)
                rows.append((lines, code, f"{path}::{node.name}"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="cnnkit")
    ap.add_argument("--limit", type=int, default=60)
    args = ap.parse_args()
    rows = lengths(Path(args.root))
    over = [r for r in rows if r[0] > args.limit]
    for lines, code, name in sorted(over, reverse=True):
        print(f"{lines:4d} lines {code:4d} code  {name}")
    longest = max(rows)
    print(f"{len(rows)} functions; longest {longest[0]} lines ({longest[2]}); over {args.limit} lines: {len(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
