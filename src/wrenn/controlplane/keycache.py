"""What an API key authenticated as, remembered for a few seconds so a busy client's requests
do not each pay a database round trip (and a write lock on SQLite) before their own work.

Invariant: a key revoked through this process is refused at once (``forget_all`` runs after
the revoking transaction commits); a key revoked by another control plane process sharing the
database is refused after at most ``ttl_s``. ``last_used_at`` is written when an entry is
(re)filled, so it lags by at most ``ttl_s`` on top of its own one-minute resolution.
"""

from __future__ import annotations

import time

from wrenn.controlplane import ids
from wrenn.controlplane.db.records import Principal

#: Entries kept at most; the oldest go first past it (a scan of random keys cannot grow it).
MAX_ENTRIES = 4096


class KeyCache:
    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        #: key digest -> (principal, monotonic expiry); insertion-ordered.
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, secret: str) -> Principal | None:
        if self._ttl_s <= 0:
            return None
        digest = ids.digest(secret)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._entries[digest]
            return None
        return entry[0]

    def put(self, secret: str, principal: Principal) -> None:
        if self._ttl_s <= 0:
            return
        digest = ids.digest(secret)
        self._entries.pop(digest, None)
        while len(self._entries) >= MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (principal, time.monotonic() + self._ttl_s)

    def forget_all(self) -> None:
        self._entries.clear()
