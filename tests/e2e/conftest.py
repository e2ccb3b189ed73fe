"""The whole stack for end-to-end tests: ``wrenn up --quickstart`` (what ``make run`` starts)
runs ``wrenn-cp`` with SQLite and a ``wrenn-agent`` with real QEMU guests, on loopback ports
of their own, with a state directory, slot prefix and address pools of their own. The tests
drive it with the official e2b SDK configured only by ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and
``E2B_API_KEY``, taken from what the quick start prints.

At the end of the session the stack is stopped with SIGINT, as Ctrl-C does, and must leave no
VM, namespace, tap, mount or loop device behind and print no traceback; whatever happens, every
trace of it is then removed (``AgentHome.scrub``) and its processes are ended by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2b import Sandbox

from tests.conftest import free_port
from tests.integration.agent.agent_harness import AgentHome, Leftovers
from wrenn.agent.images import GuestImage, build_base
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

#: The agent's first start builds the base template (a cold boot under TCG); the image itself
#: is built before the tests (``make image``) or by the first fixture that needs it.
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
#: A slot index of their own for the address pools (the agent tests use 0, the bench 9).
POOL_INDEX = 5
SLOTS = 4

_EXPORT = re.compile(r"^export (E2B_API_URL=\S+ E2B_SANDBOX_URL=\S+ E2B_API_KEY=\S+)$", re.M)
_EXAMPLE = re.compile(r"^(\S+) - <<'EOF'\n(.*?)^EOF$", re.M | re.S)
_CHILD = re.compile(r"^(\w+)\s*\| started \(pid (\d+)\)", re.M)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end tests run last (in their own order), so the stack they share for the
    session is started after every other test and stopped right after its own."""
    here = Path(__file__).parent
    items.sort(key=lambda item: here in item.path.parents)


def _needs_root_and_qemu() -> str | None:
    if os.geteuid() != 0:
        return "the stack's host agent needs root"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "mkfs.xfs", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system)"
    return None


@dataclass(frozen=True)
class Quickstart:
    """What the quick start printed once the stack could create sandboxes."""

    #: ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``E2B_API_KEY``.
    env: dict[str, str]
    #: The Python it says to run the example with, and the example itself.
    python: str
    example: str

    @classmethod
    def parse(cls, output: str) -> Quickstart:
        exports = _EXPORT.search(output)
        example = _EXAMPLE.search(output)
        assert exports and example, f"no SDK example in:\n{output}"
        env = dict(pair.split("=", 1) for pair in exports.group(1).split())
        return cls(env=env, python=example.group(1), example=example.group(2))


class Stack:
    """``wrenn up --quickstart`` as a subprocess (its own session); its output in a file.
    ``restart()`` stops it and starts it again on the same state, ports and settings, as a
    second ``make run`` does."""

    def __init__(self, home: AgentHome, settings: dict[str, str] | None = None) -> None:
        """``settings``: more ``WRENN_CP_*`` / ``WRENN_AGENT_*`` variables for ``wrenn up``."""
        self.home = home
        self.api_port, self.proxy_port, self.agent_port = free_port(), free_port(), free_port()
        self.log = home.state_dir / "up.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WRENN_CP_", "WRENN_AGENT_", "E2B_"))
        }
        self.env.update(
            {
                "WRENN_CP_HOST": "127.0.0.1",
                "WRENN_CP_PORT": str(self.api_port),
                "WRENN_CP_PROXY_PORT": str(self.proxy_port),
                "WRENN_CP_STATE_DIR": str(home.state_dir / "controlplane"),
                "WRENN_AGENT_HOST": "127.0.0.1",
                "WRENN_AGENT_PORT": str(self.agent_port),
                "WRENN_AGENT_STATE_DIR": str(home.state_dir),
                "WRENN_AGENT_BASE_IMAGE_DIR": str(home.image_dir),
                "WRENN_AGENT_NETWORK_PREFIX": home.prefix,
                "WRENN_AGENT_TRANSIT_POOL": home.transit_pool,
                "WRENN_AGENT_SANDBOX_POOL": home.sandbox_pool,
                "WRENN_AGENT_SLOTS": str(home.slots),
                # The template appears in the control plane with the heartbeat after its build.
                "WRENN_AGENT_HEARTBEAT_INTERVAL_S": "2",
                **(settings or {}),
            }
        )
        self._run_start = 0
        self.quickstart = self._start()

    def _start(self) -> Quickstart:
        self._run_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wrenn.cli", "up", "--quickstart", "--grace", "60"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self._wait_ready()

    def restart(self) -> int:
        """Stop (SIGINT) and start again; the stop's exit code."""
        code = self.stop()
        self.quickstart = self._start()
        return code

    def output(self) -> str:
        """Everything every run printed."""
        return self.log.read_text(errors="replace")

    def run_output(self) -> str:
        """What the current run printed."""
        with self.log.open("rb") as f:
            f.seek(self._run_start)
            return f.read().decode(errors="replace")

    def _wait_ready(self) -> Quickstart:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            output = self.run_output()
            if "Wrenn is ready." in output and re.search(r"^EOF$", output, re.M):
                return Quickstart.parse(output)
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn up exited early:\n{output}")
            time.sleep(0.5)
        raise RuntimeError(f"wrenn up never printed the quick start:\n{self.run_output()}")

    def address_of(self, sandbox_id: str) -> str:
        """The address the host reaches ``sandbox_id`` at (its slot's), as the agent lists it."""

        async def listed() -> str:
            agent = HostAgentClient(f"http://127.0.0.1:{self.agent_port}")
            try:
                sandboxes = (await agent.list_sandboxes(pb.ListSandboxesRequest())).sandboxes
            finally:
                await agent.close()
            return next(s.address for s in sandboxes if s.sandbox_id == sandbox_id)

        return asyncio.run(listed())

    def children(self) -> list[int]:
        """PIDs of the processes (``cp``, ``agent``) every run of ``wrenn up`` started."""
        return [int(pid) for _, pid in _CHILD.findall(self.output())]

    def pid_of(self, name: str) -> int:
        """PID of the process ``name`` (``cp``, ``agent``) the last run started."""
        return [int(pid) for child, pid in _CHILD.findall(self.output()) if child == name][-1]

    def stop(self) -> int:
        """SIGINT, as Ctrl-C in a terminal; its exit code (SIGKILL after the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill_children(self) -> None:
        """SIGKILL, by PID, any child a failed stop left running."""
        for pid in self.children():
            if _is_wrenn_process(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _is_wrenn_process(pid: int) -> bool:
    """Whether ``pid`` is still the wrenn process we started (PIDs are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"wrenn-cp" in cmdline or b"wrenn-agent" in cmdline


def _settled_leftovers(home: AgentHome) -> Leftovers:
    """What the stopped stack left; the kernel detaches an auto-clearing loop device shortly
    after its unmount, so that count is read again for a few seconds while it is not 0."""
    left = Leftovers.count(home)
    for _ in range(50):
        if left.loop_devices == 0:
            break
        time.sleep(0.2)
        left = Leftovers.count(home)
    return left


@pytest.fixture(scope="session")
def e2e_image() -> GuestImage:
    if (reason := _needs_root_and_qemu()) is not None:
        pytest.skip(reason)
    return build_base(Path(os.environ.get("WRENN_TEST_STATE_DIR", "/var/lib/wrenn")))


@pytest.fixture(scope="session")
def stack(e2e_image: GuestImage, request: pytest.FixtureRequest) -> Iterator[Stack]:
    home = AgentHome.make(e2e_image, index=POOL_INDEX, slots=SLOTS)
    up: Stack | None = None
    clean = False
    try:
        up = Stack(home)
        yield up
        code = up.stop()
        left = _settled_leftovers(home)
        assert code == 0, f"wrenn up ended with {code}"
        shutdown = up.run_output().split("SIGINT: stopping", 1)[-1]
        assert "Traceback" not in shutdown, "a traceback while stopping"
        assert (left.vmm_processes, left.run_dirs) == (0, 0), left
        assert (left.namespaces, left.taps, left.host_links) == (0, 0, 0), left
        assert (left.mounts, left.loop_devices) == (0, 0), left
        clean = True
    finally:
        if up is not None:
            if not clean or request.session.testsfailed:
                sys.stderr.write(f"--- wrenn up ---\n{up.output()[-30000:]}\n")
            up.stop()
            up.kill_children()
        home.scrub()


@pytest.fixture(scope="session")
def sdk_env(stack: Stack) -> Iterator[dict[str, str]]:
    """The SDK's three variables, as the quick start printed them, for the whole session;
    nothing else configures it (no debug mode, no domain)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in stack.quickstart.env.items():
            mp.setenv(name, value)
        yield stack.quickstart.env


@pytest.fixture(scope="session")
def run_id() -> str:
    """Metadata value marking this session's sandboxes."""
    return uuid.uuid4().hex[:12]


class Sandboxes:
    """Creates sandboxes through the SDK and kills, at teardown, every one it made."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.made: list[str] = []

    def create(self, **kwargs: Any) -> Sandbox:
        metadata = {"e2e": self.run_id, **kwargs.pop("metadata", {})}
        sbx = Sandbox.create(metadata=metadata, **kwargs)
        self.made.append(sbx.sandbox_id)
        return sbx

    def close(self) -> None:
        for sandbox_id in self.made:
            with contextlib.suppress(Exception):
                Sandbox.kill(sandbox_id)


@pytest.fixture
def sandboxes(sdk_env: dict[str, str], run_id: str) -> Iterator[Sandboxes]:
    made = Sandboxes(run_id)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def module_sandboxes(sdk_env: dict[str, str], run_id: str) -> Iterator[Sandboxes]:
    made = Sandboxes(run_id)
    try:
        yield made
    finally:
        made.close()
