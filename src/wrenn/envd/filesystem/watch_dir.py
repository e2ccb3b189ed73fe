"""WatchDir: a server stream that opens with a start event, then carries one message per
filesystem event, and a keepalive message whenever it has been quiet for the keepalive
interval. The watch ends as soon as the client disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from protobuf import Oneof

from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import disconnect, inotify, keepalive, paths
from wrenn.envd.filesystem.watcher import DirWatcher
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import FilesystemEvent, WatchDirRequest, WatchDirResponse


def _start() -> WatchDirResponse:
    event: Oneof[Literal["start"], WatchDirResponse.StartEvent]
    event = Oneof("start", WatchDirResponse.StartEvent())
    return WatchDirResponse(event=event)


def _keepalive() -> WatchDirResponse:
    event: Oneof[Literal["keepalive"], WatchDirResponse.KeepAlive]
    event = Oneof("keepalive", WatchDirResponse.KeepAlive())
    return WatchDirResponse(event=event)


def _filesystem(change: FilesystemEvent) -> WatchDirResponse:
    event: Oneof[Literal["filesystem"], FilesystemEvent] = Oneof("filesystem", change)
    return WatchDirResponse(event=event)


async def watch_dir(
    hub: inotify.Hub,
    request: WatchDirRequest,
    user: User,
    defaults: Defaults,
    headers: Mapping[str, str],
) -> AsyncIterator[WatchDirResponse]:
    path = paths.resolve(request.path, user, defaults.workdir)
    watcher = await DirWatcher.open(
        hub,
        path,
        user,
        recursive=request.recursive,
        include_entry=request.include_entry,
        allow_network_mounts=request.allow_network_mounts,
    )
    interval_s = keepalive.interval_s(headers)
    gone = asyncio.ensure_future(disconnect.client_gone())
    upcoming: asyncio.Future[FilesystemEvent] | None = None
    try:
        yield _start()
        while True:
            if upcoming is None:
                upcoming = asyncio.ensure_future(watcher.next())
            waiting: set[asyncio.Future[Any]] = {upcoming, gone}
            done, _ = await asyncio.wait(
                waiting, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            if gone in done:
                return
            if upcoming in done:
                event, upcoming = upcoming.result(), None
                yield _filesystem(event)
            else:
                yield _keepalive()
    finally:
        gone.cancel()
        if upcoming is not None:
            upcoming.cancel()
        await watcher.aclose()
