"""The ELF kernel inside a bzImage, for VMMs that load only ELF (Firecracker).

A bzImage is a real-mode setup block followed by a compressed ``vmlinux``. The setup header
says where the payload starts (``payload_offset`` at 0x248, relative to the protected-mode
code, which follows ``setup_sects + 1`` sectors) and how long it is (``payload_length`` at
0x24c). The compression is told by the payload's magic. When the header is unusable the
payload is found by scanning for a magic whose decompression yields an ELF file.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import lz4.block
import zstandard

from wrenn.core.errors import InvalidArgument

ELF_MAGIC = b"\x7fELF"
_HDRS_MAGIC = b"HdrS"
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
#: Blocks of the LZ4 legacy frame (``lz4 -l``) decompress to at most 8 MiB each.
_LZ4_LEGACY_BLOCK_BYTES = 8 << 20


def _gunzip(data: bytes) -> bytes:
    # The kernel appends its size after the gzip member: decompress the first member only.
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _unlzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _bunzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _unzstd(data: bytes) -> bytes:
    out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out


def _unlz4_legacy(data: bytes) -> bytes:
    """The LZ4 legacy frame: magic, then blocks each prefixed by a little-endian u32 size.
    The kernel appends the decompressed size; stop at the end or at a size that cannot be a
    block."""
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if data[pos : pos + 4] == _LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break
        block = data[pos + 4 : pos + 4 + size]
        out += lz4.block.decompress(block, uncompressed_size=_LZ4_LEGACY_BLOCK_BYTES)
        pos += 4 + size
    return bytes(out)


_CODECS: tuple[tuple[bytes, str, Callable[[bytes], bytes]], ...] = (
    (b"\x1f\x8b\x08", "gzip", _gunzip),
    (b"\xfd7zXZ\x00", "xz", _unxz),
    (b"\x28\xb5\x2f\xfd", "zstd", _unzstd),
    (_LZ4_LEGACY_MAGIC, "lz4", _unlz4_legacy),
    (b"BZh", "bzip2", _bunzip2),
    (b"\x5d\x00\x00", "lzma", _unlzma),
)


def _decompress(payload: bytes) -> tuple[str, bytes] | None:
    for magic, name, codec in _CODECS:
        if payload.startswith(magic):
            try:
                out = codec(payload)
            except (OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError):
                return None
            return (name, out) if out.startswith(ELF_MAGIC) else None
    return None


def _payload_from_header(image: bytes) -> bytes | None:
    if len(image) < 0x250 or image[0x202:0x206] != _HDRS_MAGIC:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        return None
    return image[start : start + length]


def extract(bzimage: bytes) -> tuple[str, bytes]:
    """The compression used and the ELF ``vmlinux`` inside ``bzimage``."""
    payload = _payload_from_header(bzimage)
    if payload is not None and (found := _decompress(payload)) is not None:
        return found
    for magic, _, _ in _CODECS:
        start = bzimage.find(magic)
        while start != -1:
            if (found := _decompress(bzimage[start:])) is not None:
                return found
            start = bzimage.find(magic, start + 1)
    raise InvalidArgument("no compressed ELF kernel found in the image")


def extract_file(bzimage: Path, dest: Path) -> str:
    """Write the ELF kernel of ``bzimage`` to ``dest``; returns the compression it used."""
    codec, elf = extract(bzimage.read_bytes())
    dest.write_bytes(elf)
    return codec
