"""The guest's root filesystem tree: debootstrap, then ``guest/provision.sh`` run inside it.

Commands inside the tree run chrooted in a private mount namespace (``unshare --mount``), so
the /proc and /sys they mount disappear with them, whatever way they end.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from wrenn.agent.images.inputs import guest_file
from wrenn.agent.images.spec import ImageSpec
from wrenn.agent.images.wheel import HOST_ONLY_PACKAGES
from wrenn.core.errors import Internal

#: Where the builder's inputs sit inside the tree while it is provisioned.
BUILD_DIR = "wrenn-build"

#: Receives each line a build step prints.
LineSink = Callable[[str], None]


def run_logged(
    argv: list[str], log: Path, on_line: LineSink, env: dict[str, str] | None = None
) -> None:
    """Run ``argv``, appending its output to ``log`` and passing each line to ``on_line``."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            out.write(raw)
            on_line(raw.decode(errors="replace").rstrip())
        code = proc.wait()
    if code != 0:
        raise Internal(f"{argv[0]} failed (exit {code}):\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def debootstrap(spec: ImageSpec, root: Path, log: Path, on_line: LineSink) -> None:
    argv = ["debootstrap", "--variant=minbase", spec.suite, str(root), spec.mirror]
    run_logged(argv, log, on_line)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    # The host's environment (pip and proxy settings among it) must not leak into the guest.
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C", **extra}


def provision(spec: ImageSpec, root: Path, wheels: Path, log: Path, on_line: LineSink) -> None:
    """Install packages, kernel + initrd, the default user, envd and wrenn-init in ``root``."""
    staging = root / BUILD_DIR
    staging.mkdir()
    shutil.copytree(wheels, staging / "wheels")
    for name in ("provision.sh", "wrenn-init", "chrony.conf"):
        (staging / name).write_bytes(guest_file(name))
    # apt inside the tree resolves the mirrors as the host does.
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf", follow_symlinks=True)
    env = _clean_env(
        {
            "WRENN_SUITE": spec.suite,
            "WRENN_MIRROR": spec.mirror,
            "WRENN_SECURITY_MIRROR": spec.security_mirror,
            "WRENN_PACKAGES": " ".join(spec.packages),
            "WRENN_KERNEL_PACKAGE": spec.kernel_package,
            "WRENN_INITRD_MODULES": " ".join(spec.initrd_modules),
            "WRENN_USER": spec.user,
            "WRENN_HOST_ONLY_PACKAGES": " ".join(HOST_ONLY_PACKAGES),
        }
    )
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--fork",
        "--kill-child",
        "chroot",
        str(root),
        "/bin/sh",
        f"/{BUILD_DIR}/provision.sh",
    ]
    try:
        run_logged(argv, log, on_line, env=env)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def kernel_files(root: Path) -> tuple[str, Path, Path]:
    """The kernel version, bzImage and initrd the kernel package installed in ``root``."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise Internal(f"expected one kernel in {root / 'boot'}, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise Internal(f"the kernel package left no initrd for {version}")
    return version, kernels[0], initrd
