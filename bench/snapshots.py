"""Pause and resume with a working set: a sandbox of the base template (512 MiB guest) goes
through three kinds of cycles, in turn: paused idle and resumed at once; 100 MiB of fresh
random data written to /dev/shm, paused and resumed at once; the same, resumed once the pause's
build is stored. Beside them a raw QEMU restore of a pause build in the same run, and the page
server's fault rate on that much memory. Prints tables; asserts nothing. Needs root, QEMU and
the base image (built on first use).

    .venv/bin/python bench/snapshots.py [--runs 5] [--dirty-mib 100]

What each row measures (a real ``wrenn-agent`` process on a scratch state directory):
- pause: PauseSandbox from the RPC being sent until its answer (envd /snapshot/prepare, QEMU
  stop and migration of the device state, the state held and the memory file kept, the
  catalog, the VM stopped); its steps as the agent logs them (``sandbox.paused``).
- background store: what the agent does after the pause answered (``snapshot.stored``): the
  window a resume has to take the memory back before anything is written back, the extents
  the guest wrote (its memory file written back first), waiting for a resume under way, the
  memory diffed against the parent build, written, hashed and fsynced; "total" counts from
  the answer.
- resume of the stored build: ResumeSandbox once the background store is done (memory image,
  restore into a free slot, envd /health, /init), comparable with the raw restore.
- resume right after the pause answered: the same, sent at once. Before the background store
  has begun reading the memory image the resume takes it back (the store is called off: the
  VM maps the image itself, still cached); otherwise it clones the image once its extents are
  read, waiting for the write-back. Those pauses are never stored; the stored sizes come from
  the pauses resumed once stored and from an idle pause stored in each round.
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
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
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
    if not samples:
        return [name, 0, "-", "-", note]
    return [name, len(samples), ms(p50(samples)), ms(percentile(samples, 0.95)), note]


async def run_sh(sdk: AsyncSandbox, script: str) -> None:
    result = await sdk.commands.run(script, timeout=0)
    if result.exit_code != 0:
        raise RuntimeError(f"{script!r} failed: {result.stderr}")


@dataclass
class Cycles:
    """Pause and resume cycles of one kind: RPC times and builds."""

    pauses: list[float] = field(default_factory=list)
    resumes: list[float] = field(default_factory=list)
    builds: list[str] = field(default_factory=list)


async def bench_agent(
    image: GuestImage, runs: int, dirty_mib: int
) -> tuple[list[list[object]], list[list[object]], str]:
    home = AgentHome.make(image, index=7, slots=2)
    agent: Agent | None = None
    events: list[dict[str, Any]] = []
    idle, at_once, stored = Cycles(), Cycles(), Cycles()
    try:
        agent = await asyncio.to_thread(Agent, home, warm_base_template="true")
        client = agent.client()
        store = LocalSnapshotStore(home.state_dir / "snapshots")
        try:
            info = await client.get_host_info(pb.GetHostInfoRequest())
            runtime = info.runtime
            await client.create_sandbox(
                pb.CreateSandboxRequest(sandbox_id=SANDBOX, template_id="base")
            )
            url = agent.forward_url(SANDBOX, ENVD_PORT)
            dirty = f"head -c {dirty_mib}M /dev/urandom > /dev/shm/dirty"

            async def cycle(kind: Cycles, *, dirtied: bool, wait: bool) -> None:
                if dirtied:
                    sdk = await AsyncSandbox.create(debug=True, sandbox_url=url)
                    await run_sh(sdk, dirty)
                else:
                    await asyncio.sleep(1)
                t0 = time.perf_counter()
                paused = await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id=SANDBOX))
                kind.pauses.append(time.perf_counter() - t0)
                kind.builds.append(paused.build_id)
                if wait:
                    await wait_stored(store, uuid.UUID(paused.build_id))
                t0 = time.perf_counter()
                await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id=SANDBOX))
                kind.resumes.append(time.perf_counter() - t0)

            idle_stored = Cycles()
            for _ in range(runs):
                await cycle(idle, dirtied=False, wait=False)
                await cycle(at_once, dirtied=True, wait=False)
                await cycle(stored, dirtied=True, wait=True)
                # What an idle pause stores (one resumed at once is never stored).
                await cycle(idle_stored, dirtied=False, wait=True)

            # The last pause build, restored by QEMU alone while the sandbox stays paused.
            sdk = await AsyncSandbox.create(debug=True, sandbox_url=url)
            await run_sh(sdk, dirty)
            paused = await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id=SANDBOX))
            build_id = uuid.UUID(paused.build_id)
            await wait_stored(store, build_id)
            work = home.state_dir / "disks" / "bench"
            work.mkdir()
            disk = work / "raw.img"
            await reflink(home.state_dir / "disks" / "sandboxes" / f"{SANDBOX}.img", disk)
            snapshot = SnapshotFiles(
                memfile=work / "memfile", state=await store.file(build_id, "state")
            )
            await store.materialize(build_id, "memfile", snapshot.memfile)
            raw = RawGuests(image, work, runtime.removeprefix("qemu-"))
            restores = [await raw.run(disk, snapshot) for _ in range(runs)]
            shutil.rmtree(work, ignore_errors=True)
            idle_bytes = [await stored_bytes(store, b) for b in idle_stored.builds]
            dirty_bytes = [await stored_bytes(store, b) for b in stored.builds]
            await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=SANDBOX))
        finally:
            await client.close()
    finally:
        if agent is not None:
            await asyncio.to_thread(agent.stop)
            events = log_events(agent)
        await asyncio.to_thread(home.scrub)

    def logged(name: str, builds: list[str]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("event") == name and e.get("build_id") in builds]

    def background(builds: list[str]) -> list[float]:
        return [e["total_ms"] / 1000 for e in logged("snapshot.stored", builds)]

    dirty_builds = at_once.builds + stored.builds
    # A resume sent before its pause's store began reading the memory takes the memory back
    # and calls the store off: only the others are stored.
    taken = {e.get("build_id") for e in events if e.get("event") == "snapshot.store_taken_over"}
    ratio = p50(stored.resumes) / p50(restores)
    ratio_at_once = p50(at_once.resumes) / p50(restores)
    rows = [
        row("pause (RPC)", at_once.pauses + stored.pauses, f"{dirty_mib} MiB dirtied before each"),
        *steps_rows(logged("sandbox.paused", dirty_builds)),
        row("  background store, after the answer", background(dirty_builds)),
        *steps_rows(logged("snapshot.stored", dirty_builds), indent="    "),
        row("resume (RPC) of the stored build", stored.resumes, f"{ratio:.2f} x raw restore"),
        *steps_rows(logged("sandbox.resumed", stored.builds)),
        row(
            "resume (RPC) right after the pause answered",
            at_once.resumes,
            f"{ratio_at_once:.2f} x raw restore; "
            f"{sum(b in taken for b in at_once.builds)} of {len(at_once.builds)} took the memory "
            "back",
        ),
        *steps_rows(logged("sandbox.resumed", at_once.builds)),
        row("raw QEMU restore of the pause build → envd /health", restores),
        row("idle pause (RPC)", idle.pauses, "nothing dirtied since the resume"),
        *steps_rows(logged("sandbox.paused", idle.builds)),
        row("  background store, after the answer", background(idle.builds)),
        row("idle resume (RPC) right after the pause answered", idle.resumes),
        *steps_rows(logged("sandbox.resumed", idle.builds)),
    ]
    sizes: list[list[object]] = [
        ["memory diff stored per pause (p50)", f"{p50([b / MIB for b in dirty_bytes]):.1f} MiB"],
        [
            "memory diff stored per idle pause (p50)",
            f"{p50([b / MIB for b in idle_bytes]):.1f} MiB",
        ],
    ]
    return rows, sizes, runtime


def steps_rows(events: list[dict[str, Any]], indent: str = "  ") -> list[list[object]]:
    """p50 of each step logged in ``events`` (``steps_ms``), in the order they are logged."""
    samples: dict[str, list[float]] = {}
    for e in events:
        for step, value in e.get("steps_ms", {}).items():
            samples.setdefault(step, []).append(float(value))
    return [[f"{indent}{step}", len(v), f"{p50(v):.0f} ms", "", ""] for step, v in samples.items()]


async def wait_stored(store: LocalSnapshotStore, build_id: uuid.UUID) -> None:
    """Until the pause's background store has put the build in place."""
    deadline = time.monotonic() + 120
    while True:
        if build_id in await store.builds():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} was not stored within 120 s")
        await asyncio.sleep(0.05)


async def stored_bytes(store: LocalSnapshotStore, build: str) -> int:
    build_id = uuid.UUID(build)
    await wait_stored(store, build_id)
    return (await store.manifest(build_id)).devices["memfile"].stored_bytes


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
