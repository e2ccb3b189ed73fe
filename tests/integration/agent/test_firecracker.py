"""The Firecracker driver against the real Firecracker v1.12.1 binary (fetched and verified by
scripts/fetch_firecracker.py) on this host's KVM.

Guests are given the Debian cloud kernel (an ELF vmlinux pulled out of its bzImage) and a tiny
ext4 root filesystem. Where KVM cannot run a guest kernel to the end (a paravirtualised KVM),
the guest need not finish booting: everything here is the VMM's own behaviour — configuration,
start, pause, snapshots, loads with the File and the Uffd backend, API errors — which works
from the first instruction the guest runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from wrenn.agent.config import AgentSettings
from wrenn.agent.vmm.base import NetworkAttachment, SnapshotFiles, VmConfig, VmState
from wrenn.agent.vmm.firecracker import (
    FirecrackerClient,
    FirecrackerFault,
    FirecrackerVmm,
    JailerConfig,
    firecracker_usable,
    jailer_argv,
)
from wrenn.core.errors import FailedPrecondition, InvalidArgument

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host"),
]

ROOT = Path(__file__).resolve().parents[3]
MEMORY_MIB = 128
GUEST_MAC = "02:fc:00:00:00:15"
PAGE = 4096


# -- session fixtures: the binary and a kernel -----------------------------------------------------


def _cache_dir() -> Path:
    explicit = os.environ.get("WRENN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wrenn"


@pytest.fixture(scope="session")
def firecracker_bin() -> Path:
    """Firecracker v1.12.1, fetched once into the cache and checked against its SHA-256."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_firecracker.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot fetch firecracker: {result.stderr.strip()}")
    return Path(result.stdout.strip())


@pytest.fixture(scope="session")
def jailer_bin(firecracker_bin: Path) -> Path:
    jailer = firecracker_bin.with_name("jailer")
    if not jailer.is_file():
        pytest.skip("no jailer next to the firecracker binary")
    return jailer


def _built_image_vmlinux() -> Path | None:
    images = AgentSettings().state_dir / "images"
    # Finished images only: a build in progress lives in a hidden directory beside them.
    found = (
        sorted(p for p in images.glob("*/vmlinux") if not p.parent.name.startswith("."))
        if images.is_dir()
        else []
    )
    return found[-1] if found else None


def _debian_kernel_package() -> str:
    out = subprocess.run(
        ["apt-cache", "depends", "--important", "linux-image-cloud-amd64"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise RuntimeError(f"no kernel package behind linux-image-cloud-amd64:\n{out}")


def _vmlinux_from_debian(cache: Path) -> Path:
    """The ELF kernel of Debian's cloud kernel package, extracted once into the cache."""
    from wrenn.agent.images import vmlinux

    package = _debian_kernel_package()
    dest = cache / f"vmlinux-{package}"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kernel-", dir=cache) as tmp:
        subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert fsys.stdout is not None
        bzimage = Path(tmp) / "vmlinuz"
        with tarfile.open(fileobj=fsys.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and Path(member.name).name.startswith("vmlinuz-"):
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    bzimage.write_bytes(extracted.read())
                    break
        fsys.stdout.close()
        fsys.wait()
        if not bzimage.exists():
            raise RuntimeError(f"{deb.name} holds no /boot/vmlinuz-*")
        vmlinux.extract_file(bzimage, Path(tmp) / "vmlinux")
        (Path(tmp) / "vmlinux").replace(dest)
    return dest


@pytest.fixture(scope="session")
def kernel() -> Path:
    """An ELF vmlinux: $WRENN_TEST_VMLINUX, else one from a built guest image, else Debian's
    cloud kernel (apt-get download, cached)."""
    explicit = os.environ.get("WRENN_TEST_VMLINUX")
    if explicit:
        return Path(explicit)
    built = _built_image_vmlinux()
    if built is not None:
        return built
    try:
        return _vmlinux_from_debian(_cache_dir())
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no ELF kernel for the guest: {err}")


# -- per-test fixtures: VMs that are always stopped ------------------------------------------------


class Sandbox:
    """A scratch directory with a root filesystem, and every VM made in it."""

    def __init__(self, firecracker_bin: Path, kernel: Path) -> None:
        # Short: the API socket path must fit a unix socket address.
        self.dir = Path(tempfile.mkdtemp(prefix="wrenn-fc-"))
        self.firecracker_bin = firecracker_bin
        self.kernel = kernel
        self.vms: list[FirecrackerVmm] = []
        tree = self.dir / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "hostname").write_text("wrenn-test\n")
        self.rootfs = self.dir / "rootfs.ext4"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(self.rootfs), "8M"],
            check=True,
            capture_output=True,
        )

    def config(self, name: str, **changes: Any) -> VmConfig:
        base = VmConfig(
            vm_id=f"{name}-{secrets.token_hex(3)}",
            vcpus=1,
            memory_mib=MEMORY_MIB,
            kernel=self.kernel,
            rootfs=self.rootfs,
            run_dir=self.dir / name,
        )
        return replace(base, **changes)

    def vm(self, config: VmConfig, *, jailer: JailerConfig | None = None) -> FirecrackerVmm:
        vm = FirecrackerVmm(config, firecracker_bin=str(self.firecracker_bin), jailer=jailer)
        self.vms.append(vm)
        return vm

    async def close(self, failed: bool) -> None:
        for vm in self.vms:
            await vm.stop()
            if failed:
                sys.stderr.write(
                    f"--- {vm.config.vm_id} firecracker.log ---\n{vm.logs()}\n"
                    f"--- {vm.config.vm_id} serial ---\n{vm.serial()}\n"
                )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def sandbox(
    request: pytest.FixtureRequest, firecracker_bin: Path, kernel: Path
) -> AsyncIterator[Sandbox]:
    box = Sandbox(firecracker_bin, kernel)
    try:
        yield box
    finally:
        rep = getattr(request.node, "rep_call", None)
        await box.close(failed=rep is not None and rep.failed)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace holding an up tap0, deleted afterwards."""
    name = f"fctest-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True
        )
        subprocess.run(["ip", "-n", name, "link", "set", "tap0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    return a.samefile(b)


def _root_holds(pid: int, name: str) -> bool:
    """Whether the process sees ``/<name>`` as a regular file (through its root)."""
    return Path(f"/proc/{pid}/root/{name}").is_file()


def _state(vm: FirecrackerVmm) -> VmState:
    return vm.state


def _open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = set()
    for fd in fds.iterdir():
        try:
            out.add(os.readlink(fd))
        except FileNotFoundError:
            continue
    return out


def _differing_bytes(a: bytes, b: bytes) -> list[int]:
    assert len(a) == len(b)
    out: list[int] = []
    for page in range(0, len(a), PAGE):
        if a[page : page + PAGE] != b[page : page + PAGE]:
            out.extend(i for i in range(page, page + PAGE) if a[i] != b[i])
    return out


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


async def _booted_snapshot(box: Sandbox, name: str, **changes: Any) -> SnapshotFiles:
    """Boot a VM, pause it, take a full snapshot, stop it."""
    vm = box.vm(box.config(name, **changes))
    await vm.boot()
    await vm.pause()
    files = await vm.snapshot(box.dir / f"{name}-snap")
    await vm.stop()
    return files


# -- the probe -------------------------------------------------------------------------------------


async def test_probe_reports_kvm_and_the_version(firecracker_bin: Path) -> None:
    probe = await firecracker_usable(str(firecracker_bin))
    assert probe.usable, probe.reason
    assert probe.kvm
    assert probe.version == "1.12.1"
    assert probe.version_supported
    assert probe.binary is not None and _same_file(probe.binary, firecracker_bin)
    assert probe.reason == ""


async def test_probe_says_why_firecracker_is_unusable(tmp_path: Path) -> None:
    missing = await firecracker_usable(str(tmp_path / "firecracker"))
    assert not missing.usable
    assert "not found" in missing.reason

    not_a_vmm = tmp_path / "firecracker"
    not_a_vmm.write_text("#!/bin/sh\necho nope\nexit 3\n")
    not_a_vmm.chmod(0o755)
    broken = await firecracker_usable(str(not_a_vmm))
    assert not broken.usable
    assert "exit 3" in broken.reason

    no_kvm = await firecracker_usable("firecracker", kvm_device=tmp_path / "kvm")
    assert not no_kvm.usable
    assert not no_kvm.kvm
    assert "does not exist" in no_kvm.reason


# -- boot, pause, snapshots, stop ------------------------------------------------------------------


async def test_boot_pause_snapshot_full_and_diff_then_stop(sandbox: Sandbox) -> None:
    config = sandbox.config("boot")
    vm = sandbox.vm(config)
    await vm.boot()
    assert _state(vm) is VmState.RUNNING
    assert vm.pid is not None and _alive(vm.pid)
    pid = vm.pid
    info = await vm.instance_info()
    assert (info.state, info.id, info.vmm_version) == ("Running", config.vm_id, "1.12.1")

    machine = await vm.client.get_machine_config()
    assert machine["vcpu_count"] == 1
    assert machine["mem_size_mib"] == MEMORY_MIB
    assert machine["track_dirty_pages"] is True
    exported = await vm.client.get_vm_config()
    # Boot files and disks are given by names in run_dir, which snapshots record.
    assert exported["boot-source"]["kernel_image_path"] == "vmlinux"
    assert exported["drives"][0]["path_on_host"] == "rootfs"
    assert exported["drives"][0]["is_root_device"] is True
    assert (config.run_dir / "vmlinux").resolve() == config.kernel.resolve()
    assert str(config.rootfs.resolve()) in _open_files(vm.pid)

    metrics = await vm.metrics()
    assert metrics.rss_bytes > 0
    assert metrics.cpu_seconds >= 0

    await vm.pause()
    assert _state(vm) is VmState.PAUSED
    assert (await vm.instance_info()).state == "Paused"

    full = await vm.snapshot(sandbox.dir / "full")
    assert (full.memfile, full.state, full.diff) == (
        sandbox.dir / "full" / "memfile",
        sandbox.dir / "full" / "state",
        False,
    )
    assert full.memfile.stat().st_size == MEMORY_MIB << 20
    assert _allocated(full.memfile) > 0
    assert 0 < full.state.stat().st_size < 1 << 20

    # Still paused since the full snapshot: almost nothing is dirty.
    diff = await vm.snapshot(sandbox.dir / "diff", diff=True)
    assert diff.diff
    assert diff.memfile.stat().st_size == MEMORY_MIB << 20
    assert _allocated(diff.memfile) < _allocated(full.memfile) // 4
    assert diff.state.stat().st_size > 0

    await vm.resume()
    assert _state(vm) is VmState.RUNNING
    assert (await vm.instance_info()).state == "Running"

    await vm.stop()
    assert _state(vm) is VmState.STOPPED
    assert vm.pid is None
    assert not _alive(pid)
    assert not vm.api_socket.exists()
    await vm.stop()  # idempotent
    assert _state(vm) is VmState.STOPPED

    assert "Running Firecracker v1.12.1" in vm.log_path.read_text()
    assert vm.serial_log_path.exists()


async def test_calls_outside_their_states_fail_before_reaching_firecracker(
    sandbox: Sandbox,
) -> None:
    vm = sandbox.vm(sandbox.config("states"))
    with pytest.raises(FailedPrecondition, match="created"):
        await vm.pause()
    with pytest.raises(FailedPrecondition):
        await vm.snapshot(sandbox.dir / "nope")
    assert vm.pid is None
    await vm.boot()
    with pytest.raises(FailedPrecondition, match="running, not paused"):
        await vm.snapshot(sandbox.dir / "nope")
    with pytest.raises(FailedPrecondition):
        await vm.boot()
    await vm.stop()
    with pytest.raises(FailedPrecondition, match="stopped"):
        await vm.resume()


async def test_logger_and_metrics_files(sandbox: Sandbox) -> None:
    vm = sandbox.vm(sandbox.config("metrics"))
    await vm.boot()
    await vm.client.flush_metrics()
    lines = [line for line in vm.metrics_path.read_text().splitlines() if line.strip()]
    assert lines, "a flush writes one JSON object"
    assert '"api_server"' in lines[-1]
    # The logger can be pointed elsewhere only once per process: a second configuration is
    # refused with Firecracker's own message.
    other = sandbox.dir / "other.log"
    other.touch()
    with pytest.raises(InvalidArgument) as raised:
        await vm.client.put_logger(other)
    assert isinstance(raised.value.__cause__, FirecrackerFault)
    assert raised.value.__cause__.status == 400


# -- API errors ------------------------------------------------------------------------------------


async def test_bad_machine_config_is_invalid_argument_with_firecrackers_message(
    sandbox: Sandbox,
) -> None:
    vm = sandbox.vm(sandbox.config("badcpu", vcpus=0))
    with pytest.raises(InvalidArgument, match="The number of vCPUs must be greater than 0") as err:
        await vm.boot()
    cause = err.value.__cause__
    assert isinstance(cause, FirecrackerFault)
    assert (cause.method, cause.path, cause.status) == ("PUT", "/machine-config", 400)
    assert err.value.message == cause.fault_message
    # A failed boot leaves nothing running.
    assert _state(vm) is VmState.STOPPED
    assert vm.pid is None
    assert not vm.api_socket.exists()


async def test_missing_kernel_and_pre_boot_calls_after_start(sandbox: Sandbox) -> None:
    vm = sandbox.vm(sandbox.config("nokernel", kernel=sandbox.dir / "missing-vmlinux"))
    with pytest.raises(InvalidArgument, match="kernel file cannot be opened"):
        await vm.boot()
    assert _state(vm) is VmState.STOPPED

    running = sandbox.vm(sandbox.config("late"))
    await running.boot()
    with pytest.raises(InvalidArgument, match="not supported after starting"):
        await running.client.put_machine_config(vcpu_count=2, mem_size_mib=256)


async def test_a_failed_snapshot_load_stops_the_vm(sandbox: Sandbox) -> None:
    garbage = sandbox.dir / "garbage"
    garbage.mkdir()
    (garbage / "state").write_bytes(b"not a snapshot")
    (garbage / "memfile").write_bytes(bytes(PAGE))
    vm = sandbox.vm(sandbox.config("badload"))
    with pytest.raises(InvalidArgument, match="Load snapshot error"):
        await vm.restore(SnapshotFiles(garbage / "memfile", garbage / "state"))
    assert _state(vm) is VmState.STOPPED
    assert vm.pid is None


async def test_restore_refuses_a_diff_memfile_without_starting_anything(
    sandbox: Sandbox,
) -> None:
    vm = sandbox.vm(sandbox.config("diffload"))
    with pytest.raises(InvalidArgument, match="merge it onto its parent"):
        await vm.restore(SnapshotFiles(sandbox.dir / "m", sandbox.dir / "s", diff=True))
    assert vm.pid is None


async def test_api_unreachable_is_unavailable(tmp_path: Path) -> None:
    from wrenn.core.errors import Unavailable

    client = FirecrackerClient(tmp_path / "no.sock")
    try:
        with pytest.raises(Unavailable):
            await client.describe_instance()
    finally:
        await client.aclose()


# -- restore: File backend -------------------------------------------------------------------------


async def test_restore_with_the_file_backend_paused_then_resumed(sandbox: Sandbox) -> None:
    files = await _booted_snapshot(sandbox, "origin")

    # The restored VM gets a disk of its own: the snapshot names the disk by its staged name.
    disk = sandbox.dir / "restored-rootfs.ext4"
    shutil.copyfile(sandbox.rootfs, disk)
    vm = sandbox.vm(sandbox.config("restored", rootfs=disk))
    await vm.restore(files, resume=False)
    assert _state(vm) is VmState.PAUSED
    assert vm.pid is not None and _alive(vm.pid)
    assert (await vm.instance_info()).state == "Paused"
    assert str(disk) in _open_files(vm.pid)
    assert str(sandbox.rootfs) not in _open_files(vm.pid)
    machine = await vm.client.get_machine_config()
    assert machine["mem_size_mib"] == MEMORY_MIB

    await vm.resume()
    assert (await vm.instance_info()).state == "Running"
    await vm.pause()
    # Dirty page tracking was asked for at load: a diff snapshot follows a restore.
    diff = await vm.snapshot(sandbox.dir / "after-restore", diff=True)
    assert diff.memfile.stat().st_size == MEMORY_MIB << 20
    await vm.stop()

    again = sandbox.vm(sandbox.config("resumed"))
    await again.restore(files)
    assert _state(again) is VmState.RUNNING
    assert (await again.instance_info()).state == "Running"
    # One memory file backs any number of VMs: it is mapped privately, never written.
    second = sandbox.vm(sandbox.config("resumed2"))
    await second.restore(files)
    assert (await second.instance_info()).state == "Running"


async def test_network_namespace_tap_and_mmds_survive_a_restore(
    sandbox: Sandbox, netns: str
) -> None:
    network = NetworkAttachment(tap="tap0", mac=GUEST_MAC, netns=netns)
    metadata = {"instanceID": "sbx-1", "envID": "tpl-1"}
    vm = sandbox.vm(sandbox.config("net", network=network, metadata=metadata))
    await vm.boot()
    assert vm.pid is not None
    assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    exported = await vm.client.get_vm_config()
    (iface,) = exported["network-interfaces"]
    assert (iface["iface_id"], iface["host_dev_name"]) == ("eth0", "tap0")
    assert iface["guest_mac"].lower() == GUEST_MAC
    assert exported["mmds-config"]["version"] == "V2"
    assert exported["mmds-config"]["network_interfaces"] == ["eth0"]
    assert await vm.client.get_mmds() == metadata

    await vm.pause()
    files = await vm.snapshot(sandbox.dir / "net-snap")
    await vm.stop()

    # MMDS data is not part of a snapshot: the restore puts the new sandbox's metadata.
    later = {"instanceID": "sbx-2", "envID": "tpl-1"}
    restored = sandbox.vm(sandbox.config("net2", network=network, metadata=later))
    await restored.restore(files)
    assert restored.pid is not None
    assert os.stat(f"/proc/{restored.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    assert await restored.client.get_mmds() == later
    await restored.set_metadata({"instanceID": "sbx-3"})
    assert await restored.client.get_mmds() == {"instanceID": "sbx-3"}


# -- restore: Uffd backend with the page server ----------------------------------------------------


async def test_restore_with_the_uffd_backend_served_from_snapshot_layers(
    sandbox: Sandbox,
) -> None:
    """Full snapshot → layer 0; restore, run, diff snapshot → layer 1 over it; then a fresh
    Firecracker loads the diff's state with the Uffd backend and our page server fills its
    memory from the two layers. A full snapshot of that VM taken before it runs reads every
    page through the page server, so it must equal the layered memory byte for byte."""
    uffd = pytest.importorskip("wrenn.agent.uffd", reason="the uffd page server is not there")
    from wrenn.agent.snapshots.diff import dirty_blocks_from_sparse, write_diff
    from wrenn.agent.snapshots.reader import Reader

    full = await _booted_snapshot(sandbox, "gen0")
    gen0_id = uuid4()
    layer0 = sandbox.dir / "layer0"
    gen0 = write_diff(
        parent=None,
        source=full.memfile,
        dirty=dirty_blocks_from_sparse(full.memfile, PAGE),
        dest=layer0,
        build_id=gen0_id,
        block_size=PAGE,
    )

    runner = sandbox.vm(sandbox.config("gen1"))
    await runner.restore(full)
    await asyncio.sleep(0.2)  # let the guest dirty some memory
    await runner.pause()
    diff = await runner.snapshot(sandbox.dir / "gen1-snap", diff=True)
    await runner.stop()
    gen1_id = uuid4()
    layer1 = sandbox.dir / "layer1"
    gen1 = write_diff(
        parent=gen0.header,
        source=diff.memfile,
        dirty=dirty_blocks_from_sparse(diff.memfile, PAGE),
        dest=layer1,
        build_id=gen1_id,
    )
    assert gen1.header.generation == 1

    with Reader(gen1.header, {gen0_id: layer0, gen1_id: layer1}) as memory:
        run_dir = sandbox.dir / "uffd"
        run_dir.mkdir()
        server = uffd.UffdServer(run_dir / "uffd.sock", memory)
        await server.start()
        try:
            vm = sandbox.vm(sandbox.config("lazy", run_dir=run_dir))
            await vm.restore_uffd(diff.state, server.socket_path, resume=False)
            assert _state(vm) is VmState.PAUSED
            assert (await vm.instance_info()).state == "Paused"

            async with asyncio.timeout(10):
                regions = await server.wait_connected()
            assert sum(r.size for r in regions) == MEMORY_MIB << 20
            assert server.peer_pid == vm.pid

            copy = await vm.snapshot(sandbox.dir / "served")
            stats = server.stats
            assert stats.faults > 0
            assert stats.pages_faulted + stats.pages_readahead >= (MEMORY_MIB << 20) // PAGE
            served, expected = copy.memfile.read_bytes(), memory.read(0, MEMORY_MIB << 20)
            # Byte for byte, but for the 16 bytes of the VM generation ID that Firecracker
            # writes into guest memory on every load (the VMGenID device).
            differ = _differing_bytes(served, expected)
            assert len(differ) <= 16
            assert not differ or differ[-1] - differ[0] < 16
            await vm.resume()
            assert (await vm.instance_info()).state == "Running"
            await vm.stop()
            async with asyncio.timeout(10):
                assert await server.wait_closed() == "vm_gone"
        finally:
            await server.stop()
    assert not (run_dir / "uffd.sock").exists()


# -- the jailer ------------------------------------------------------------------------------------


def test_jailer_argument_list() -> None:
    jailer = JailerConfig(
        uid=123,
        gid=456,
        jailer_bin="/usr/bin/jailer",
        chroot_base=Path("/srv/jail"),
        cgroup_version=2,
        cgroups={"cpu.max": "50000 100000", "memory.max": "536870912"},
        parent_cgroup="wrenn",
        resource_limits={"no-file": 1024},
        new_pid_ns=True,
    )
    argv = jailer_argv(
        jailer,
        vm_id="sbx-1",
        firecracker_bin=Path("/usr/bin/firecracker"),
        netns="wrenn-slot-3",
        firecracker_args=["--api-sock", "/run/firecracker.socket"],
    )
    assert argv == [
        "/usr/bin/jailer",
        "--id",
        "sbx-1",
        "--exec-file",
        "/usr/bin/firecracker",
        "--uid",
        "123",
        "--gid",
        "456",
        "--chroot-base-dir",
        "/srv/jail",
        "--cgroup-version",
        "2",
        "--cgroup",
        "cpu.max=50000 100000",
        "--cgroup",
        "memory.max=536870912",
        "--parent-cgroup",
        "wrenn",
        "--resource-limit",
        "no-file=1024",
        "--netns",
        "/run/netns/wrenn-slot-3",
        "--new-pid-ns",
        "--",
        "--api-sock",
        "/run/firecracker.socket",
    ]
    assert jailer.chroot(Path("/usr/bin/firecracker"), "sbx-1") == Path(
        "/srv/jail/firecracker/sbx-1/root"
    )
    with pytest.raises(InvalidArgument, match="jail"):
        jailer_argv(
            jailer,
            vm_id="not/valid",
            firecracker_bin=Path("/usr/bin/firecracker"),
            netns=None,
            firecracker_args=[],
        )


@pytest.mark.parametrize("new_pid_ns", [False, True], ids=["same-pid-ns", "new-pid-ns"])
async def test_jailed_boot_snapshot_and_restore(
    sandbox: Sandbox, jailer_bin: Path, new_pid_ns: bool
) -> None:
    jailer = JailerConfig(
        uid=65534,
        gid=65534,
        jailer_bin=str(jailer_bin),
        chroot_base=sandbox.dir / "jail",
        new_pid_ns=new_pid_ns,
    )
    (sandbox.dir / "jail").mkdir()
    config = sandbox.config("jailed")
    vm = sandbox.vm(config, jailer=jailer)
    await vm.boot()
    assert vm.chroot is not None
    assert vm.pid is not None and _alive(vm.pid)
    assert os.stat(f"/proc/{vm.pid}").st_uid == 65534
    # Its root is the chroot: the kernel and the disk were staged into it.
    assert _root_holds(vm.pid, "vmlinux")
    assert _root_holds(vm.pid, "rootfs")
    assert vm.api_socket == vm.chroot / "run" / "firecracker.socket"
    assert (await vm.instance_info()).state == "Running"
    assert "Running Firecracker v1.12.1" in vm.log_path.read_text()

    await vm.pause()
    files = await vm.snapshot(sandbox.dir / "jailed-snap")
    assert files.memfile.stat().st_size == MEMORY_MIB << 20
    assert files.state.stat().st_size > 0
    jail_dir = vm.chroot.parent
    pid = vm.pid
    await vm.stop()
    assert not _alive(pid)
    assert not jail_dir.exists()

    restored = sandbox.vm(sandbox.config("jailed2"), jailer=jailer)
    await restored.restore(files)
    assert (await restored.instance_info()).state == "Running"
