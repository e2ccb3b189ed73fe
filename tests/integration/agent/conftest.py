"""Fixtures shared by the host agent's integration tests.

Real guests: the base image is built once (cached on disk across runs under
``$WRENN_TEST_STATE_DIR``, default ``/var/lib/wrenn``) and booted under QEMU. Each test gets
factories whose teardown removes every VM, namespace, tap, forwarder and file they made, also
when the test fails, and prints the serial console of its VMs on failure.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.agent.agent_harness import Agent, AgentHome
from wrenn.agent.images import GuestImage, build_base
from wrenn.agent.vmm.base import NetworkAttachment, VmConfig
from wrenn.agent.vmm.qemu import QemuVmm

#: Guest network, the same in every slot.
GUEST_IP = "169.254.0.21"
GATEWAY_IP = "169.254.0.22"
GUEST_MAC = "02:57:52:a9:fe:15"
TAP_NAME = "tap0"
ENVD_PORT = 49983
KERNEL_IP_ARG = f"ip={GUEST_IP}::{GATEWAY_IP}:255.255.255.252::eth0:off"
#: Cold boot to a healthy envd under TCG takes seconds; this bounds it with a wide margin.
ENVD_READY_TIMEOUT_S = 120.0

_names = itertools.count()


def _needs_root_and_qemu() -> str | None:
    if os.geteuid() != 0:
        return "guest images and VMs need root"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "socat"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session")
def base_image() -> GuestImage:
    """The base guest image, built on the first use on this machine and cached after."""
    if (reason := _needs_root_and_qemu()) is not None:
        pytest.skip(reason)
    state_dir = Path(os.environ.get("WRENN_TEST_STATE_DIR", "/var/lib/wrenn"))
    return build_base(state_dir)


class TestNetns:
    """A network namespace holding ``tap0`` at the gateway address, as a slot has it, plus a
    socat forwarder from a unix socket (reachable from the host) to envd in the guest."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"wrenn-test-{os.getpid()}-{next(_names)}"
        self.envd_socket = workdir / f"{self.name}.envd.sock"
        self._forwarder: subprocess.Popen[bytes] | None = None
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            _run("ip", "-n", self.name, "tuntap", "add", "dev", TAP_NAME, "mode", "tap")
            _run("ip", "-n", self.name, "addr", "add", f"{GATEWAY_IP}/30", "dev", TAP_NAME)
            _run("ip", "-n", self.name, "link", "set", TAP_NAME, "up")
            self._forwarder = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.name,
                    "socat",
                    f"UNIX-LISTEN:{self.envd_socket},fork,unlink-early",
                    f"TCP:{GUEST_IP}:{ENVD_PORT}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            self.close()
            raise

    @property
    def attachment(self) -> NetworkAttachment:
        return NetworkAttachment(tap=TAP_NAME, mac=GUEST_MAC, netns=self.name)

    def envd(self) -> EnvdOverUnix:
        deadline = time.monotonic() + 10
        while not self.envd_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return EnvdOverUnix(self.envd_socket)

    def close(self) -> None:
        if self._forwarder is not None and self._forwarder.poll() is None:
            # socat forks per connection: end the whole session it leads.
            os.killpg(self._forwarder.pid, signal.SIGKILL)
            self._forwarder.wait()
        self.envd_socket.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)


class EnvdOverUnix:
    """envd in a guest, spoken to over the namespace's forwarder: plain HTTP and raw Connect
    (JSON codec, streaming envelopes)."""

    def __init__(self, socket_path: Path) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url=f"http://{GUEST_IP}:{ENVD_PORT}",
            timeout=30,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def healthy(self) -> bool:
        try:
            response = await self._client.get("/health", timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code == 204

    async def run(self, script: str) -> tuple[int, str]:
        """Run ``/bin/sh -c script`` through ``process.Process/Start``; exit code and stdout."""
        message = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}).encode()
        body = struct.pack(">BI", 0, len(message)) + message
        response = await self._client.post(
            "/process.Process/Start",
            content=body,
            headers={
                "Content-Type": "application/connect+json",
                "Connect-Protocol-Version": "1",
            },
        )
        response.raise_for_status()
        stdout, exit_code = b"", None
        for flags, payload in _envelopes(response.content):
            if flags & 0x02:
                if payload.get("error"):
                    raise AssertionError(f"Connect error: {payload['error']}")
                continue
            event = payload.get("event", {})
            if "data" in event and "stdout" in event["data"]:
                stdout += base64.b64decode(event["data"]["stdout"])
            if "end" in event:
                exit_code = int(event["end"].get("exitCode", 0))
        assert exit_code is not None, "the process stream ended without an end event"
        return exit_code, stdout.decode()


def _envelopes(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    pos = 0
    while pos + 5 <= len(data):
        flags, length = struct.unpack_from(">BI", data, pos)
        yield flags, json.loads(data[pos + 5 : pos + 5 + length] or b"{}")
        pos += 5 + length


class VmFactory:
    """Builds QEMU guests of the base image. Teardown stops all of them, deletes their
    namespaces and empties the test's directory (disks, run directories, snapshots)."""

    def __init__(self, image: GuestImage, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.vms: list[QemuVmm] = []
        self.netns: list[TestNetns] = []
        self.clients: list[EnvdOverUnix] = []

    def network(self) -> TestNetns:
        ns = TestNetns(self.workdir)
        self.netns.append(ns)
        return ns

    def client(self, ns: TestNetns) -> EnvdOverUnix:
        client = ns.envd()
        self.clients.append(client)
        return client

    def vm(
        self,
        *,
        ns: TestNetns | None = None,
        memory_mib: int = 512,
        rootfs: Path | None = None,
        kernel_args: str | None = None,
        kernel: Path | None = None,
        name: str | None = None,
    ) -> QemuVmm:
        vm_id = name or f"vm{len(self.vms)}"
        args = self.image.kernel_args() + (f" {KERNEL_IP_ARG}" if ns is not None else "")
        config = VmConfig(
            vm_id=vm_id,
            vcpus=1,
            memory_mib=memory_mib,
            kernel=kernel or self.image.kernel,
            initrd=self.image.initrd,
            rootfs=rootfs or self.disk(vm_id),
            run_dir=self.workdir / vm_id,
            kernel_args=kernel_args if kernel_args is not None else args,
            network=ns.attachment if ns is not None else None,
        )
        vm = QemuVmm(config, accel="tcg")
        self.vms.append(vm)
        return vm

    def disk(self, vm_id: str) -> Path:
        """A private copy of the image's root filesystem (sparse)."""
        dest = self.workdir / f"{vm_id}.ext4"
        subprocess.run(["cp", "--sparse=always", str(self.image.rootfs), str(dest)], check=True)
        return dest

    async def wait_envd(self, vm: QemuVmm, client: EnvdOverUnix) -> None:
        await vm.wait_until(client.healthy, timeout_s=ENVD_READY_TIMEOUT_S, what="envd /health")

    async def close(self, failed: bool) -> None:
        for client in self.clients:
            await client.aclose()
        for vm in self.vms:
            if failed:
                sys.stderr.write(f"--- {vm.config.vm_id} ---\n{vm.logs(200)}\n")
            await vm.stop()
        for ns in self.netns:
            ns.close()
        # Disks, run directories and snapshots: everything the test put in its directory.
        for path in self.workdir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture
async def vms(
    base_image: GuestImage, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[VmFactory]:
    factory = VmFactory(base_image, tmp_path)
    try:
        yield factory
    finally:
        rep = getattr(request.node, "rep_call", None)
        await factory.close(failed=rep is None or rep.failed)


@pytest.fixture(scope="session")
def agent_home(base_image: GuestImage) -> Iterator[AgentHome]:
    """State directory, slot prefix and address pools for ``wrenn-agent`` processes, shared by
    the session's agents (one runs at a time) so the base template is built once; scrubbed at
    the end whatever the agents left."""
    home = AgentHome.make(base_image, slots=2)
    try:
        yield home
    finally:
        home.scrub()


#: Forced, so that restarts skip the accelerator probe (test_agent exercises it).
QEMU_TCG = {"runtime": "qemu", "qemu_accel": "tcg"}


class Agents:
    """Agents started by one test, all stopped (by PID) at its end; logs printed on failure."""

    def __init__(self, home: AgentHome) -> None:
        self.home = home
        self.started: list[Agent] = []

    async def start(self, **settings: str) -> Agent:
        agent = await asyncio.to_thread(Agent, self.home, **{**QEMU_TCG, **settings})
        self.started.append(agent)
        return agent

    async def stop(self, agent: Agent) -> None:
        await asyncio.to_thread(agent.stop)


@pytest.fixture
async def agents(agent_home: AgentHome, request: pytest.FixtureRequest) -> AsyncIterator[Agents]:
    agents = Agents(agent_home)
    try:
        yield agents
    finally:
        for agent in agents.started:
            await agents.stop(agent)
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            for agent in agents.started:
                sys.stderr.write(f"--- agent log ---\n{agent.logs()[-20000:]}\n")
