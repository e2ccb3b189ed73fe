"""The host agent with real guests: cold boot, create from a template snapshot, pause and resume,
and the memory an idle sandbox holds. Prints a table; asserts nothing. Needs root, QEMU and the
base image (built on first use, as the tests do).

    .venv/bin/python bench/runtime.py [--runs 20]

What each row measures (a real ``wrenn-agent`` process on a scratch state directory):
- cold boot → envd ready: QEMU boots the base image until envd answers /health (the agent
  does this only to build a template snapshot); raw QemuVmm, no agent.
- create (restore → /init answered): CreateSandbox from the base template, from the RPC
  being sent until its answer (slot, CoW disk, restore, envd /health, /init).
- raw QEMU restore of the same snapshot: QemuVmm.restore of the template's memory file and
  state into a namespace with a tap, until envd answers /health — the floor under "create".
- pause / resume: PauseSandbox (prepare, snapshot, memory diff stored, VM freed) and
  ResumeSandbox (materialise, restore, /init).
- /files upload / download: 100 MB (10^6 bytes) into and out of a guest's envd through the
  agent's forwarding path (``/sandboxes/{id}/port/49983/files``), as the proxy reaches it:
  octet-stream uploads from a file object (with its Content-Length, as the SDK's files.write
  sends a binary file: envd splices it into the file) and from a generator (chunked: envd
  streams it), then the download read to the end, with a streaming httpx client; MB/s per
  transfer. The guest's vCPU (TCG) is what bounds both.
- RSS per idle sandbox: resident memory of a sandbox's QEMU process, 5 s after its creation
  (with its PSS, and the page cache its memory image holds, which RSS does not count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, p50, percentile, table
from tests.integration.agent.agent_harness import Agent, AgentHome
from tests.integration.agent.conftest import ENVD_READY_TIMEOUT_S, TestNetns
from wrenn import log
from wrenn.agent import leftovers
from wrenn.agent.images import GuestImage, build_base
from wrenn.agent.network import kernel_ip_arg
from wrenn.agent.vmm.base import SnapshotFiles, VmConfig
from wrenn.agent.vmm.qemu import QemuVmm
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

COLD_BOOTS = 2
IDLE_SANDBOXES = 3
TRANSFER_BYTES = 100 * 10**6
UPLOAD_SIZED = "upload 100 MB, Content-Length (a file object)"
UPLOAD_CHUNKED = "upload 100 MB, chunked (a generator)"
DOWNLOAD = "download 100 MB"
TRANSFERS = 5


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def row(name: str, samples: list[float], note: str = "") -> list[object]:
    return [name, len(samples), ms(p50(samples)), ms(percentile(samples, 0.95)), note]


async def create(client: HostAgentClient, sandbox_id: str) -> float:
    t0 = time.perf_counter()
    await client.create_sandbox(pb.CreateSandboxRequest(sandbox_id=sandbox_id, template_id="base"))
    return time.perf_counter() - t0


async def destroy(client: HostAgentClient, sandbox_id: str) -> None:
    await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=sandbox_id))


class RawGuests:
    """QEMU guests without the agent, in namespaces of their own (TestNetns) on a disk reflinked
    beside the agent's disks."""

    def __init__(self, image: GuestImage, work: Path, accel: str) -> None:
        self.image = image
        self.work = work
        self.accel = accel
        self._n = 0

    async def run(self, disk: Path, snapshot: SnapshotFiles | None) -> float:
        """Seconds from boot()/restore() until envd answers /health."""
        self._n += 1
        ns = TestNetns(self.work)
        vm = QemuVmm(
            VmConfig(
                vm_id=f"raw{self._n}",
                vcpus=1,
                memory_mib=512,
                kernel=self.image.kernel,
                initrd=self.image.initrd,
                rootfs=disk,
                run_dir=self.work / f"raw{self._n}",
                kernel_args=f"{self.image.kernel_args()} {kernel_ip_arg()}",
                network=ns.attachment,
            ),
            accel="kvm" if self.accel == "kvm" else "tcg",
        )
        envd = ns.envd()
        try:
            t0 = time.perf_counter()
            if snapshot is None:
                await vm.boot()
            else:
                await vm.restore(snapshot)
            await vm.wait_until(envd.healthy, timeout_s=ENVD_READY_TIMEOUT_S, what="envd")
            return time.perf_counter() - t0
        finally:
            await envd.aclose()
            await vm.stop()
            ns.close()
            shutil.rmtree(vm.config.run_dir, ignore_errors=True)


async def reflink(src: Path, dest: Path) -> None:
    proc = await asyncio.create_subprocess_exec("cp", "--reflink=always", str(src), str(dest))
    if await proc.wait() != 0:
        raise RuntimeError(f"cannot reflink {src}")


async def build_bytes(home: AgentHome, build_id: str) -> dict[str, int]:
    """Bytes of each file a build stores (from its manifest, written once the pause's
    background store has finished)."""
    path = home.state_dir / "snapshots" / build_id / "manifest.json"
    for _ in range(1200):
        if path.exists():
            break
        await asyncio.sleep(0.05)
    manifest = json.loads(path.read_text())
    return {name: int(f["size_bytes"]) for name, f in manifest["files"].items()}


def log_events(agent: Agent) -> list[dict[str, Any]]:
    events = []
    for line in agent.logs().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def transfers(url: str, *, runs: int) -> dict[str, list[float]]:
    """MB/s of ``runs`` rounds of 100 MB: an upload from a file object (Content-Length), one
    from a generator (chunked), and a download."""
    block = os.urandom(1 << 20)

    def body() -> Any:
        for start in range(0, TRANSFER_BYTES, len(block)):
            yield block[: min(len(block), TRANSFER_BYTES - start)]

    params = {"path": "/tmp/bench-blob", "username": "root"}
    octets = {"Content-Type": "application/octet-stream"}
    rates: dict[str, list[float]] = {UPLOAD_SIZED: [], UPLOAD_CHUNKED: [], DOWNLOAD: []}
    with tempfile.TemporaryFile() as source, httpx.Client(base_url=url, timeout=600) as http:
        for piece in body():
            source.write(piece)
        for _ in range(runs):
            for name, content in ((UPLOAD_SIZED, source), (UPLOAD_CHUNKED, body())):
                source.seek(0)
                t0 = time.perf_counter()
                http.post(
                    "/files", params=params, content=content, headers=octets
                ).raise_for_status()
                rates[name].append(TRANSFER_BYTES / 10**6 / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            got = 0
            with http.stream("GET", "/files", params=params) as stream:
                stream.raise_for_status()
                for chunk in stream.iter_raw(1 << 20):
                    got += len(chunk)
            assert got == TRANSFER_BYTES, got
            rates[DOWNLOAD].append(got / 10**6 / (time.perf_counter() - t0))
    return rates


def vmm_memory(home: AgentHome) -> list[tuple[int, int]]:
    """(RSS, PSS) of every sandbox's VMM process."""
    out = []
    for pid in leftovers.vmm_processes(home.state_dir / "run"):
        with contextlib.suppress(psutil.NoSuchProcess):
            full = psutil.Process(pid).memory_full_info()
            out.append((full.rss, full.pss))
    return out


def cached_bytes(paths: list[Path]) -> list[int]:
    """Bytes of each file in the page cache (util-linux ``fincore``)."""
    out = []
    for path in paths:
        done = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        with contextlib.suppress(ValueError):
            out.append(int(done.stdout.strip()))
    return out


async def bench(image: GuestImage, runs: int) -> None:
    home = AgentHome.make(image, index=9, slots=IDLE_SANDBOXES + 1)
    agent: Agent | None = None
    rows: list[list[object]] = []
    try:
        agent = await asyncio.to_thread(Agent, home, warm_base_template="true")
        client = agent.client()
        try:
            await create(client, "warm")  # waits for the base template
            await destroy(client, "warm")
            info = await client.get_host_info(pb.GetHostInfoRequest())
            template = info.templates[0]
            built = [e for e in log_events(agent) if e.get("event") == "template.built"]
            print(f"runtime: {info.runtime} ({info.runtime_reason})")

            creates = []
            for i in range(runs):
                creates.append(await create(client, f"c{i}"))
                await destroy(client, f"c{i}")

            pauses, resumes = [], []
            build_sizes: list[dict[str, int]] = []
            await create(client, "p")
            for _ in range(max(3, runs // 4)):
                t0 = time.perf_counter()
                paused = await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id="p"))
                pauses.append(time.perf_counter() - t0)
                build_sizes.append(await build_bytes(home, paused.build_id))
                t0 = time.perf_counter()
                await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id="p"))
                resumes.append(time.perf_counter() - t0)
            await destroy(client, "p")

            await create(client, "files")
            moved = await asyncio.to_thread(
                transfers, agent.forward_url("files", 49983), runs=TRANSFERS
            )
            await destroy(client, "files")

            idle = [f"idle{i}" for i in range(IDLE_SANDBOXES)]
            for sandbox_id in idle:
                await create(client, sandbox_id)
            await asyncio.sleep(5)
            vmm_mem = vmm_memory(home)
            rss = [r for r, _ in vmm_mem]
            pss = [p for _, p in vmm_mem]
            images = sorted((home.state_dir / "disks" / "sandboxes").glob("*.mem.img"))
            cached = cached_bytes(images)
            reported = [
                (await client.get_sandbox_metrics(pb.GetSandboxMetricsRequest(sandbox_id=s)))
                for s in idle
            ]
            for sandbox_id in idle:
                await destroy(client, sandbox_id)
            agent_rss = psutil.Process(agent.proc.pid).memory_info().rss

            # The same snapshot restored by QEMU alone; the disk is a reflink beside the agent's.
            work = home.state_dir / "disks" / "bench"
            work.mkdir()
            disk = work / "raw.img"
            template_disk = home.state_dir / "disks" / "templates" / f"{template.build_id}.img"
            await reflink(template_disk, disk)
            snapshot = SnapshotFiles(
                memfile=home.state_dir / "disks" / "templates" / f"mem-{template.build_id}.img",
                state=home.state_dir / "snapshots" / template.build_id / "state",
            )
            raw = RawGuests(image, work, info.runtime.removeprefix("qemu-"))
            restores = [await raw.run(disk, snapshot) for _ in range(runs)]
            boots = []
            for _ in range(COLD_BOOTS):
                await reflink(template_disk, disk)
                boots.append(await raw.run(disk, None))
            shutil.rmtree(work, ignore_errors=True)
        finally:
            await client.close()
    finally:
        if agent is not None:
            await asyncio.to_thread(agent.stop)
        await asyncio.to_thread(home.scrub)

    ratio = p50(creates) / p50(restores)
    rows += [
        row("cold boot → envd ready (raw QEMU)", boots),
        row("create: restore → /init answered", creates, f"{ratio:.1f} x raw restore (p50)"),
        row("raw QEMU restore → envd /health", restores),
        row("pause (snapshot, diff stored, VM freed)", pauses),
        row("resume (restore → /init answered)", resumes),
    ]
    transfer_rows = [
        [name, len(rates), f"{p50(rates):.0f}", f"{min(rates):.0f}", f"{max(rates):.0f}"]
        for name, rates in moved.items()
    ]
    print(f"machine: {machine()}")
    print(table("host agent", ["", "n", "p50", "p95", "note"], rows))
    print()
    print(
        table(
            "/files through the agent's forwarding path (MB/s)",
            ["", "n", "p50", "min", "max"],
            transfer_rows,
        )
    )
    mib = 1 << 20
    per_sandbox = sum(rss) / max(len(rss), 1) / mib
    metric = sum(m.metrics.vmm_rss_bytes for m in reported if m.metrics) / len(reported) / mib
    print()
    print(
        table(
            "memory",
            ["", "value"],
            [
                ["guest memory per sandbox", f"{template.memory_mib} MiB"],
                [f"QEMU RSS per idle sandbox ({len(rss)} running)", f"{per_sandbox:.0f} MiB"],
                ["same, as GetSandboxMetrics reports it", f"{metric:.0f} MiB"],
                [
                    "QEMU PSS per idle sandbox (shared pages split between them)",
                    f"{sum(pss) / max(len(pss), 1) / mib:.0f} MiB",
                ],
                [
                    "page cache of each sandbox's memory image (not in RSS)",
                    f"{sum(cached) / max(len(cached), 1) / mib:.0f} MiB",
                ],
                ["agent RSS", f"{agent_rss / mib:.0f} MiB"],
                [
                    "pause build on disk: memory diff + VM state (p50)",
                    f"{p50([b.get('memfile', 0) for b in build_sizes]) / mib:.1f} MiB + "
                    f"{p50([b.get('state', 0) for b in build_sizes]) / mib:.2f} MiB",
                ],
            ],
        )
    )
    for event in built:
        print(
            f"\ntemplate build, from the agent's log: boot {event['boot_s']} s, "
            f"boot + snapshot + store {event['total_s']} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/runtime.py needs root (namespaces, taps, loop mounts)")
    log.configure("warning")
    state_dir = Path(os.environ.get("WRENN_TEST_STATE_DIR", "/var/lib/wrenn"))
    image = build_base(state_dir)
    asyncio.run(bench(image, args.runs))


if __name__ == "__main__":
    main()
