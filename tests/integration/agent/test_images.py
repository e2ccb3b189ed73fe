"""The guest image builder: what the base image holds (read with debugfs, no mounts), its
cache, its keys, the ELF kernel extraction, and a failed build leaving nothing behind."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import lz4.block
import pytest
import zstandard

from wrenn.agent.images import BASE, GuestImage, build_base
from wrenn.agent.images import vmlinux as vmlinux_mod
from wrenn.agent.images.inputs import BuildInputs
from wrenn.agent.images.wheel import guest_digest
from wrenn.core.errors import Internal, InvalidArgument

# --- what the base image holds ---------------------------------------------------------------


def _debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return proc.stdout


@pytest.mark.vm
def test_base_image_holds_kernel_initrd_envd_and_init(base_image: GuestImage) -> None:
    assert base_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    elf = base_image.vmlinux.read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # 64-bit
    assert struct.unpack_from("<H", elf, 18)[0] == 62  # EM_X86_64

    packed = base_image.initrd.read_bytes()
    if packed.startswith(b"\x1f\x8b"):
        names = gzip.decompress(packed)
    else:
        names = zstandard.ZstdDecompressor().decompressobj().decompress(packed)
    for module in ("virtio_mmio.ko", "virtio_blk.ko", "virtio_net.ko"):
        assert module.encode() in names, module

    rootfs = base_image.rootfs
    init = _debugfs(rootfs, "cat /usr/sbin/wrenn-init")
    assert init.startswith("#!/bin/sh") and "tini" in init
    assert "NOPASSWD" in _debugfs(rootfs, "cat /etc/sudoers.d/90-wrenn-user")
    assert "user:" in _debugfs(rootfs, "cat /etc/passwd")
    assert "refclock PHC /dev/ptp0" in _debugfs(rootfs, "cat /etc/chrony/wrenn.conf")
    assert "wrenn-envd" in _debugfs(rootfs, "ls -l /opt/wrenn/bin")
    site = "/opt/wrenn/lib/python3.11/site-packages/wrenn"
    listing = _debugfs(rootfs, f"ls {site}")
    assert "envd" in listing and "core" in listing
    assert "agent" not in listing and "controlplane" not in listing
    assert base_image.kernel_version in _debugfs(rootfs, "ls /lib/modules")
    for tool in ("/usr/bin/tini", "/usr/sbin/chronyd", "/usr/bin/socat", "/usr/bin/sudo"):
        assert "Inode:" in _debugfs(rootfs, f"stat {tool}"), tool

    # Headroom: at least most of the requested free space is there for the guest.
    header = subprocess.run(
        ["dumpe2fs", "-h", str(rootfs)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    free_bytes = int(fields["Free blocks"]) * int(fields["Block size"])
    assert free_bytes >= BASE.headroom_mib * 0.9 * (1 << 20)


@pytest.mark.vm
def test_an_unchanged_image_comes_from_the_cache(base_image: GuestImage) -> None:
    before = base_image.rootfs.stat()
    again = build_base(base_image.dir.parent.parent)
    assert again == base_image
    after = again.rootfs.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(base_image.dir.parent.glob(".build-*"))


@pytest.mark.vm
@pytest.mark.slow
def test_a_failed_build_leaves_nothing_and_says_why(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("building images needs root")
    spec = replace(BASE, name="broken", packages=("wrenn-no-such-package",))
    try:
        with pytest.raises(Internal) as failure:
            build_base(tmp_path, spec=spec)
        assert "wrenn-no-such-package" in failure.value.message
        assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [".broken.lock"]
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path / "images")], check=False)


# --- keys --------------------------------------------------------------------------------------


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_wheel_digest_covers_guest_modules_only(tmp_path: Path) -> None:
    base = {
        "wrenn/envd/app.py": b"app",
        "wrenn/core/errors.py": b"errors",
        "wrenn/agent/manager.py": b"manager",
        "wrenn-0.1.0.dist-info/METADATA": b"Requires-Dist: starlette",
        "wrenn-0.1.0.dist-info/RECORD": b"record",
    }
    digest = guest_digest(_wheel(tmp_path / "a.whl", base))
    host_change = {**base, "wrenn/agent/manager.py": b"other", "wrenn-0.1.0.dist-info/RECORD": b"x"}
    assert guest_digest(_wheel(tmp_path / "b.whl", host_change)) == digest
    envd_change = {**base, "wrenn/envd/app.py": b"changed"}
    assert guest_digest(_wheel(tmp_path / "c.whl", envd_change)) != digest
    deps_change = {**base, "wrenn-0.1.0.dist-info/METADATA": b"Requires-Dist: starlette<1"}
    assert guest_digest(_wheel(tmp_path / "d.whl", deps_change)) != digest


def test_image_key_changes_with_every_input() -> None:
    key = BuildInputs.collect(BASE, "wheel").key
    assert BuildInputs.collect(BASE, "wheel").key == key
    assert BuildInputs.collect(BASE, "other wheel").key != key
    assert BuildInputs.collect(replace(BASE, packages=(*BASE.packages, "git")), "wheel").key != key
    assert BuildInputs.collect(replace(BASE, headroom_mib=1), "wheel").key != key
    changed_script = BuildInputs.collect(BASE, "wheel")
    changed_script.script_digests["wrenn-init"] = "0" * 64
    assert changed_script.key != key
    assert replace(BuildInputs.collect(BASE, "wheel"), builder_version=0).key != key


# --- ELF kernel extraction ---------------------------------------------------------------------

_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def _lz4_legacy(data: bytes) -> bytes:
    out = b"\x02\x21\x4c\x18"
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i : i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out + struct.pack("<I", len(data))


_COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d) + struct.pack("<I", len(d)),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": _lz4_legacy,
}


def _bzimage(payload: bytes, *, header: bool) -> bytes:
    setup_sects = 3
    image = bytearray((setup_sects + 1) * 512 + 64)
    image[0x1F1] = setup_sects
    if header:
        image[0x202:0x206] = b"HdrS"
        struct.pack_into("<II", image, 0x248, 64, len(payload))
    return bytes(image) + payload + b"trailing"


@pytest.mark.parametrize("codec", sorted(_COMPRESSORS))
@pytest.mark.parametrize("header", [True, False], ids=["header", "scan"])
def test_vmlinux_is_found_by_header_or_by_magic(codec: str, header: bool) -> None:
    image = _bzimage(_COMPRESSORS[codec](_ELF), header=header)
    assert vmlinux_mod.extract(image) == (codec, _ELF)


def test_an_image_without_an_elf_kernel_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        vmlinux_mod.extract(_bzimage(gzip.compress(b"not an elf"), header=True))
