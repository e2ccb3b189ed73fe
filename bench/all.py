"""Every benchmark in one run (``make bench``), then one table of the headline figures and
ratios and the machine they ran on. Asserts nothing.

    .venv/bin/python bench/all.py [--only envd,runtime]

Each ``bench/*.py`` runs as it does on its own (its ``main()``, its defaults, its tables
printed as they come), in a child process of its own, so one that fails leaves the others
running. The child records every table the script formats through ``bench.report.table``
(``report.collecting()``) and hands them back as data; ``HEADLINES`` says which cells of
which rows the summary shows. A row a script no longer prints shows as "not measured", a
script that failed as "failed".
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.report import Table, machine, table

HERE = Path(__file__).resolve().parent
#: In the order they run: the cheap ones first.
ORDER = ("envd", "controlplane", "uffd", "runtime", "snapshots")
NOT_BENCHMARKS = {"all", "report", "__init__"}


@dataclass(frozen=True)
class Headline:
    """Cells of rows of one script's table, as summary rows. ``label``, ``value`` and
    ``note`` are ``str.format`` templates over the row's cells (``{0}`` the first)."""

    script: str
    #: The table's title starts with this.
    table: str
    #: The row's first cell starts with this; ``None``: every row of the table.
    row: str | None
    value: str
    label: str = "{0}"
    note: str = ""


def _p(script: str, table_: str, row: str, label: str = "{0}", note: str = "{4}") -> Headline:
    """A row of the ``name, n, p50, p95, note`` tables of the runtime and snapshot benches."""
    return Headline(script, table_, row, "p50 {2}, p95 {3}", label=label, note=note)


HEADLINES: tuple[Headline, ...] = (
    Headline("envd", "envd", None, "{1}", note="{2}"),
    Headline("controlplane", "GET /v2/sandboxes", None, "{3} req/s", label="list, {0}, {1}"),
    Headline(
        "controlplane",
        "100 MB through /files",
        None,
        "up {1} MB/s ({2}x, median {3}x), down {4} MB/s ({5}x, median {6}x)",
        label="/files: {0}",
        note="ratio: direct / this (bests; median of rounds)",
    ),
    Headline(
        "uffd",
        "page server",
        None,
        "{4} faults/s, {5} MiB/s",
        label="page server (256 MiB): {0}",
    ),
    _p("runtime", "host agent", "cold boot"),
    _p("runtime", "host agent", "create"),
    _p("runtime", "host agent", "raw QEMU restore"),
    _p("runtime", "host agent", "pause"),
    _p("runtime", "host agent", "resume"),
    Headline("runtime", "memory", "QEMU RSS per idle sandbox", "{1}"),
    Headline("runtime", "memory", "agent RSS", "{1}"),
    _p("snapshots", "pause and resume", "pause", label="{0}, working set dirtied"),
    _p("snapshots", "pause and resume", "resume", label="{0}, working set dirtied"),
    _p("snapshots", "pause and resume", "raw QEMU restore"),
    Headline("snapshots", "stored", None, "{1}"),
    Headline(
        "snapshots",
        "page server",
        None,
        "{2} faults/s, {3} MiB/s",
        label="page server (working set): {0}",
        note="{4}",
    ),
)


@dataclass(frozen=True)
class Outcome:
    script: str
    code: int
    seconds: float
    tables: list[Table]


def scripts(only: set[str] | None) -> list[str]:
    found = {p.stem for p in HERE.glob("*.py")} - NOT_BENCHMARKS
    ordered = [s for s in ORDER if s in found] + sorted(found - set(ORDER))
    return [s for s in ordered if only is None or s in only]


def run_one(script: str) -> Outcome:
    """``bench/<script>.py`` in a child process; its tables as data."""
    print(f"\n=== bench/{script}.py ===", flush=True)
    with tempfile.NamedTemporaryFile(prefix="wrenn-bench-", suffix=".json") as out:
        started = time.monotonic()
        done = subprocess.run([sys.executable, __file__, "--child", script, out.name], check=False)
        seconds = time.monotonic() - started
        try:
            raw = json.loads(Path(out.name).read_text() or "[]")
        except ValueError:
            raw = []
    tables = [Table(t["title"], tuple(t["header"]), tuple(map(tuple, t["rows"]))) for t in raw]
    return Outcome(script, done.returncode, seconds, tables)


def child(script: str, out: Path) -> int:
    """Run the script as ``python bench/<script>.py`` would; write the tables it made."""
    path = HERE / f"{script}.py"
    sys.argv = [str(path)]
    code = 0
    with report.collecting() as tables:
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as ended:
            code = ended.code if isinstance(ended.code, int) else 1
        finally:
            out.write_text(json.dumps([asdict(t) for t in tables]))
    return code


def _cells(template: str, row: tuple[str, ...]) -> str:
    try:
        return template.format(*row)
    except (IndexError, KeyError, ValueError):
        return "?"


def summary(outcomes: list[Outcome]) -> list[list[str]]:
    rows: list[list[str]] = []
    by_script = {o.script: o for o in outcomes}
    for headline in HEADLINES:
        outcome = by_script.get(headline.script)
        if outcome is None:
            continue
        matched = [
            (t, r)
            for t in outcome.tables
            if t.title.startswith(headline.table)
            for r in t.rows
            if headline.row is None or (r and r[0].strip().startswith(headline.row))
        ]
        for _, r in matched[: None if headline.row is None else 1]:
            rows.append(
                [
                    headline.script,
                    _cells(headline.label, r).strip(),
                    _cells(headline.value, r),
                    _cells(headline.note, r),
                ]
            )
        if not matched:
            what = "failed" if outcome.code else "not measured"
            rows.append([headline.script, headline.row or headline.table, what, ""])
    for outcome in outcomes:
        shown = {h.script for h in HEADLINES}
        if outcome.script not in shown:
            rows.append([outcome.script, "(see its tables above)", f"exit {outcome.code}", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated scripts (default: every bench/*.py)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    outcomes = [run_one(script) for script in scripts(only)]
    print()
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}")
    print(table("Wrenn benchmarks", ["area", "measure", "value", "note"], summary(outcomes)))
    print()
    for outcome in outcomes:
        state = "ok" if outcome.code == 0 else f"FAILED (exit {outcome.code})"
        print(f"bench/{outcome.script}.py: {state}, {outcome.seconds:.0f} s")
    if any(o.code for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], Path(sys.argv[3])))
    main()
