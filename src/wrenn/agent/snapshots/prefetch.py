"""The prefetch list stored beside a snapshot: device offsets of the blocks the guest touched
first when this snapshot was last resumed, in the order it touched them. A page server copies
them in right after the handshake, before the guest asks.

Binary form: magic ``WRNPREF1``, u64 count, then ``count`` little-endian u64 offsets."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from wrenn.core.errors import Corrupted

MAGIC = b"WRNPREF1"
_COUNT = struct.Struct("<8sQ")


def encode(offsets: Sequence[int]) -> bytes:
    return _COUNT.pack(MAGIC, len(offsets)) + struct.pack(f"<{len(offsets)}Q", *offsets)


def decode(data: bytes, *, source: str = "prefetch") -> list[int]:
    if len(data) < _COUNT.size:
        raise Corrupted(f"{source}: truncated ({len(data)} bytes)")
    magic, count = _COUNT.unpack_from(data)
    if magic != MAGIC:
        raise Corrupted(f"{source}: not a prefetch list (bad magic)")
    if len(data) != _COUNT.size + 8 * count:
        raise Corrupted(f"{source}: {len(data)} bytes for {count} offsets")
    return list(struct.unpack_from(f"<{count}Q", data, _COUNT.size))
