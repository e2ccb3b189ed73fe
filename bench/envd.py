"""envd on the host, no VM: latency of a trivial command, /files throughput, the memory of
1,000 concurrent watchers and idle RSS. Prints a table; asserts nothing.

    .venv/bin/python bench/envd.py

What each row measures:
- `true` Start→end: from sending process.Start for `true` until its end event arrives, over
  a kept-alive connection (the rest of the stream is read untimed), with the generated Connect
  client (envd's own cost) and with the e2b SDK's commands.run (what a user sees: the SDK runs
  `bash -l -c`, so the machine's login scripts are in it). Processes started through the spawn
  gate and by forking envd (``WRENN_ENVD_FAST_SPAWN=false``) are measured in alternating
  batches, so both see the same load.
- upload / download: 100 MB through POST/GET /files with a streaming HTTP client (octet-stream
  upload; download read to the end), MB = 10^6 bytes.
- watchers: envd's RSS growth after 1,000 CreateWatcher calls on distinct directories.
- idle RSS: envd's resident memory after start and one /health request; as is, with `rich`
  hidden (structlog imports it when present; guests do not have it), and as in the guest: every
  package the guest lacks hidden (see ``NOT_IN_GUEST``) and the guest's log level.

The latency rows run envd at the guest's log level (info); the host's Python is not the
guest's (Debian's), so the guest's own RSS differs a little from the last row.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from e2b import Sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, p50, percentile, table
from tests.conftest import EnvdProcess
from wrenn.gen.filesystem import filesystem_pb
from wrenn.gen.filesystem.filesystem_connect import FilesystemClientSync
from wrenn.gen.process import process_pb
from wrenn.gen.process.process_connect import ProcessClientSync

RUNS = 200
BATCH = 50
SIZE = 100 * 10**6
TARGETS = {
    "p50": "≤ 3 ms",
    "upload": "≥ 300 MB/s",
    "download": "≥ 500 MB/s",
    "rss": "≤ 60 MB",
}
#: The guest's log level (wrenn-init's default).
GUEST_ENV = {"WRENN_ENVD_LOG_LEVEL": "info"}
#: Installed on the host for the dev tools or the host extra, but not in a guest, yet imported
#: by envd's dependencies when present.
NOT_IN_GUEST = ("rich", "pygments", "watchfiles", "greenlet", "attr")


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 10**6


def hiding(packages: tuple[str, ...], where: Path) -> dict[str, str]:
    """Environment for an envd that cannot import ``packages``: a directory first on its path
    with a stand-in for each that raises ImportError, as a missing package does."""
    where.mkdir(exist_ok=True)
    for name in packages:
        (where / f"{name}.py").write_text(f"raise ImportError('{name} is not in the guest')\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")]))}


def idle_rss(env: dict[str, str]) -> float:
    envd = EnvdProcess(env=env)
    try:
        httpx.get(f"{envd.url}/health")
        return rss_mb(envd.proc.pid)
    finally:
        envd.stop()
        envd.log.unlink(missing_ok=True)


def start_true(client: ProcessClientSync, runs: int) -> list[float]:
    request = process_pb.StartRequest(process=process_pb.ProcessConfig(cmd="true"))
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        events = client.start(request)
        for response in events:
            oneof = response.event.event if response.event is not None else None
            if oneof is not None and oneof.field == "end":
                samples.append((time.perf_counter() - t0) * 1000)
                break
        for _ in events:  # the end-of-stream frame, untimed: the connection stays open
            pass
    return samples


def start_true_alternating(urls: dict[str, str]) -> dict[str, list[float]]:
    clients = {name: ProcessClientSync(url) for name, url in urls.items()}
    samples: dict[str, list[float]] = {name: [] for name in urls}
    try:
        for client in clients.values():
            start_true(client, 10)  # warm-up
        for _ in range(RUNS // BATCH):
            for name, client in clients.items():
                samples[name] += start_true(client, BATCH)
    finally:
        for client in clients.values():
            client.close()
    return samples


def start_true_sdk(url: str) -> list[float]:
    sbx = Sandbox.create(debug=True, sandbox_url=url)
    samples = []
    for _ in range(RUNS // 4 + 5):
        t0 = time.perf_counter()
        sbx.commands.run("true")
        samples.append((time.perf_counter() - t0) * 1000)
    return samples[5:]


def transfer(url: str, workdir: Path) -> tuple[float, float]:
    payload = os.urandom(1 << 20) * (SIZE // (1 << 20)) + os.urandom(SIZE % (1 << 20))
    target = str(workdir / "payload.bin")
    with httpx.Client(base_url=url, timeout=120) as client:

        def chunks() -> object:
            view = memoryview(payload)
            for i in range(0, len(view), 1 << 20):
                yield bytes(view[i : i + (1 << 20)])

        t0 = time.perf_counter()
        r = client.post(
            "/files",
            params={"path": target},
            content=chunks(),  # type: ignore[arg-type]
            headers={"Content-Type": "application/octet-stream"},
        )
        up = SIZE / (time.perf_counter() - t0) / 10**6
        r.raise_for_status()
        t0 = time.perf_counter()
        got = 0
        with client.stream("GET", "/files", params={"path": target}) as r:
            r.raise_for_status()
            for chunk in r.iter_raw(1 << 20):
                got += len(chunk)
        down = got / (time.perf_counter() - t0) / 10**6
    return up, down


def watchers(url: str, pid: int, workdir: Path) -> float:
    client = FilesystemClientSync(url)
    before = rss_mb(pid)
    ids = []
    for i in range(1000):
        d = workdir / f"w{i}"
        d.mkdir()
        r = client.create_watcher(filesystem_pb.CreateWatcherRequest(path=str(d)))
        ids.append(r.watcher_id)
    after = rss_mb(pid)
    for watcher_id in ids:
        client.remove_watcher(filesystem_pb.RemoveWatcherRequest(watcher_id=watcher_id))
    client.close()
    return after - before


@contextlib.contextmanager
def running(env: dict[str, str]) -> Iterator[EnvdProcess]:
    envd = EnvdProcess(env=env)
    try:
        yield envd
    finally:
        envd.stop()
        envd.log.unlink(missing_ok=True)


def main() -> None:
    with (
        running(GUEST_ENV) as gated,
        running({**GUEST_ENV, "WRENN_ENVD_FAST_SPAWN": "false"}) as forked,
    ):
        start = start_true_alternating({"gated": gated.url, "forked": forked.url})
        sdk = start_true_sdk(gated.url)
        with tempfile.TemporaryDirectory() as tmp:
            up, down = transfer(gated.url, Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            watch_mb = watchers(gated.url, gated.proc.pid, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        rss_as_is = idle_rss({})
        rss_no_rich = idle_rss(hiding(("rich",), Path(tmp) / "no-rich"))
        rss_guest = idle_rss({**GUEST_ENV, **hiding(NOT_IN_GUEST, Path(tmp) / "guest")})

    fast, slow = start["gated"], start["forked"]
    rows = [
        ["`true` Start→end p50 (Connect client)", f"{p50(fast):.2f} ms", TARGETS["p50"]],
        ["`true` Start→end p95 (Connect client)", f"{percentile(fast, 0.95):.2f} ms", ""],
        ["`true` Start→end p50, forking envd", f"{p50(slow):.2f} ms", ""],
        ["`true` Start→end p95, forking envd", f"{percentile(slow, 0.95):.2f} ms", ""],
        ["forking / spawn gate (p50)", f"{p50(slow) / p50(fast):.2f}x", ""],
        ["`true` commands.run p50 (e2b SDK)", f"{p50(sdk):.2f} ms", ""],
        ["`true` commands.run p95 (e2b SDK)", f"{percentile(sdk, 0.95):.2f} ms", ""],
        ["upload 100 MB (POST /files)", f"{up:.0f} MB/s", TARGETS["upload"]],
        ["download 100 MB (GET /files)", f"{down:.0f} MB/s", TARGETS["download"]],
        ["RSS growth, 1,000 watchers", f"{watch_mb:.1f} MB", ""],
        ["idle RSS, as is", f"{rss_as_is:.1f} MB", ""],
        ["idle RSS, rich hidden", f"{rss_no_rich:.1f} MB", ""],
        ["idle RSS, as in the guest", f"{rss_guest:.1f} MB", TARGETS["rss"]],
    ]
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}")
    print(table("envd (host, no VM)", ["measure", "value", "target"], rows))


if __name__ == "__main__":
    main()
