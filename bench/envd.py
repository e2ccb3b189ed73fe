"""envd on the host, no VM: latency of a trivial command, /files throughput, the memory of
1,000 concurrent watchers and idle RSS. Prints a table; asserts nothing.

    .venv/bin/python bench/envd.py

What each row measures:
- `true` Start→end: from sending process.Start for `true` until its end event arrives, over
  a kept-alive connection, with the generated Connect client (envd's own cost) and with the
  e2b SDK's commands.run (what a user sees).
- upload / download: 100 MB through POST/GET /files with a streaming HTTP client (octet-stream
  upload; download read to the end), MB = 10^6 bytes.
- watchers: envd's RSS growth after 1,000 CreateWatcher calls on distinct directories.
- idle RSS: envd's resident memory after start and one /health request.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from e2b import Sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, p50, percentile, table  # noqa: E402
from tests.conftest import EnvdProcess  # noqa: E402
from wrenn.gen.filesystem import filesystem_pb  # noqa: E402
from wrenn.gen.filesystem.filesystem_connect import FilesystemClientSync  # noqa: E402
from wrenn.gen.process import process_pb  # noqa: E402
from wrenn.gen.process.process_connect import ProcessClientSync  # noqa: E402

RUNS = 200
SIZE = 100 * 10**6
TARGETS = {
    "p50": "≤ 3 ms",
    "upload": "≥ 300 MB/s",
    "download": "≥ 500 MB/s",
    "rss": "≤ 60 MB",
}


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 10**6


def start_true_raw(url: str) -> list[float]:
    client = ProcessClientSync(url)
    request = process_pb.StartRequest(process=process_pb.ProcessConfig(cmd="true"))
    samples = []
    for _ in range(RUNS + 10):
        t0 = time.perf_counter()
        for response in client.start(request):
            oneof = response.event.event if response.event is not None else None
            if oneof is not None and oneof.field == "end":
                break
        samples.append((time.perf_counter() - t0) * 1000)
    client.close()
    return samples[10:]


def start_true_sdk(url: str) -> list[float]:
    sbx = Sandbox.create(debug=True, sandbox_url=url)
    samples = []
    for _ in range(RUNS + 10):
        t0 = time.perf_counter()
        sbx.commands.run("true")
        samples.append((time.perf_counter() - t0) * 1000)
    return samples[10:]


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


def main() -> None:
    envd = EnvdProcess()
    try:
        httpx.get(f"{envd.url}/health")
        idle = rss_mb(envd.proc.pid)
        raw = start_true_raw(envd.url)
        sdk = start_true_sdk(envd.url)
        with tempfile.TemporaryDirectory() as tmp:
            up, down = transfer(envd.url, Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            watch_mb = watchers(envd.url, envd.proc.pid, Path(tmp))
    finally:
        envd.stop()
        envd.log.unlink(missing_ok=True)
    rows = [
        ["`true` Start→end p50 (Connect client)", f"{p50(raw):.2f} ms", TARGETS["p50"]],
        ["`true` Start→end p95 (Connect client)", f"{percentile(raw, 0.95):.2f} ms", ""],
        ["`true` commands.run p50 (e2b SDK)", f"{p50(sdk):.2f} ms", ""],
        ["`true` commands.run p95 (e2b SDK)", f"{percentile(sdk, 0.95):.2f} ms", ""],
        ["upload 100 MB (POST /files)", f"{up:.0f} MB/s", TARGETS["upload"]],
        ["download 100 MB (GET /files)", f"{down:.0f} MB/s", TARGETS["download"]],
        ["RSS growth, 1,000 watchers", f"{watch_mb:.1f} MB", ""],
        ["idle RSS", f"{idle:.1f} MB", TARGETS["rss"]],
    ]
    print(f"machine: {machine()}")
    print(table("envd (host, no VM)", ["measure", "value", "target"], rows))


if __name__ == "__main__":
    main()
