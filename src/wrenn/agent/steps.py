"""How long each step of a flow took, for the flow's log event (``sandbox.created``,
``sandbox.paused``, ``sandbox.resumed`` carry ``steps_ms``)."""

from __future__ import annotations

import time


class Steps:
    """Marks the end of each named step; a step lasts from the previous mark (or the start)."""

    def __init__(self) -> None:
        self._start = self._last = time.monotonic()
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.ms[name] = self.ms.get(name, 0.0) + round((now - self._last) * 1000, 1)
        self._last = now

    @property
    def total_ms(self) -> float:
        return round((time.monotonic() - self._start) * 1000, 1)
