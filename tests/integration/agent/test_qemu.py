"""The QEMU driver booting real guests of the base image (TCG on machines where KVM cannot
boot them): envd reachable through a tap in a namespace, commands run through Connect,
pause/resume, snapshots restored into other namespaces, and failures reported with logs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.integration.agent.conftest import EnvdOverUnix, VmFactory
from wrenn.agent.images import GuestImage
from wrenn.agent.vmm.base import SnapshotFiles, VmState
from wrenn.agent.vmm.qemu import GuestFailed, QemuVmm, probe_accel
from wrenn.core.errors import FailedPrecondition, InvalidArgument

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_probe_accel_names_an_accelerator_and_why(base_image: GuestImage) -> None:
    probe = await probe_accel(base_image.kernel)
    assert probe.accel in ("kvm", "tcg")
    assert probe.reason
    print(f"accelerator: {probe.accel} ({probe.reason})")


async def test_boot_run_pause_snapshot_restore_elsewhere(vms: VmFactory, tmp_path: Path) -> None:
    first_ns = vms.network()
    vm = vms.vm(ns=first_ns, name="source")
    await vm.boot()
    assert vm.state is VmState.RUNNING and vm.pid is not None
    assert int(vm.pid_file.read_text()) == vm.pid
    envd = vms.client(first_ns)
    await vms.wait_envd(vm, envd)

    code, out = await envd.run("id -un; hostname; ip -4 -o addr show dev eth0")
    assert code == 0, out
    user, _, rest = out.partition("\n")
    assert user == "user"
    assert "169.254.0.21/30" in rest
    code, out = await envd.run(
        "echo on-disk > $HOME/marker && echo in-memory > /tmp/marker && sync && echo ok"
    )
    assert (code, out) == (0, "ok\n")

    metrics = await vm.metrics()
    assert metrics.rss_bytes > 0 and metrics.cpu_seconds > 0

    await vm.pause()
    assert vm.state is VmState.PAUSED
    with pytest.raises(FailedPrecondition):
        await vm.pause()
    snapshot = await vm.snapshot(tmp_path / "snap")
    assert snapshot.memfile.stat().st_size == 512 << 20
    assert snapshot.state.stat().st_size > 0
    # The shared RAM block stays out of the stream: the state file holds devices and vCPUs.
    assert snapshot.state.stat().st_size < 16 << 20
    disk = vm.config.rootfs
    await vm.stop()
    assert vm.state is VmState.STOPPED and vm.pid is None
    assert not vm.qmp_socket.exists() and not vm.pid_file.exists()
    await vm.stop()  # idempotent

    second_ns = vms.network()
    restored = vms.vm(ns=second_ns, name="restored", rootfs=disk)
    memfile_digest = _sha256(snapshot.memfile)
    await restored.restore(snapshot)
    assert restored.state is VmState.RUNNING
    envd = vms.client(second_ns)
    await vms.wait_envd(restored, envd)
    code, out = await envd.run("cat $HOME/marker /tmp/marker; echo again > /tmp/after")
    assert (code, out) == (0, "on-disk\nin-memory\n")
    await restored.pause()
    await restored.resume()
    code, out = await envd.run("cat /tmp/after")
    assert (code, out) == (0, "again\n")
    # The guest's RAM is a private mapping of the snapshot: its writes never reach the file.
    assert _sha256(snapshot.memfile) == memfile_digest


async def test_one_snapshot_backs_two_guests_and_snapshots_of_restored_guests(
    vms: VmFactory, tmp_path: Path
) -> None:
    ns = vms.network()
    vm = vms.vm(ns=ns, name="template")
    await vm.boot()
    await vms.wait_envd(vm, vms.client(ns))
    await vm.pause()
    template = await vm.snapshot(tmp_path / "template")
    await vm.stop()
    memfile_digest = _sha256(template.memfile)

    guests = []
    for name in ("a", "b"):
        guest_ns = vms.network()
        guest = vms.vm(ns=guest_ns, name=name, rootfs=vms.disk(f"{name}-disk"))
        await guest.restore(template)
        envd = vms.client(guest_ns)
        await vms.wait_envd(guest, envd)
        guests.append((name, guest, envd))
    for name, _, envd in guests:
        assert await envd.run(f"echo {name} > /tmp/who; cat /tmp/who") == (0, f"{name}\n")
    for name, _, envd in guests:
        assert await envd.run("cat /tmp/who") == (0, f"{name}\n")
    assert _sha256(template.memfile) == memfile_digest

    # A restored guest's RAM is private, so its snapshot carries the RAM it changed.
    name, guest, envd = guests[0]
    await guest.pause()
    child = await guest.snapshot(tmp_path / "child")
    disk = guest.config.rootfs
    await guest.stop()
    child_ns = vms.network()
    grandchild = vms.vm(ns=child_ns, name="grandchild", rootfs=disk)
    await grandchild.restore(SnapshotFiles(memfile=child.memfile, state=child.state))
    envd = vms.client(child_ns)
    await vms.wait_envd(grandchild, envd)
    assert await envd.run("cat /tmp/who") == (0, "a\n")


async def test_qemu_that_cannot_start_fails_with_its_log_and_leaves_nothing(
    vms: VmFactory, tmp_path: Path
) -> None:
    bogus = tmp_path / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    vm = vms.vm(name="bogus")
    vm = type(vm)(vm.config.__class__(**{**vm.config.__dict__, "kernel": bogus}), accel="tcg")
    vms.vms.append(vm)
    with pytest.raises(GuestFailed) as failure:
        await vm.boot()
    assert "qemu log" in failure.value.message
    assert vm.pid is None and vm.state is VmState.STOPPED
    assert not vm.qmp_socket.exists() and not vm.ram_file.exists()


async def test_guest_panic_during_boot_is_reported_with_the_console(vms: VmFactory) -> None:
    vm = vms.vm(name="panics", kernel_args="rdinit=/wrenn-none root=/dev/wrenn-none")
    await vm.boot()

    async def never() -> bool:
        return False

    with pytest.raises(GuestFailed) as failure:
        await vm.wait_until(never, timeout_s=120, what="a guest that panics")
    assert "QEMU exited" in failure.value.message
    console = failure.value.message.partition("--- serial console ---\n")[2]
    assert "Kernel panic" in console


@pytest.fixture(params=["booted", "restored"])
async def guest(
    request: pytest.FixtureRequest, vms: VmFactory, tmp_path: Path
) -> tuple[QemuVmm, EnvdOverUnix]:
    """A running guest with a healthy envd: freshly booted, or restored from a snapshot of
    one into another namespace, so the same test runs on both."""
    ns = vms.network()
    vm = vms.vm(ns=ns, name="booted")
    await vm.boot()
    envd = vms.client(ns)
    await vms.wait_envd(vm, envd)
    if request.param == "booted":
        return vm, envd
    await vm.pause()
    snapshot = await vm.snapshot(tmp_path / "snapshot")
    disk = vm.config.rootfs
    await vm.stop()
    other = vms.network()
    restored = vms.vm(ns=other, name="restored", rootfs=disk)
    await restored.restore(snapshot)
    envd = vms.client(other)
    await vms.wait_envd(restored, envd)
    return restored, envd


async def test_guest_runs_commands_as_user_and_pauses(guest: tuple[QemuVmm, EnvdOverUnix]) -> None:
    vm, envd = guest
    assert await envd.run("sudo -n id -u; id -un; test -w /tmp && echo w") == (0, "0\nuser\nw\n")
    await vm.pause()
    assert vm.state is VmState.PAUSED
    await vm.resume()
    assert await envd.run("exit 3") == (3, "")
    assert (await vm.metrics()).rss_bytes > 0


async def test_restore_refuses_a_snapshot_of_another_memory_size(
    vms: VmFactory, tmp_path: Path
) -> None:
    memfile, state = tmp_path / "memfile", tmp_path / "state"
    with memfile.open("wb") as f:
        f.truncate(256 << 20)
    state.write_bytes(b"")
    vm = vms.vm(name="mismatch", memory_mib=512)
    with pytest.raises(InvalidArgument):
        await vm.restore(SnapshotFiles(memfile=memfile, state=state))
    assert vm.state is VmState.CREATED and vm.pid is None
