"""``build_base``: the base guest image, built once per set of inputs and cached.

Images live in ``<state_dir>/images/<name>-<key>/`` where ``key`` hashes every input (see
``inputs``). A build runs in ``.build-<name>-*`` beside it and is renamed into place only when
complete, under a lock per image name, so readers never see half an image and two builders
never race. Directories left by a build that died are removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from wrenn import log
from wrenn.agent.images import ext4, rootfs, vmlinux, wheel
from wrenn.agent.images.inputs import BuildInputs
from wrenn.agent.images.spec import BASE, GuestImage, ImageSpec

_log = log.get(__name__)

STEPS: tuple[str, ...] = ("envd wheel", "debootstrap", "provision", "kernel", "ext4 image")


class _Steps:
    """Rich progress for the build: one bar over the steps, one line echoing the last output
    line of the running step, and a log line per finished step."""

    def __init__(self, console: Console | None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
        )
        self._overall: TaskID | None = None
        self._detail: TaskID | None = None
        self._name = ""
        self._started = 0.0

    def __enter__(self) -> _Steps:
        self._progress.__enter__()
        self._overall = self._progress.add_task("image", total=len(STEPS))
        self._detail = self._progress.add_task("", total=None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def start(self, name: str) -> None:
        self._name, self._started = name, time.monotonic()
        assert self._overall is not None
        self._progress.update(self._overall, description=name)

    def line(self, text: str) -> None:
        assert self._detail is not None
        self._progress.update(self._detail, description=f"[dim]{text[:100]}")

    def finish(self, note: str = "") -> None:
        elapsed = time.monotonic() - self._started
        self._progress.console.print(f"[green]✓[/] {self._name} ({elapsed:.1f} s){note}")
        assert self._overall is not None
        self._progress.advance(self._overall)
        self.line("")

    def skip_rest(self, note: str) -> None:
        assert self._overall is not None
        self._progress.update(self._overall, completed=len(STEPS))
        self._progress.console.print(note)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def image_dir(state_dir: Path, name: str, key: str) -> Path:
    return state_dir / "images" / f"{name}-{key}"


def _remove_leftovers(images: Path, name: str) -> None:
    for stale in images.glob(f".build-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in images.glob(f".old-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_into(
    spec: ImageSpec, inputs: BuildInputs, wheels: Path, work: Path, steps: _Steps
) -> dict[str, object]:
    build_log = work / "build.log"
    tree = work / "rootfs"

    steps.start("debootstrap")
    rootfs.debootstrap(spec, tree, build_log, steps.line)
    steps.finish()

    steps.start("provision")
    rootfs.provision(spec, tree, wheels, build_log, steps.line)
    steps.finish()

    steps.start("kernel")
    kernel_version, bzimage, initrd = rootfs.kernel_files(tree)
    shutil.copyfile(bzimage, work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")
    compression = vmlinux.extract_file(work / "vmlinuz", work / "vmlinux")
    steps.finish(f": {kernel_version}, {compression} payload")

    steps.start("ext4 image")
    size_bytes = ext4.size_for(tree, spec.headroom_mib)
    ext4.make(tree, work / "rootfs.ext4", size_bytes, build_log)
    shutil.rmtree(tree)
    steps.finish(f": {size_bytes >> 20} MiB")

    return {
        "name": spec.name,
        "key": inputs.key,
        "inputs": inputs.to_json(),
        "kernel_version": kernel_version,
        "kernel_compression": compression,
        "rootfs_size_bytes": size_bytes,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_base(
    state_dir: Path,
    *,
    spec: ImageSpec = BASE,
    envd_wheel: Path | None = None,
    force: bool = False,
    console: Console | None = None,
) -> GuestImage:
    """The guest image for ``spec``: from the cache when its inputs are unchanged, else built.

    ``envd_wheel`` is this project's wheel; by default it is built from the source checkout.
    Runs as root (debootstrap, chroot, mount namespaces) and blocks for minutes on a miss.
    """
    images = state_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    with _lock(images / f".{spec.name}.lock"), _Steps(console) as steps:
        _remove_leftovers(images, spec.name)
        scratch = Path(tempfile.mkdtemp(dir=images, prefix=f".build-{spec.name}-"))
        try:
            steps.start("envd wheel")
            whl = envd_wheel or wheel.build(
                wheel.source_tree(), scratch / "dist", scratch / "pip.log"
            )
            inputs = BuildInputs.collect(spec, wheel.guest_digest(whl))
            final = image_dir(state_dir, spec.name, inputs.key)
            if not force and (final / "manifest.json").is_file():
                steps.finish(f": {whl.name}")
                steps.skip_rest(f"image {final.name} is up to date")
                return GuestImage.load(final)
            wheels = scratch / "wheels"
            wheel.wheelhouse(whl, wheels, scratch / "pip.log", python_version=spec.python_version)
            steps.finish(f": {whl.name}")
            work = scratch / "image"
            work.mkdir(mode=0o755)
            manifest = _build_into(spec, inputs, wheels, work, steps)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():
                final.rename(images / f".old-{final.name}-{os.getpid()}")
            work.rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            _remove_leftovers(images, spec.name)
    _log.info("image.built", name=spec.name, key=inputs.key, dir=str(final))
    return GuestImage.load(final)
