"""What a guest may open connections to: the egress policy of one sandbox, as the E2B API
states it (``allowInternetAccess``, ``network.allowOut``, ``network.denyOut``).

- ``allow``: destinations always reachable, whatever else says (E2B: allowed entries take
  precedence over denied ones);
- ``deny``: destinations never reachable unless allowed;
- ``internet``: everything else reachable or not (E2B: no internet access is the same as
  denying 0.0.0.0/0).

Entries are IPv4 CIDR blocks or bare addresses (the guest has IPv4 only). Domain names, which
E2B resolves through a proxy of its own, are refused: nothing here could follow them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, collapse_addresses

from wrenn.core.errors import InvalidArgument

#: Entries per list: each becomes an element of an nft set, and the lists travel in every
#: create and resume.
MAX_ENTRIES = 256


def _networks(field: str, entries: Iterable[str]) -> tuple[IPv4Network, ...]:
    found: list[IPv4Network] = []
    for entry in entries:
        if len(found) == MAX_ENTRIES:
            raise InvalidArgument(f"{field}: at most {MAX_ENTRIES} entries")
        try:
            found.append(IPv4Network(entry.strip(), strict=False))
        except ValueError:
            raise InvalidArgument(
                f"{field}: {entry[:80]!r} is not an IPv4 address or CIDR block "
                "(domain names are not supported by this server)"
            ) from None
    return tuple(collapse_addresses(found))


@dataclass(frozen=True)
class Egress:
    internet: bool = False
    allow: tuple[IPv4Network, ...] = ()
    deny: tuple[IPv4Network, ...] = ()

    @classmethod
    def parse(
        cls, *, internet: bool, allow: Iterable[str] = (), deny: Iterable[str] = ()
    ) -> Egress:
        """From the API's strings; ``InvalidArgument`` naming the first bad entry."""
        return cls(internet, _networks("allowOut", allow), _networks("denyOut", deny))

    @property
    def allow_out(self) -> list[str]:
        return [str(n) for n in self.allow]

    @property
    def deny_out(self) -> list[str]:
        return [str(n) for n in self.deny]

    @property
    def unrestricted(self) -> bool:
        """Every destination reachable: nothing that was let out before is refused now."""
        return self.internet and not self.deny
