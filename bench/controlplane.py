"""Control plane figures: GET /v2/sandboxes throughput with 1,000 sandboxes on SQLite and
PostgreSQL, and what the sandbox proxy costs on a 100 MB download and upload compared with
talking to envd directly, with envd as a local process and in a real guest. Prints tables;
asserts nothing.

    .venv/bin/python bench/controlplane.py [list] [proxy] [guest]

What each row measures:
- list: requests per second of GET /v2/sandboxes (one team owning 1,000 sandboxes, each with
  two metadata entries) over 16 concurrent HTTP/1.1 keep-alive connections, each asking again
  as soon as its answer is complete: as the e2b SDK's ``Sandbox.list()`` asks (no query
  parameters at all: its paginator leaves ``limit`` unset, so the server's default page of 100
  applies), with limit=100 spelled out, and the largest page (limit=1000). Best of three
  rounds of 3 s, interleaved; beside the rate, the control plane's CPU time per request (all
  its threads, least of the rounds: what a request costs whatever else ran meanwhile) and the
  measuring client's, which shows it is not what bounds the rate (a lean client on uvloop and
  httptools: an httpx client spends more CPU per request than the server). The server runs on
  uvloop with its start-up heap frozen, as ``wrenn-cp`` does.
- download / upload: 100 MB (10^6 bytes) through envd's GET / POST /files with a streaming
  client (the upload chunked, as a generator body is): straight to envd; through the host
  agent's forwarding path (the agent's own ``Forwarder`` on its fast path, in front of envd
  instead of a VM: the same hop a real agent adds); and through the proxy port in front of it
  (E2b-Sandbox-Id routing), as ``wrenn-cp`` serves it. Twenty rounds, each measuring every path
  back to back (in the other order every other round). The ratio is direct throughput over
  proxied throughput (1.0: no cost), of the best of each and, steadier on a shared machine,
  the median of the rounds' own ratios (a slow spell slows both sides of a round's ratio).
  CPU seconds (user + system) of each process per transfer, the least of the rounds: what
  each hop costs whatever else competed for the cores meanwhile ("proxy" is the whole
  control plane process); and the whole machine's busy CPU ("machine"), where kernel work no
  process is charged for shows: the workqueue that sends a body the relays redirect in the
  kernel (4 MiB and more). envd
  sends a download with sendfile(2), so a client on the same machine copies it out of the
  page cache (cold), where the hops before it hand it over cache-hot: on one machine the
  direct download is the slower for it (the client spends more CPU per byte).
- guest (root and QEMU): the same through ``wrenn up`` (control plane, real host agent, a
  QEMU guest from the base image): straight to the guest's envd at the address its host
  dials (the sandbox's slot address), through the agent's forwarding path (one relay), and
  through the proxy port as the SDK goes: the control plane runs beside the agent there, so
  its proxy dials the guest itself (one relay too; ``WRENN_CP_PROXY_DIAL_GUESTS=false`` in the
  environment measures it through the agent, two). Three uploads per path (the guest's vCPU
  bounds them), then forty rounds of downloads. CPU seconds as above, "vm" being the
  sandbox's QEMU process. A relay moves a guest's long bodies in batches (spliced by the
  relay, charged to its process), not by a kernel redirect: the guest is not on this host.

The control plane, the forwarding double and envd each run in a process of their own, and the
measuring client in another, as they would on real machines (here they share its cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import httptools
import httpx
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, table

SANDBOXES = 1000
CLIENTS = 16
LIST_SECONDS = 3.0
#: Rounds of each listing, interleaved; the best rate and the least CPU count.
LIST_ROUNDS = 3
SIZE = 100 * 10**6
CHUNK = 1 << 20
#: The background workers at their default pace (the test stack polls much faster).
PRODUCTION_PACE = {"lifecycle_interval_s": 1.0, "webhook_poll_s": 1.0}
#: Transfers per path; the best counts (the machine is shared: fewer let noise decide).
ROUNDS = 20
#: Rounds against a real guest: uploads are slow (the guest's vCPU bounds them), downloads
#: quick and noisier.
GUEST_UPLOADS = 3
GUEST_DOWNLOADS = 40
GUEST_FILE = "/tmp/bench-blob"
#: The address pools' slot index of the guest part (the e2e tests use 5, the other benches 7 and 9).
GUEST_POOL_INDEX = 8


# --- the child: a control plane to measure ----------------------------------------------


async def _seed(stack: Any, team_id: str) -> None:
    from wrenn.controlplane import ids
    from wrenn.controlplane.db.records import Sandbox, SandboxState

    host_id = stack.hosts[0].host_id
    now = datetime.now(UTC)
    async with stack.cp.db.transaction() as tx:
        for i in range(SANDBOXES):
            at = now - timedelta(seconds=i)
            await tx.sandboxes.insert(
                Sandbox(
                    id=ids.sandbox_id(),
                    team_id=team_id,
                    host_id=host_id,
                    template_id="base",
                    alias=None,
                    snapshot_id=None,
                    state=SandboxState.RUNNING if i % 4 else SandboxState.PAUSED,
                    vcpus=2,
                    memory_mib=512,
                    disk_mib=1024,
                    envd_version="0.6.4",
                    envd_access_token=ids.envd_access_token(),
                    allow_internet_access=True,
                    auto_pause=False,
                    auto_resume=False,
                    build_id=None,
                    started_at=at,
                    end_at=at + timedelta(hours=1),
                    created_at=at,
                    metadata={"suite": "bench", "n": str(i)},
                )
            )


def child(mode: str, arg: str) -> None:
    from tests.controlplane.conftest import LoopThread, PostgresServer, Served, Stack
    from tests.controlplane.fake_agent import FakeHostAgent
    from tests.controlplane.forward_double import ForwardingHost
    from wrenn import log
    from wrenn.envd.config import ENVD_VERSION

    log.configure("warning")
    # The loops the stack makes are uvloop's, as in wrenn-cp (which runs under uvloop.run).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    cleanup: list[Any] = []
    try:
        if mode == "list":
            if arg == "postgresql":
                pg = PostgresServer()
                cleanup.append(pg.stop)
                _, url = pg.create_database()
            else:
                tmp = tempfile.TemporaryDirectory(prefix="wrenn-bench-")
                cleanup.append(tmp.cleanup)
                url = f"sqlite+aiosqlite:///{tmp.name}/cp.db"
            stack = Stack(url, **PRODUCTION_PACE)
            cleanup.insert(0, stack.close)
            stack.add_host()
            team_id, key = stack.new_team("bench")
            stack.run(_seed(stack, team_id), timeout_s=600)
            from wrenn.controlplane.app import settle_heap

            settle_heap()  # as wrenn-cp does once its app is built
            out = {"api": stack.url, "key": key}
        elif mode == "agent":
            from wrenn.core import http1

            http1.redirect_in_kernel(True)  # as wrenn-agent does by default
            loop = LoopThread()
            cleanup.append(loop.close)
            served = Served(loop, ForwardingHost(FakeHostAgent(envd_version=ENVD_VERSION), arg))
            cleanup.insert(0, served.stop)
            out = {"agent": served.url}
        else:
            tmp = tempfile.TemporaryDirectory(prefix="wrenn-bench-")
            cleanup.append(tmp.cleanup)
            stack = Stack(
                f"sqlite+aiosqlite:///{tmp.name}/cp.db", proxy_cache_s=1.0, **PRODUCTION_PACE
            )
            cleanup.insert(0, stack.close)
            token = stack.admin.post("/v1/hosts/tokens").json()["token"]
            reg = stack.admin.post("/v1/hosts/register", json={"token": token, "address": arg})
            host_id, secret = reg.json()["hostID"], reg.json()["hostSecret"]
            stack.admin.post(
                f"/v1/hosts/{host_id}/heartbeat",
                json=FakeHostAgent(envd_version=ENVD_VERSION).heartbeat_body(),
                headers={"Authorization": f"Bearer {secret}"},
            ).raise_for_status()
            sandbox = stack.admin.post("/v2/sandboxes", json={"templateID": "base"}).json()
            out = {
                "proxy": stack.serve_proxy(),
                "sandbox": sandbox["sandboxID"],
                "token": sandbox["envdAccessToken"],
            }
        print(json.dumps(out), flush=True)
        sys.stdin.read()  # until the parent is done
    finally:
        for step in cleanup:
            step()


class Child:
    def __init__(self, mode: str, arg: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", mode, arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench child {mode} {arg} failed")
        self.info: dict[str, str] = json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the measurements -------------------------------------------------------------------


class _KeepAlive(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection that sends the same request again as soon as the
    answer to the last one is complete, until ``stop_at``."""

    def __init__(self, request: bytes, stop_at: float, done: asyncio.Future[None]) -> None:
        self.request = request
        self.stop_at = stop_at
        self.done = done
        self.answers = 0
        self.failed: int | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:  # httptools' callback
        assert self.transport is not None
        self.answers += 1
        if self.parser.get_status_code() != 200:
            self.failed = self.parser.get_status_code()
        if self.failed is not None or time.perf_counter() >= self.stop_at:
            self.transport.close()
        else:
            self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def list_rate(api: str, key: str, query: str) -> float:
    """Answers per second over ``CLIENTS`` keep-alive connections for ``LIST_SECONDS``."""
    url = httpx.URL(api)
    request = (
        f"GET /v2/sandboxes{query} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"X-API-Key: {key}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    stop_at = time.perf_counter() + LIST_SECONDS
    start = time.perf_counter()
    conns = [_KeepAlive(request, stop_at, loop.create_future()) for _ in range(CLIENTS)]
    for conn in conns:
        await loop.create_connection(partial(_same, conn), url.host, url.port or 80)
    await asyncio.gather(*(c.done for c in conns))
    elapsed = time.perf_counter() - start
    failed = [c.failed for c in conns if c.failed is not None]
    if failed:
        raise RuntimeError(f"GET /v2/sandboxes{query} answered {failed[0]}")
    return sum(c.answers for c in conns) / elapsed


def _same(conn: _KeepAlive) -> _KeepAlive:
    return conn


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


#: The whole machine's busy CPU (every process, kernel threads, interrupts) in a meter's
#: samples: kernel work no process is charged for (a redirect's workqueue) shows there.
MACHINE = "machine"


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


class CpuMeter:
    """CPU seconds (user + system, all threads) each measured process spends, and the
    machine's."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def sample(self) -> dict[str, float]:
        out = {name: sum(proc.cpu_times()[:2]) for name, proc in self.procs.items()}
        out[MACHINE] = _machine_busy_s()
        return out

    def since(self, before: dict[str, float]) -> dict[str, float]:
        now = self.sample()
        return {name: now[name] - before[name] for name in now}


@dataclass
class Moved:
    """One 100 MB transfer: MB/s and CPU seconds per process."""

    mb_s: float
    cpu_s: dict[str, float]


#: Per path, per direction ("upload", "download"): the rounds' transfers.
Runs = dict[str, dict[str, list[Moved]]]


def _blocks() -> Any:
    block = os.urandom(CHUNK)
    sent = 0
    while sent < SIZE:
        piece = block[: min(CHUNK, SIZE - sent)]
        sent += len(piece)
        yield piece


def upload(client: httpx.Client, path: str, meter: CpuMeter) -> Moved:
    """One 100 MB upload (chunked, as a generator body is)."""
    before = meter.sample()
    start = time.perf_counter()
    resp = client.post(
        "/files",
        params={"path": path},
        content=_blocks(),
        headers={"Content-Type": "application/octet-stream"},
    )
    resp.raise_for_status()
    return Moved(SIZE / 10**6 / (time.perf_counter() - start), meter.since(before))


def download(client: httpx.Client, path: str, meter: CpuMeter) -> Moved:
    """One 100 MB download, read to the end."""
    before = meter.sample()
    start = time.perf_counter()
    got = 0
    with client.stream("GET", "/files", params={"path": path}) as stream:
        stream.raise_for_status()
        for chunk in stream.iter_raw(CHUNK):
            got += len(chunk)
    mb_s = got / 10**6 / (time.perf_counter() - start)
    assert got == SIZE, got
    return Moved(mb_s, meter.since(before))


T = TypeVar("T")


def _in_turn(paths: list[T], round_: int) -> list[T]:
    """The paths in their order in even rounds, the other way round in odd ones: whatever
    going first or last in a round does (a warm cache, a quiet spell) falls on each alike."""
    return paths if round_ % 2 == 0 else paths[::-1]


def record(runs: Runs, name: str, direction: str, moved: Moved) -> None:
    runs.setdefault(name, {}).setdefault(direction, []).append(moved)


def bench_list() -> None:
    rows: list[list[object]] = []
    pages = {"SDK default": "", "limit=100": "?limit=100", "limit=1000": "?limit=1000"}
    client = psutil.Process()
    for backend in ("sqlite", "postgresql"):
        c = Child("list", backend)
        try:
            server = psutil.Process(c.proc.pid)
            api, key = c.info["api"], c.info["key"]
            items = {
                page: len(httpx.get(f"{api}/v2/sandboxes{q}", headers={"X-API-Key": key}).json())
                for page, q in pages.items()
            }
            runs: dict[str, list[tuple[float, float, float]]] = {page: [] for page in pages}
            for _ in range(LIST_ROUNDS):  # interleaved: the machine is shared
                for page, q in pages.items():
                    before = _cpu_s(server), _cpu_s(client)
                    rate = uvloop.run(list_rate(api, key, q))
                    answers = rate * LIST_SECONDS
                    runs[page].append(
                        (
                            rate,
                            (_cpu_s(server) - before[0]) / answers * 1000,
                            (_cpu_s(client) - before[1]) / answers * 1000,
                        )
                    )
            for page, r in runs.items():
                rows.append(
                    [
                        backend,
                        page,
                        items[page],
                        f"{max(x[0] for x in r):,.0f}",
                        f"{min(x[1] for x in r):.2f}",
                        f"{min(x[2] for x in r):.2f}",
                    ]
                )
        finally:
            c.close()
    print()
    print(
        table(
            f"GET /v2/sandboxes, {SANDBOXES:,} sandboxes, {CLIENTS} connections",
            ["database", "page", "items", "req/s", "server ms/req", "client ms/req"],
            rows,
        )
    )


def _throughput_table(runs: Runs) -> str:
    """Best MB/s of each path and its ratio to the best direct one; beside it the median of
    the rounds' own ratios (each round measures every path back to back, so what slows the
    shared machine for a few seconds slows both sides of a round's ratio)."""
    direct = next(iter(runs.values()))
    rows = []
    for name, directions in runs.items():
        row: list[object] = [name]
        for direction in ("upload", "download"):
            ts, ds = directions[direction], direct[direction]
            best, best_direct = max(t.mb_s for t in ts), max(d.mb_s for d in ds)
            paired = statistics.median(d.mb_s / t.mb_s for d, t in zip(ds, ts, strict=True))
            row += [f"{best:,.0f}", f"{best_direct / best:.2f}", f"{paired:.2f}"]
        rows.append(row)
    rounds = {direction: len(ts) for direction, ts in direct.items()}
    return table(
        f"100 MB through /files, {rounds['upload']} uploads and {rounds['download']} downloads"
        " per path (MB/s: best of each; ratio = direct / this, of the bests and the median of"
        " each round's own)",
        ["path", "upload", "ratio", "median", "download", "ratio", "median"],
        rows,
    )


def _cpu_table(runs: Runs, procs: list[str]) -> str:
    """Least CPU seconds per process over the rounds: the cost of a hop, whatever else
    competed for the cores meanwhile."""
    rows: list[list[object]] = []
    for name, directions in runs.items():
        for direction in ("upload", "download"):
            used = [m.cpu_s for m in directions[direction]]
            least = {proc: min(u[proc] for u in used) for proc in procs}
            total = min(sum(u[proc] for proc in procs) for u in used)
            machine = min(u[MACHINE] for u in used)
            rows.append(
                [
                    name,
                    direction,
                    *(f"{least[proc]:.2f}" for proc in procs),
                    f"{total:.2f}",
                    f"{machine:.2f}",
                ]
            )
    return table(
        "CPU seconds per 100 MB (user + system, least of the rounds; machine: all of its"
        " busy CPU, kernel threads and interrupts included)",
        ["path", "direction", *procs, "total", MACHINE],
        rows,
    )


def bench_proxy() -> None:
    from tests.conftest import EnvdProcess

    envd = EnvdProcess()
    workdir = tempfile.mkdtemp(prefix="wrenn-bench-files-")
    children: list[Child] = []
    try:
        agent = Child("agent", envd.url)
        children.append(agent)
        c = Child("proxy", agent.info["agent"])
        children.append(c)
        sid, token = c.info["sandbox"], c.info["token"]
        auth = {"X-Access-Token": token}
        paths = [
            ("envd directly", envd.url, auth),
            (
                "agent forwarding path (double)",
                f"{agent.info['agent']}/sandboxes/{sid}/port/49983",
                auth,
            ),
            (
                "proxy -> forwarding path",
                c.info["proxy"],
                {**auth, "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"},
            ),
        ]
        meter = CpuMeter(
            {
                "client": os.getpid(),
                "proxy": c.proc.pid,
                "forwarding": agent.proc.pid,
                "envd": envd.proc.pid,
            }
        )
        runs: Runs = {}
        for r in range(ROUNDS):  # interleaved, best of each: the machine is shared
            for i, (name, url, headers) in _in_turn(list(enumerate(paths)), r):
                with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
                    path = f"{workdir}/blob{i}"
                    record(runs, name, "upload", upload(client, path, meter))
                    record(runs, name, "download", download(client, path, meter))
        print()
        print(_throughput_table(runs))
        print()
        print(_cpu_table(runs, list(meter.procs)))
    finally:
        for child_process in reversed(children):
            child_process.close()
        envd.stop()
        envd.log.unlink(missing_ok=True)
        for f in Path(workdir).iterdir():
            f.unlink()
        os.rmdir(workdir)


_STARTED = re.compile(r"^(\w+)\s*\| started \(pid (\d+)\)", re.M)


def bench_guest() -> None:
    from e2b import Sandbox

    from tests.e2e.conftest import Stack as Up
    from tests.integration.agent.agent_harness import AgentHome
    from wrenn.agent.images import build_base

    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        print("\nguest: skipped (needs root and QEMU)")
        return
    image = build_base(Path(os.environ.get("WRENN_TEST_STATE_DIR", "/var/lib/wrenn")))
    home = AgentHome.make(image, index=GUEST_POOL_INDEX, slots=2)
    up: Any = None
    sbx: Sandbox | None = None
    try:
        dials = os.environ.get("WRENN_CP_PROXY_DIAL_GUESTS", "true").lower() not in ("false", "0")
        up = Up(home, {"WRENN_CP_PROXY_DIAL_GUESTS": str(dials).lower()})
        for name in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
            os.environ.pop(name, None)
        os.environ.update(up.quickstart.env)
        sbx = Sandbox.create(timeout=1800)

        direct = f"http://{up.address_of(sbx.sandbox_id)}:49983"
        pids = {name: int(pid) for name, pid in _STARTED.findall(up.run_output())}
        vmm = next(
            p
            for p in psutil.Process(pids["agent"]).children(recursive=True)
            if p.name().startswith("qemu")
        )
        auth = {"X-Access-Token": sbx._envd_access_token or ""}
        paths = [
            ("guest directly (its host address)", direct, auth),
            (
                "agent forwarding path -> guest",
                f"http://127.0.0.1:{up.agent_port}/sandboxes/{sbx.sandbox_id}/port/49983",
                auth,
            ),
            (
                "proxy (dials the guest) -> guest" if dials else "proxy -> agent -> guest",
                up.quickstart.env["E2B_SANDBOX_URL"],
                {**auth, "E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"},
            ),
        ]
        meter = CpuMeter(
            {"client": os.getpid(), "proxy": pids["cp"], "agent": pids["agent"], "vm": vmm.pid}
        )
        runs: Runs = {}
        clients = [
            (name, httpx.Client(base_url=url, headers=headers, timeout=600))
            for name, url, headers in paths
        ]
        try:
            for r in range(GUEST_UPLOADS):  # slow, and the same for every path
                for name, client in _in_turn(clients, r):
                    record(runs, name, "upload", upload(client, GUEST_FILE, meter))
            for r in range(GUEST_DOWNLOADS):
                for name, client in _in_turn(clients, r):
                    record(runs, name, "download", download(client, GUEST_FILE, meter))
        finally:
            for _, client in clients:
                client.close()
        print()
        print(f"guest: {image.dir.name}, one sandbox (TCG), wrenn up on this machine")
        print(_throughput_table(runs))
        print()
        print(_cpu_table(runs, list(meter.procs)))
    finally:
        if sbx is not None:
            sbx.kill()
        if up is not None:
            up.stop()
            up.kill_children()
        home.scrub()


def main(parts: list[str]) -> None:
    """``bench/controlplane.py [list] [proxy] [guest]``: the parts named, or all."""
    print(machine())
    if not parts or "list" in parts:
        bench_list()
    if not parts or "proxy" in parts:
        bench_proxy()
    if not parts or "guest" in parts:
        bench_guest()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1:])
