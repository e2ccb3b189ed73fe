"""A real ``wrenn-agent`` process for tests: its own state directory, slot name prefix and
address pools, a free loopback port, and the base image copied in (so a concurrent image
rebuild elsewhere never pulls it away). ``Leftovers`` counts what the agent owns on the host,
and ``scrub`` removes all of it whatever state the agent died in."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import httpx

from tests.conftest import free_port
from wrenn.agent import leftovers
from wrenn.agent.disks import loopfs
from wrenn.agent.images import GuestImage
from wrenn.agent.network import NetworkPlan, reap
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

#: Long enough for the runtime probe (a KVM boot attempt can take 20 s) and a template build.
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
RPC_TIMEOUT_MS = 300_000


@dataclass(frozen=True)
class AgentHome:
    """Everything one agent configuration owns on the host."""

    state_dir: Path
    image_dir: Path
    prefix: str
    transit_pool: str
    sandbox_pool: str
    slots: int

    @property
    def plan(self) -> NetworkPlan:
        return NetworkPlan(
            slot_count=self.slots,
            prefix=self.prefix,
            transit_pool=IPv4Network(self.transit_pool),
            sandbox_pool=IPv4Network(self.sandbox_pool),
        )

    @classmethod
    def make(cls, image: GuestImage, *, index: int = 0, slots: int = 3) -> AgentHome:
        state_dir = Path(tempfile.mkdtemp(prefix="wrenn-agent-test-", dir="/var/tmp"))
        image_dir = state_dir / "images" / image.dir.name
        image_dir.parent.mkdir()
        subprocess.run(
            ["cp", "-a", "--reflink=auto", "--sparse=always", str(image.dir), str(image_dir)],
            check=True,
        )
        return cls(
            state_dir=state_dir,
            image_dir=image_dir,
            prefix=f"wa{os.getpid() % 0xFFF:03x}{index}",
            transit_pool=f"10.236.{index}.0/24",
            sandbox_pool=f"10.237.{index}.0/24",
            slots=slots,
        )

    def scrub(self) -> None:
        """Remove every trace: VMM processes, network, the disk store's mount, the directory."""
        run_root = self.state_dir / "run"
        if run_root.is_dir():
            leftovers.reap(run_root, run_root / "vms")
        with contextlib.suppress(Exception):
            reap(self.plan)
        disks = self.state_dir / "disks"
        backing = self.state_dir / "disks.xfs"
        if loopfs.is_mounted_from(disks, backing):
            loopfs.unmount(disks, backing)
        shutil.rmtree(self.state_dir, ignore_errors=True)


class Agent:
    """One ``wrenn-agent`` subprocess (ended by PID)."""

    def __init__(self, home: AgentHome, **settings: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.state_dir / f"agent-{self.port}.log"
        env = {
            **os.environ,
            "WRENN_AGENT_PORT": str(self.port),
            "WRENN_AGENT_STATE_DIR": str(home.state_dir),
            "WRENN_AGENT_BASE_IMAGE_DIR": str(home.image_dir),
            "WRENN_AGENT_NETWORK_PREFIX": home.prefix,
            "WRENN_AGENT_TRANSIT_POOL": home.transit_pool,
            "WRENN_AGENT_SANDBOX_POOL": home.sandbox_pool,
            "WRENN_AGENT_SLOTS": str(home.slots),
            **{f"WRENN_AGENT_{k.upper()}": v for k, v in settings.items()},
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wrenn.agent.main"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn-agent exited early:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 204:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"wrenn-agent never became ready:\n{self.logs()}")

    def client(self) -> HostAgentClient:
        return HostAgentClient(self.url, timeout_ms=RPC_TIMEOUT_MS)

    def forward_url(self, sandbox_id: str, port: int) -> str:
        return f"{self.url}/sandboxes/{sandbox_id}/port/{port}"

    def stop(self) -> None:
        """SIGTERM and wait: the agent stops its VMs and tears its slots down."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass(frozen=True)
class Leftovers:
    """What an agent has on the host, counted from the kernel and the file system."""

    namespaces: int
    host_links: int
    taps: int
    vmm_processes: int
    mounts: int
    loop_devices: int
    sandbox_disks: int
    run_dirs: int

    @classmethod
    def count(cls, home: AgentHome) -> Leftovers:
        plan = home.plan
        names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
        names = [n for n in names if plan.owns_name(n)]
        taps = 0
        for name in names:
            links = _ip("-n", name, "-o", "link", "show", check=False)
            taps += sum(1 for line in links.splitlines() if _ifname(line) == "tap0")
        host_links = sum(
            1 for line in _ip("-o", "link", "show").splitlines() if plan.owns_name(_ifname(line))
        )
        state = str(home.state_dir)
        mounts = sum(1 for line in Path("/proc/mounts").read_text().splitlines() if state in line)
        loops = subprocess.run(
            ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        run_root = home.state_dir / "run"
        sandboxes = home.state_dir / "disks" / "sandboxes"
        vms = run_root / "vms"
        return cls(
            namespaces=len(names),
            host_links=host_links,
            taps=taps,
            vmm_processes=len(leftovers.vmm_processes(run_root)) if run_root.is_dir() else 0,
            mounts=mounts,
            loop_devices=sum(1 for line in loops.splitlines() if state in line),
            sandbox_disks=len(list(sandboxes.glob("*.img"))) if sandboxes.is_dir() else 0,
            run_dirs=len(list(vms.iterdir())) if vms.is_dir() else 0,
        )


def _ip(*args: str, check: bool = True) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check).stdout


def _ifname(line: str) -> str:
    """The interface name in a line of ``ip -o link show`` (``2: name@peer: <...>``)."""
    parts = line.split(":", 2)
    return parts[1].strip().split("@")[0] if len(parts) > 2 else ""
