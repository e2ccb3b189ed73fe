"""This project's wheel, as the guest gets it: built from the source tree, digested over the
modules the guest runs, and resolved with its dependencies into a wheelhouse on the host (so
the guest build needs no index access of its own)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import wrenn
from wrenn.core.errors import FailedPrecondition, Internal

#: Sub-packages of ``wrenn`` that never run in a guest. The build removes them from the
#: guest's install and leaves them out of the digest, so host-side changes do not rebuild
#: images.
HOST_ONLY_PACKAGES: tuple[str, ...] = ("agent", "controlplane", "cli")


def source_tree() -> Path:
    """The project checkout this ``wrenn`` was imported from."""
    root = Path(wrenn.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "wrenn"' not in pyproject.read_text():
        raise FailedPrecondition(
            f"wrenn is not running from a source checkout ({root}); pass the envd wheel to use"
        )
    return root


def _pip(args: list[str], log: Path) -> None:
    with log.open("ab") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", *args], stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0:
        raise Internal(f"pip {args[0]} failed (exit {proc.returncode}); see {log}")


def build(source: Path, out_dir: Path, log: Path) -> Path:
    """Build the project's wheel from ``source`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(out_dir), str(source)], log)
    wheels = sorted(out_dir.glob("wrenn-*.whl"))
    if len(wheels) != 1:
        raise Internal(f"expected one wrenn wheel in {out_dir}, found {len(wheels)}")
    return wheels[0]


def _guest_member(name: str) -> bool:
    if name.endswith(".dist-info/RECORD"):
        return False
    return not any(name.startswith(f"wrenn/{pkg}/") for pkg in HOST_ONLY_PACKAGES)


def guest_digest(wheel: Path) -> str:
    """SHA-256 over the names and bytes of the wheel members a guest runs, in name order
    (zip timestamps and host-only modules do not count)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if _guest_member(n)):
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def wheelhouse(wheel: Path, out_dir: Path, log: Path, *, python_version: str) -> None:
    """Resolve ``wheel`` and its dependencies into wheels in ``out_dir`` with the host's pip
    (its index, certificates and constraints), for a guest whose CPython is
    ``python_version`` on glibc x86_64: the host interpreter must be of the same minor
    version, as wheels with compiled parts are resolved for it."""
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if host != python_version:
        raise FailedPrecondition(
            f"the guest runs CPython {python_version}; build images with a host CPython "
            f"{python_version} (this is {host})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _pip(["wheel", "--quiet", "--wheel-dir", str(out_dir), str(wheel)], log)
