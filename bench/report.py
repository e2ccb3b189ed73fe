"""Shared by the bench scripts: the machine line and plain-text tables. Benchmarks print
figures and ratios measured in one run; they never assert."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: Where ``table`` also records what it formats while ``collecting()`` is active.
_collected: list[Table] | None = None


@dataclass(frozen=True)
class Table:
    """One table a benchmark printed, as data (``bench/all.py`` builds its summary from these)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@contextlib.contextmanager
def collecting() -> Iterator[list[Table]]:
    """Every table formatted by ``table`` inside the block, in order."""
    global _collected
    previous, _collected = _collected, []
    try:
        yield _collected
    finally:
        _collected = previous


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def p50(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if _collected is not None:
        _collected.append(Table(title, tuple(cells[0]), tuple(tuple(r) for r in cells[1:])))
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    out = [title, line(cells[0]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)
