"""How the CLI prints: rich tables for people, ``--json`` for programs, one-line errors on
stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: Width when stdout is not a terminal, so ids in piped tables are never cut.
PIPE_WIDTH = 200


def stdout() -> Console:
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or PIPE_WIDTH)
    return Console(file=sys.stdout, width=width, highlight=False)


def stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def error(message: str) -> None:
    stderr().print(f"[bold red]error:[/] {escape(message)}")


def info(message: str) -> None:
    """A status line for people (stderr, so stdout stays what a script reads)."""
    stderr().print(escape(message))


def when(value: Any) -> str:
    """An ISO timestamp from the API as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``-``."""
    if not value:
        return "-"
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return parsed.strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[dict[str, Any]], Any]
    #: Identifiers are never wrapped or cut.
    key: bool = False


def field(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(name)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], *, empty: str) -> None:
    items = list(rows)
    if not items:
        info(empty)
        return
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col.title, no_wrap=col.key, overflow="fold")
    for row in items:
        cells = []
        for col in columns:
            value = col.value(row)
            cells.append("-" if value is None or value == "" else escape(str(value)))
        t.add_row(*cells)
    stdout().print(t)


def listing(
    rows: Iterable[dict[str, Any]], columns: Sequence[Column], *, as_json: bool, empty: str
) -> None:
    """A listing as a table, or as the API's JSON objects with ``--json``."""
    if as_json:
        print_json(list(rows))
    else:
        table(rows, columns, empty=empty)
