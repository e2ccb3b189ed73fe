"""The guest clock after a restore, where no hardware clock disciplines it.

With KVM the guest runs chronyd on the PTP clock (/dev/ptp0, ``refclock PHC``,
``makestep 1.0 -1``) and this module stays out of the way. Under TCG there is no PTP device:
a restored guest's clock still shows the moment of the snapshot. The fallback is the
``timestamp`` the host sends with /init (RFC 3339, as E2B's envd accepts it): when the
setting ``clock_from_init`` is on, the clock is stepped to it if it is off by more than
``STEP_THRESHOLD_S``. The guest image turns the setting on only when /dev/ptp0 is absent.
"""

from __future__ import annotations

import time
from datetime import datetime

from wrenn import log
from wrenn.core.errors import InvalidArgument

_log = log.get(__name__)

#: Smaller offsets are left to drift correction; larger ones are stepped away at once.
STEP_THRESHOLD_S = 0.05


def parse_timestamp(value: object) -> int:
    """Nanoseconds since the epoch from an RFC 3339 string (sub-microsecond digits are
    dropped) or a number of seconds."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid timestamp: {value!r}")
    if isinstance(value, int | float):
        return int(value * 1_000_000_000)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
        head, dot, rest = text.partition(".")
        if dot:
            n = len(rest) - len(rest.lstrip("0123456789"))
            digits, zone = rest[:n], rest[n:]
            text = f"{head}.{digits[:6]}{zone}"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidArgument(f"invalid timestamp: {value!r}") from None
        if parsed.tzinfo is None:
            raise InvalidArgument(f"invalid timestamp: {value!r} has no time zone")
        return int(parsed.timestamp() * 1_000_000) * 1000
    raise InvalidArgument(f"invalid timestamp: {value!r}")


def step_to(host_ns: int) -> float:
    """Step CLOCK_REALTIME to ``host_ns`` when it is off by more than the threshold; returns
    the offset found (host minus guest, seconds). The caller logs it."""
    offset_s = (host_ns - time.time_ns()) / 1e9
    if abs(offset_s) > STEP_THRESHOLD_S:
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
        except OSError as exc:
            _log.warning("clock.step_failed", offset_s=round(offset_s, 3), error=str(exc))
    return offset_s
