"""How often a quiet server stream sends a keepalive message: the client's
``Keepalive-Ping-Interval`` header (seconds), else 90 s, as E2B's envd does."""

from __future__ import annotations

from collections.abc import Mapping

HEADER = "keepalive-ping-interval"
DEFAULT_INTERVAL_S = 90.0


def interval_s(headers: Mapping[str, str]) -> float:
    try:
        value = int(headers.get(HEADER, ""))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return float(value) if 0 < value <= 24 * 3600 else DEFAULT_INTERVAL_S
