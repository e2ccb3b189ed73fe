"""Connection tracker (stub)."""

from __future__ import annotations

from typing import Any


class ConnTracker:
    pass


def protocol_class(tracker: ConnTracker) -> Any:
    return "httptools"
