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


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, indent: int = 0) -> list[str]:
    """`header` and `rows` as aligned lines: the first column left-aligned, the others right-aligned, two
    spaces between columns, `indent` spaces before the first."""
    table = Table(box=None, padding=(0, 0, 0, 2), pad_edge=False, show_edge=False, show_header=True)
    for i, name in enumerate(header):
        table.add_column(str(name), justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    out = io.StringIO()
    Console(file=out, width=_WIDTH, no_color=True, highlight=False, emoji=False, markup=False).print(table)
    return [(" " * indent + line).rstrip() for line in out.getvalue().splitlines()]
