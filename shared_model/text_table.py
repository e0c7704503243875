"""Plain-text tables for the command-line tools (rich, rendered to lines).

The same text on a terminal, in a pipe and in a log file: no colour, no box, no wrapping of long names.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

#: Wide enough that no row of our tables wraps, whatever the terminal.
_WIDTH = 400


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, indent: int = 0,
                 text_columns: int = 1) -> list[str]:
    """`header` and `rows` as aligned lines: the first `text_columns` columns left-aligned, the others (numbers)
    right-aligned, two spaces between columns, `indent` spaces before the first."""
    table = Table(box=None, padding=(0, 0, 0, 2), pad_edge=False, show_edge=False, show_header=True)
    for i, name in enumerate(header):
        table.add_column(str(name), justify="left" if i < text_columns else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    out = io.StringIO()
    Console(file=out, width=_WIDTH, no_color=True, highlight=False, emoji=False, markup=False).print(table)
    return [(" " * indent + line).rstrip() for line in out.getvalue().splitlines()]


def format_rounds(rounds: list[int]) -> str:
    """Round numbers as ranges: [1, 2, 3, 5] -> "1-3, 5" ("-" for none)."""
    parts: list[list[int]] = []
    for r in sorted(set(int(x) for x in rounds)):
        if parts and r == parts[-1][-1] + 1:
            parts[-1].append(r)
        else:
            parts.append([r])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts) or "-"
