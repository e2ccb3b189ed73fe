"""Pause and resume with a working set: a sandbox of the base template (512 MiB guest) writes
100 MiB of fresh random data to /dev/shm before every pause, beside a raw QEMU restore of the
same pause build in the same run, and the page server's fault rate on that much memory. Prints
tables; asserts nothing. Needs root, QEMU and the base image (built on first use).

    .venv/bin/python bench/snapshots.py [--runs 5] [--dirty-mib 100]

What each row measures (a real ``wrenn-agent`` process on a scratch state directory):
- pause: PauseSandbox from the RPC being sent until its answer (envd /snapshot/prepare, QEMU
  stop and migration of the device state, the memory diffed against the parent build and
  stored, the VM stopped); its steps as the agent logs them (``sandbox.paused``).
- resume: ResumeSandbox (memory image, restore into a free slot, envd /health, /init).
- raw QEMU restore: QemuVmm.restore of the last pause build (its memory materialised from the
  store, mapped private; its state; a reflink of the sandbox's disk) into a namespace of its
  own until envd answers /health — the floor under "resume".
- page server: ``bench/uffd.py``'s harness over as much memory as the guest dirtied (two
  layers, 1/8 zero pages), read once in full by one faulting thread, then with every page
  prefetched — what serving that working set by fault costs where Firecracker restores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2b import AsyncSandbox

from bench.report import machine, p50, percentile, table
from bench.runtime import RawGuests, log_events, reflink
from bench.uffd import serve_once
from bench.uffd import snapshot as uffd_snapshot
from tests.integration.agent.agent_harness import Agent, AgentHome
from wrenn import log
from wrenn.agent.images import GuestImage, build_base
from wrenn.agent.snapshots import LocalSnapshotStore
from wrenn.agent.vmm.base import SnapshotFiles
from wrenn.gen.hostagent import hostagent_pb as pb

ENVD_PORT = 49983
SANDBOX = "bench-snap"
MIB = 1 << 20


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def row(name: str, samples: list[float], note: str = "") -> list[object]:
    return [name, len(samples), ms(p50(samples)), ms(percentile(samples, 0.95)), note]


def steps_table(events: list[dict[str, Any]], event: str) -> list[list[object]]:
    """p50 of each step the agent logged for ``event``, in the order it logs them."""
    samples: dict[str, list[float]] = {}
    for e in events:
        if e.get("event") == event and e.get("sandbox_id") == SANDBOX:
            for step, value in e.get("steps_ms", {}).items():
                samples.setdefault(step, []).append(float(value))
    return [[f"  {step}", len(v), f"{p50(v):.0f} ms", ""] for step, v in samples.items()]


async def run_sh(sdk: AsyncSandbox, script: str) -> None:
    result = await sdk.commands.run(script, timeout=0)
    if result.exit_code != 0:
        raise RuntimeError(f"{script!r} failed: {result.stderr}")


async def bench_agent(
    image: GuestImage, runs: int, dirty_mib: int
) -> tuple[list[list[object]], list[list[object]], str]:
    home = AgentHome.make(image, index=7, slots=2)
    agent: Agent | None = None
    events: list[dict[str, Any]] = []
    try:
        agent = await asyncio.to_thread(Agent, home, warm_base_template="true")
        client = agent.client()
        try:
            info = await client.get_host_info(pb.GetHostInfoRequest())
            runtime = info.runtime
            await client.create_sandbox(
                pb.CreateSandboxRequest(sandbox_id=SANDBOX, template_id="base")
            )
            url = agent.forward_url(SANDBOX, ENVD_PORT)
            pauses, resumes, stored = [], [], []
            dirty = f"head -c {dirty_mib}M /dev/urandom > /dev/shm/dirty"
            build_id = ""
            for i in range(runs):
                sdk = await AsyncSandbox.create(debug=True, sandbox_url=url)
                await run_sh(sdk, dirty)
                t0 = time.perf_counter()
                paused = await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id=SANDBOX))
                pauses.append(time.perf_counter() - t0)
                build_id = paused.build_id
                stored.append(build_bytes(home, build_id))
                if i < runs - 1:
                    t0 = time.perf_counter()
                    await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id=SANDBOX))
                    resumes.append(time.perf_counter() - t0)

            # The last pause build, restored by QEMU alone while the sandbox stays paused.
            work = home.state_dir / "disks" / "bench"
            work.mkdir()
            disk = work / "raw.img"
            await reflink(home.state_dir / "disks" / "sandboxes" / f"{SANDBOX}.img", disk)
            store = LocalSnapshotStore(home.state_dir / "snapshots")
            snapshot = SnapshotFiles(
                memfile=work / "memfile",
                state=await store.file(uuid.UUID(build_id), "state"),
            )
            await store.materialize(uuid.UUID(build_id), "memfile", snapshot.memfile)
            raw = RawGuests(image, work, runtime.removeprefix("qemu-"))
            restores = [await raw.run(disk, snapshot) for _ in range(runs)]
            shutil.rmtree(work, ignore_errors=True)

            t0 = time.perf_counter()
            await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id=SANDBOX))
            resumes.append(time.perf_counter() - t0)
            await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=SANDBOX))
        finally:
            await client.close()
    finally:
        if agent is not None:
            await asyncio.to_thread(agent.stop)
            events = log_events(agent)
        await asyncio.to_thread(home.scrub)

    ratio = p50(resumes) / p50(restores)
    rows = [
        row("pause (RPC)", pauses, f"{dirty_mib} MiB dirtied before each"),
        *[[*r, ""] for r in steps_table(events, "sandbox.paused")],
        row("resume (RPC)", resumes, f"{ratio:.2f} x raw restore (p50)"),
        *[[*r, ""] for r in steps_table(events, "sandbox.resumed")],
        row("raw QEMU restore of the pause build → envd /health", restores),
    ]
    memfile = [b.get("memfile", 0) / MIB for b in stored]
    state = [b.get("state", 0) / MIB for b in stored]
    sizes: list[list[object]] = [
        ["memory diff stored per pause (p50)", f"{p50(memfile):.1f} MiB"],
        ["VM state per pause (p50)", f"{p50(state):.2f} MiB"],
    ]
    return rows, sizes, runtime


def build_bytes(home: AgentHome, build_id: str) -> dict[str, int]:
    manifest = json.loads((home.state_dir / "snapshots" / build_id / "manifest.json").read_text())
    return {name: int(f["size_bytes"]) for name, f in manifest["files"].items()}


async def bench_uffd(dirty_mib: int) -> list[list[object]]:
    size = dirty_mib * MIB
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="wrenn-bench-") as tmp:
        root = Path(tmp)
        store, builds, _ = await uffd_snapshot(root, size)
        reader = await store.open_device(builds[-1], "memfile")
        try:
            sock = root / "uffd.sock"
            out = await serve_once(sock, reader, size, threads=1)
            s, elapsed = out["stats"], out["result"]["elapsed_s"]
            rows.append(
                [
                    "by fault, 1 thread",
                    s.faults,
                    f"{s.faults / elapsed:,.0f}",
                    f"{dirty_mib / elapsed:,.0f}",
                    f"{elapsed:.2f} s",
                ]
            )
            out = await serve_once(sock, reader, size, threads=1, prefetch=out["touched"])
            s, elapsed = out["stats"], out["result"]["elapsed_s"]
            rows.append(
                [
                    "prefetched, then read",
                    s.faults,
                    "-",
                    f"{dirty_mib / elapsed:,.0f}",
                    f"{elapsed:.2f} s (prefetch {s.prefetch_s:.2f} s)",
                ]
            )
        finally:
            reader.close()
    return rows


async def bench(image: GuestImage, runs: int, dirty_mib: int) -> None:
    agent_rows, sizes, runtime = await bench_agent(image, runs, dirty_mib)
    uffd_rows = await bench_uffd(dirty_mib)
    print(f"machine: {machine()}")
    print(f"runtime: {runtime}")
    print(
        table(
            f"pause and resume, 512 MiB guest, {dirty_mib} MiB dirty",
            ["", "n", "p50", "p95", "note"],
            agent_rows,
        )
    )
    print()
    print(table("stored", ["", "value"], sizes))
    print()
    print(
        table(
            f"page server over {dirty_mib} MiB (bench/uffd.py harness)",
            ["", "faults", "faults/s", "MiB/s", "time"],
            uffd_rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dirty-mib", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/snapshots.py needs root (namespaces, taps, loop mounts)")
    log.configure("warning")
    state_dir = Path(os.environ.get("WRENN_TEST_STATE_DIR", "/var/lib/wrenn"))
    image = build_base(state_dir)
    asyncio.run(bench(image, args.runs, args.dirty_mib))


if __name__ == "__main__":
    main()
