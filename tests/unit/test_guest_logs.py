"""The agent's console tail (``wrenn.agent.guestlogs``) on real files: envd's JSON lines become
entries and nothing else does, a line split across reads is joined, a removed console (a
stopped VM) is read to its end and closed, a new console is followed after it, and what is kept
stays within its bounds."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from wrenn.agent import guestlogs
from wrenn.agent.guestlogs import GuestLogs, parse_line


def envd_line(event: str, level: str = "info", **fields: object) -> bytes:
    record = {**fields, "event": event, "level": level, "timestamp": "2026-01-02T03:04:05.250Z"}
    return json.dumps(record).encode() + b"\r\n"


def test_parse_line() -> None:
    entry = parse_line(envd_line("ports.forwarding", port=8080, target="x"), now_ms=1)
    assert entry is not None
    assert entry.message == "ports.forwarding" and entry.level == "info"
    assert entry.fields == {"port": "8080", "target": "x"}
    assert entry.timestamp_ms == 1767323045250
    assert json.loads(entry.line)["port"] == 8080
    for given, level in (("warning", "warn"), ("critical", "error"), ("debug", "debug")):
        parsed = parse_line(envd_line("x", level=given), 1)
        assert parsed is not None and parsed.level == level
    no_time = parse_line(b'{"event": "x", "timestamp": "yesterday"}', now_ms=42)
    assert no_time is not None and no_time.timestamp_ms == 42 and no_time.level == "info"
    for other in (
        b"[    0.000000] Linux version 6.1.0",
        b"wrenn-init: starting envd",
        b'{"no": "event"}',
        b"[1, 2]",
        b"{not json",
        b"",
    ):
        assert parse_line(other, 1) is None


async def test_follows_consoles_across_a_stop(tmp_path: Path) -> None:
    logs = GuestLogs()
    async with contextlib.AsyncExitStack() as stack:
        first = tmp_path / "vm1" / "console.log"
        first.parent.mkdir()
        first.write_bytes(b"[    0.1] kernel says hi\r\n" + envd_line("envd.started"))
        await logs.attach("sbx", first, stack)
        assert [e.message for e in await logs.read("sbx")] == ["envd.started"]

        # A line written in two parts is one entry, once complete.
        whole = envd_line("init.done", user="user")
        with first.open("ab") as out:
            out.write(whole[:20])
        assert len(await logs.read("sbx")) == 1
        with first.open("ab") as out:
            out.write(whole[20:] + envd_line("snapshot.prepared")[:-2])  # no newline yet
        assert [e.message for e in await logs.read("sbx")] == ["envd.started", "init.done"]

        # The VM stops and its run directory goes: the rest of its console is still read.
        first.unlink()
        first.parent.rmdir()
        got = [e.message for e in await logs.read("sbx")]
        assert got == ["envd.started", "init.done", "snapshot.prepared"]
        assert await logs.read("sbx") != []  # kept, and the removed file is closed

        second = tmp_path / "vm2" / "console.log"
        second.parent.mkdir()
        second.write_bytes(envd_line("conntrack.restored", aborted=1))
        await logs.attach("sbx", second, stack)
        entries = await logs.read("sbx")
        assert [e.message for e in entries][-2:] == ["snapshot.prepared", "conntrack.restored"]
        assert await logs.read("sbx", limit=1) == entries[:1]
        assert await logs.read("sbx", start_ms=entries[-1].timestamp_ms) == entries
        assert await logs.read("sbx", start_ms=entries[-1].timestamp_ms + 1) == []
        assert await logs.read("unknown") == []
    # Closing the sandbox's stack (its destroy) forgets it.
    assert await logs.read("sbx") == []


async def test_bounds(tmp_path: Path) -> None:
    logs = GuestLogs(max_entries=5, max_kept_bytes=1 << 20)
    console = tmp_path / "console.log"
    long_line = envd_line("big", blob="x" * (guestlogs.MAX_LINE_BYTES + 10))
    console.write_bytes(
        b"".join(envd_line(f"e{i}") for i in range(8)) + long_line + envd_line("after")
    )
    async with contextlib.AsyncExitStack() as stack:
        await logs.attach("sbx", console, stack)
        assert [e.message for e in await logs.read("sbx")] == ["e4", "e5", "e6", "e7", "after"]

    by_bytes = GuestLogs(max_entries=1000, max_kept_bytes=2 * len(envd_line("e0")))
    async with contextlib.AsyncExitStack() as stack:
        await by_bytes.attach("sbx", console, stack)
        assert [e.message for e in await by_bytes.read("sbx")] == ["e7", "after"]

    # An unreadable console: the sandbox goes on without logs.
    async with contextlib.AsyncExitStack() as stack:
        await logs.attach("other", tmp_path / "missing.log", stack)
        assert await logs.read("other") == []
