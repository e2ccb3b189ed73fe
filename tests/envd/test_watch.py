"""Directory watches driven by the e2b SDK: the sync SDK polls (CreateWatcher /
GetWatcherEvents / RemoveWatcher), the async SDK streams (WatchDir)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import (
    AsyncSandbox,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.filesystem.watch_handle import FilesystemEvent, FilesystemEventType
from e2b.sandbox_sync.filesystem.watch_handle import WatchHandle
from protobuf import Oneof

from tests.conftest import EnvdProcess
from wrenn.gen.filesystem.filesystem_connect import FilesystemClient, FilesystemClientSync
from wrenn.gen.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    GetWatcherEventsRequest,
    RemoveWatcherRequest,
    WatchDirRequest,
)
from wrenn.gen.filesystem.filesystem_pb import FilesystemEvent as FilesystemEventMessage

CREATE = FilesystemEventType.CREATE
WRITE = FilesystemEventType.WRITE
REMOVE = FilesystemEventType.REMOVE
RENAME = FilesystemEventType.RENAME
CHMOD = FilesystemEventType.CHMOD

#: How long a test waits for an event it expects before failing (a bound, not a measurement).
EVENT_WAIT_S = 10.0

Seen = set[tuple[str, FilesystemEventType]]


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wrenn-watch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pairs(events: list[FilesystemEvent]) -> Seen:
    return {(e.name, e.type) for e in events}


def poll_until(handle: WatchHandle, expected: Seen) -> list[FilesystemEvent]:
    """Poll the watcher until every expected (name, type) pair was seen; return all events."""
    events: list[FilesystemEvent] = []
    deadline = time.monotonic() + EVENT_WAIT_S
    while not expected <= _pairs(events):
        if time.monotonic() > deadline:
            pytest.fail(f"missing events {expected - _pairs(events)}; got {_pairs(events)}")
        events += handle.get_new_events()
        time.sleep(0.05)
    return events


def test_watch_reports_create_write_rename_chmod_remove(sandbox: Sandbox, tmp_dir: Path) -> None:
    handle = sandbox.files.watch_dir(str(tmp_dir))
    try:
        (tmp_dir / "a.txt").write_text("hello")
        (tmp_dir / "a.txt").rename(tmp_dir / "b.txt")
        (tmp_dir / "b.txt").chmod(0o600)
        (tmp_dir / "b.txt").unlink()
        events = poll_until(
            handle,
            {
                ("a.txt", CREATE),
                ("a.txt", WRITE),
                ("a.txt", RENAME),
                ("b.txt", CREATE),
                ("b.txt", CHMOD),
                ("b.txt", REMOVE),
            },
        )
        order = [(e.name, e.type) for e in events]
        assert order.index(("a.txt", CREATE)) < order.index(("a.txt", RENAME))
        assert order.index(("b.txt", CHMOD)) < order.index(("b.txt", REMOVE))
        assert all(e.entry is None for e in events)
    finally:
        handle.stop()


def test_non_recursive_watch_ignores_subdirectories(sandbox: Sandbox, tmp_dir: Path) -> None:
    (tmp_dir / "sub").mkdir()
    handle = sandbox.files.watch_dir(str(tmp_dir))
    try:
        (tmp_dir / "sub" / "inner.txt").write_text("i")
        (tmp_dir / "marker").write_text("m")
        events = poll_until(handle, {("marker", CREATE)})
        assert not any(e.name.startswith("sub/") for e in events)
    finally:
        handle.stop()


def test_recursive_watch_follows_new_subdirectories(sandbox: Sandbox, tmp_dir: Path) -> None:
    (tmp_dir / "old").mkdir()
    handle = sandbox.files.watch_dir(str(tmp_dir), recursive=True)
    try:
        (tmp_dir / "old" / "x.txt").write_text("x")
        (tmp_dir / "new").mkdir()
        poll_until(handle, {("old/x.txt", CREATE), ("new", CREATE)})
        # created after the watch started: its contents are watched too
        (tmp_dir / "new" / "deeper").mkdir()
        poll_until(handle, {("new/deeper", CREATE)})
        (tmp_dir / "new" / "deeper" / "y.txt").write_text("y")
        poll_until(handle, {("new/deeper/y.txt", CREATE), ("new/deeper/y.txt", WRITE)})
        # a directory moved in is watched; one moved out is not any more
        outside = Path(tempfile.mkdtemp(prefix="wrenn-watch-out-"))
        try:
            (outside / "moved").mkdir()
            (outside / "moved").rename(tmp_dir / "moved")
            (tmp_dir / "old").rename(outside / "old")
            poll_until(handle, {("moved", CREATE), ("old", RENAME)})
            (tmp_dir / "moved" / "z.txt").write_text("z")
            (outside / "old" / "gone.txt").write_text("g")
            events = poll_until(handle, {("moved/z.txt", CREATE)})
            assert not any("gone.txt" in e.name for e in events)
        finally:
            shutil.rmtree(outside, ignore_errors=True)
    finally:
        handle.stop()


def test_watch_with_entry_info(sandbox: Sandbox, tmp_dir: Path) -> None:
    handle = sandbox.files.watch_dir(str(tmp_dir), include_entry=True)
    try:
        (tmp_dir / "kept.txt").write_text("1234")
        time.sleep(0.2)
        (tmp_dir / "kept.txt").chmod(0o640)
        events = poll_until(handle, {("kept.txt", CREATE), ("kept.txt", CHMOD)})
        chmod = next(e for e in events if e.type == CHMOD)
        assert chmod.entry is not None
        assert chmod.entry.path == str(tmp_dir / "kept.txt")
        assert chmod.entry.type == FileType.FILE
        assert chmod.entry.permissions == "-rw-r-----"
        (tmp_dir / "kept.txt").unlink()
        events = poll_until(handle, {("kept.txt", REMOVE)})
        assert next(e for e in events if e.type == REMOVE).entry is None
    finally:
        handle.stop()


def test_watch_errors(sandbox: Sandbox, tmp_dir: Path) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(str(tmp_dir / "missing"))
    (tmp_dir / "file").write_text("f")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.watch_dir(str(tmp_dir / "file"))


def test_watch_as_a_user_needs_read_permission(sandbox: Sandbox, tmp_dir: Path) -> None:
    tmp_dir.chmod(0o755)
    (tmp_dir / "private").mkdir(mode=0o700)
    with pytest.raises(SandboxException, match="permission denied"):
        sandbox.files.watch_dir(str(tmp_dir / "private"), user="nobody")
    handle = sandbox.files.watch_dir(str(tmp_dir), user="nobody")
    handle.stop()


def test_stopped_watcher_is_gone(envd: EnvdProcess, tmp_dir: Path) -> None:
    with FilesystemClientSync(envd.url) as client:
        watcher_id = client.create_watcher(CreateWatcherRequest(path=str(tmp_dir))).watcher_id
        (tmp_dir / "f").write_text("f")
        poll = GetWatcherEventsRequest(watcher_id=watcher_id)
        deadline = time.monotonic() + EVENT_WAIT_S
        names: list[str] = []
        while "f" not in names and time.monotonic() < deadline:
            names += [e.name for e in client.get_watcher_events(poll).events]
        assert "f" in names
        client.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))
        with pytest.raises(ConnectError) as caught:
            client.get_watcher_events(poll)
        assert caught.value.code == Code.NOT_FOUND
        with pytest.raises(ConnectError) as caught:
            client.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))
        assert caught.value.code == Code.NOT_FOUND


# -- the streaming watch (async SDK) -------------------------------------------------------


class Collector:
    """``on_event`` callback that records events and wakes whoever waits for them."""

    def __init__(self) -> None:
        self.events: list[FilesystemEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: FilesystemEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, expected: Seen) -> None:
        async with asyncio.timeout(EVENT_WAIT_S):
            while not expected <= _pairs(self.events):
                self._changed.clear()
                await self._changed.wait()


async def test_stream_watch(envd: EnvdProcess, tmp_dir: Path) -> None:
    sandbox = await AsyncSandbox.create(debug=True, sandbox_url=envd.url)
    got = Collector()
    exits: list[Exception | None] = []
    handle = await sandbox.files.watch_dir(
        str(tmp_dir), on_event=got, on_exit=exits.append, recursive=True
    )
    try:
        await sandbox.files.write(str(tmp_dir / "s.txt"), "s")
        (tmp_dir / "dir").mkdir()
        await got.wait_for({("s.txt", CREATE), ("s.txt", WRITE), ("dir", CREATE)})
        (tmp_dir / "dir" / "t.txt").write_text("t")
        (tmp_dir / "s.txt").unlink()
        await got.wait_for({("dir/t.txt", CREATE), ("s.txt", REMOVE)})
    finally:
        await handle.stop()
    assert exits == [None]
    seen = len(got.events)
    (tmp_dir / "after-stop").write_text("a")
    await asyncio.sleep(0.3)
    assert len(got.events) == seen


async def test_stream_watch_keepalive_and_entry(envd: EnvdProcess, tmp_dir: Path) -> None:
    """A quiet stream carries keepalives at the client's interval and stays usable."""
    async with FilesystemClient(envd.url) as client:
        stream = client.watch_dir(
            WatchDirRequest(path=str(tmp_dir), include_entry=True),
            headers={"Keepalive-Ping-Interval": "1"},
        )
        kinds: list[str] = []
        async with asyncio.timeout(EVENT_WAIT_S):
            async for message in stream:
                assert isinstance(message.event, Oneof)
                kinds.append(message.event.field)
                if message.event.field == "keepalive" and not (tmp_dir / "late.txt").exists():
                    (tmp_dir / "late.txt").write_text("late")
                if message.event.field == "filesystem":
                    event = message.event.value
                    assert isinstance(event, FilesystemEventMessage)
                    assert event.name == "late.txt"
                    assert event.entry is not None
                    assert event.entry.name == "late.txt"
                    assert event.entry.owner == pwd.getpwuid(os.getuid()).pw_name
                    break
        assert kinds[0] == "start"
        assert kinds.index("keepalive") < kinds.index("filesystem")


def test_many_watchers_share_one_inotify_instance(envd: EnvdProcess, tmp_dir: Path) -> None:
    """More watchers than the kernel's per-user inotify instance limit (128 by default), on
    distinct and on shared directories; each still sees its own events."""
    client = FilesystemClientSync(envd.url)
    ids: list[str] = []
    try:
        for i in range(300):
            d = tmp_dir / f"d{i % 250}"
            d.mkdir(exist_ok=True)
            ids.append(client.create_watcher(CreateWatcherRequest(path=str(d))).watcher_id)
        (tmp_dir / "d7" / "x").write_text("x")
        # Watchers 7 and 257 share d7: both see the file; watcher 8 sees nothing.
        deadline = time.monotonic() + 10
        seen: dict[int, set[str]] = {7: set(), 257: set(), 8: set()}
        while time.monotonic() < deadline and not (seen[7] and seen[257]):
            for i in seen:
                events = client.get_watcher_events(GetWatcherEventsRequest(watcher_id=ids[i]))
                seen[i].update(e.name for e in events.events)
            time.sleep(0.05)
        assert seen[7] == {"x"}
        assert seen[257] == {"x"}
        assert seen[8] == set()
    finally:
        for watcher_id in ids:
            client.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))
        client.close()
