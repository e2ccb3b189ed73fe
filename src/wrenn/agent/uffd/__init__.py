"""The userfaultfd page server: a Firecracker restore with the Uffd memory backend hands us
its userfaultfd and we fill guest pages on demand from a snapshot's layers (any
``PageSource``; ``wrenn.agent.snapshots.Reader`` is one), prefetching the pages the guest is
known to touch first. Protocol, ABI and figures: docs/snapshots.md, "Page server"."""

from wrenn.agent.uffd.handshake import GuestRegion
from wrenn.agent.uffd.pager import PageSource, UffdStats
from wrenn.agent.uffd.server import UffdServer

__all__ = ["GuestRegion", "PageSource", "UffdServer", "UffdStats"]
