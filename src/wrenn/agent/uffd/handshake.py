"""Firecracker's Uffd memory backend handshake: once connected to our unix socket, Firecracker
sends, in one message, a JSON list of its guest memory regions with the userfaultfd attached
as SCM_RIGHTS, and then nothing more; it keeps the connection open until it exits.

Each region: ``base_host_virt_addr`` (where the region is mapped in Firecracker), ``size``
(bytes), ``offset`` (where the region's contents start in the memory file) and the page size
in bytes, as ``page_size``; older releases send it only as ``page_size_kib``, which despite
its name also holds bytes (Firecracker documents the misnomer and keeps it for compatibility).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from wrenn.core.errors import InvalidArgument


@dataclass(frozen=True)
class GuestRegion:
    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end_addr(self) -> int:
        return self.base_host_virt_addr + self.size

    @property
    def end_offset(self) -> int:
        return self.offset + self.size


def _page_size(raw: dict[str, Any]) -> int:
    size = raw.get("page_size")
    if size is None:
        size = raw.get("page_size_kib")
        # Bytes in every release that sent it; a tiny value can only have meant KiB.
        if isinstance(size, int) and 0 < size < mmap.PAGESIZE:
            size *= 1024
    if not isinstance(size, int):
        raise InvalidArgument("region without a page size")
    return size


def parse_regions(payload: bytes | str, memory_size_bytes: int) -> list[GuestRegion]:
    """The regions of a handshake message, validated against a memory of the given size."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"handshake is not JSON: {err}") from err
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("handshake must be a non-empty list of regions")
    regions = []
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidArgument(f"region is not an object: {item!r}")
        try:
            region = GuestRegion(
                base_host_virt_addr=int(item["base_host_virt_addr"]),
                size=int(item["size"]),
                offset=int(item["offset"]),
                page_size=_page_size(item),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(f"malformed region {item!r}") from err
        ps = region.page_size
        if ps < mmap.PAGESIZE or ps & (ps - 1):
            raise InvalidArgument(f"page size {ps} is not a power-of-two multiple of the page")
        if region.size <= 0 or (region.base_host_virt_addr | region.size | region.offset) % ps:
            raise InvalidArgument(f"region {region} is not aligned to its page size")
        if region.end_offset > memory_size_bytes:
            raise InvalidArgument(
                f"region {region} ends past the memory file ({memory_size_bytes} bytes)"
            )
        regions.append(region)
    by_addr = sorted(regions, key=lambda r: r.base_host_virt_addr)
    by_offset = sorted(regions, key=lambda r: r.offset)
    for a, b in pairwise(by_addr):
        if a.end_addr > b.base_host_virt_addr:
            raise InvalidArgument(f"regions {a} and {b} overlap in memory")
    for a, b in pairwise(by_offset):
        if a.end_offset > b.offset:
            raise InvalidArgument(f"regions {a} and {b} overlap in the memory file")
    return by_addr
