"""A directory watch: inotify events of one directory (and, when recursive, of every
directory below it, including ones created or moved in later) turned into the
``FilesystemEvent`` messages E2B's envd sends.

inotify → event type, as E2B's fsnotify-based watcher maps them:

    IN_CREATE, IN_MOVED_TO        CREATE
    IN_MOVED_FROM, IN_MOVE_SELF   RENAME
    IN_ATTRIB                     CHMOD
    IN_MODIFY                     WRITE
    IN_DELETE, IN_DELETE_SELF     REMOVE

Event names are relative to the watched directory (``.`` for the directory itself). The
``*_SELF`` events of subdirectories are dropped: their parent already reports them.

A :class:`DirWatcher` holds watches on the shared inotify :class:`~inotify.Hub` and one task
that turns raw events into messages (it adds watches for new subdirectories and reads entry
info on threads acting as the requesting user); ``aclose`` cancels the task and drops its
watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import stat
from dataclasses import dataclass, field

from wrenn import log
from wrenn.core.errors import (
    Internal,
    InvalidArgument,
    ResourceExhausted,
    WrennError,
    from_os_error,
)
from wrenn.envd import identity
from wrenn.envd.filesystem import entry, inotify
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import EntryInfo, EventType, FilesystemEvent

_log = log.get(__name__)

#: Events a watcher holds for a consumer that does not read them; past this the watch ends
#: with ``resource_exhausted`` instead of growing without bound.
MAX_PENDING_EVENTS = 100_000

_NETWORK_FS_MAGIC = frozenset(
    {
        0x6969,  # NFS
        0xFF534D42,  # CIFS
        0x517B,  # SMB
        0xFE534D42,  # SMB2
        0x65735546,  # FUSE
    }
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]

_TYPES: tuple[tuple[int, EventType], ...] = (
    (inotify.IN_CREATE | inotify.IN_MOVED_TO, EventType.CREATE),
    (inotify.IN_MOVED_FROM | inotify.IN_MOVE_SELF, EventType.RENAME),
    (inotify.IN_ATTRIB, EventType.CHMOD),
    (inotify.IN_MODIFY, EventType.WRITE),
    (inotify.IN_DELETE | inotify.IN_DELETE_SELF, EventType.REMOVE),
)
_SELF = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
_APPEARED = inotify.IN_CREATE | inotify.IN_MOVED_TO


def event_types(mask: int) -> list[EventType]:
    """The event types one inotify mask stands for, in E2B's order."""
    return [kind for bits, kind in _TYPES if mask & bits]


def filesystem_magic(path: str) -> int:
    """``f_type`` of the filesystem holding ``path`` (statfs(2)). Blocking."""
    buffer = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF


def check_watchable(path: str, allow_network_mounts: bool) -> None:
    """Raise unless ``path`` is a directory that may be watched. Blocking, as the user."""
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"path is not a directory: {path}")
        if not allow_network_mounts and filesystem_magic(path) in _NETWORK_FS_MAGIC:
            raise InvalidArgument(f"cannot watch path on network filesystem: {path}")
    except OSError as err:
        raise from_os_error(err, path) from err


@dataclass
class _Added:
    """Watches added for a directory tree, and the entries found in it."""

    watches: list[tuple[int, str]] = field(default_factory=list)
    found: list[str] = field(default_factory=list)


class DirWatcher:
    def __init__(
        self,
        hub: inotify.Hub,
        root: str,
        user: User,
        *,
        recursive: bool,
        include_entry: bool,
    ) -> None:
        self.root = root
        self.user = user
        self.recursive = recursive
        self.include_entry = include_entry
        self._hub = hub
        self._paths: dict[int, str] = {}  # watch descriptor → path relative to root
        self._raw: asyncio.Queue[list[inotify.RawEvent]] = asyncio.Queue()
        self._events: asyncio.Queue[FilesystemEvent | WrennError] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._error: WrennError | None = None

    @classmethod
    async def open(
        cls,
        hub: inotify.Hub,
        root: str,
        user: User,
        *,
        recursive: bool,
        include_entry: bool,
        allow_network_mounts: bool,
    ) -> DirWatcher:
        """Start watching ``root``: every change after this returns is reported."""
        await identity.run_as(user, check_watchable, root, allow_network_mounts)
        hub.open()
        watcher = cls(hub, root, user, recursive=recursive, include_entry=include_entry)
        try:
            added = await identity.run_as(user, watcher._add_tree, "", True)
        except BaseException:
            hub.remove_all(watcher)
            raise
        watcher._paths.update(added.watches)
        watcher._task = asyncio.create_task(watcher._run(), name=f"watch {root}")
        _log.debug("watch.started", path=root, recursive=recursive, watches=len(watcher._paths))
        return watcher

    async def next(self) -> FilesystemEvent:
        """The next event; raises the error that ended the watch."""
        if self._error is not None:
            raise self._error
        item = await self._events.get()
        if isinstance(item, WrennError):
            self._error = item
            raise item
        return item

    def drain(self) -> list[FilesystemEvent]:
        """Every event queued now. Raises the error that ended the watch once the events
        before it have been drained."""
        events: list[FilesystemEvent] = []
        while self._error is None and not self._events.empty():
            item = self._events.get_nowait()
            if isinstance(item, WrennError):
                self._error = item
            else:
                events.append(item)
        if not events and self._error is not None:
            raise self._error
        return events

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._hub.remove_all(self)
        _log.debug("watch.stopped", path=self.root)

    # -- event loop side -------------------------------------------------------------------

    def deliver(self, events: list[inotify.RawEvent]) -> None:
        self._raw.put_nowait(events)

    async def _run(self) -> None:
        try:
            while True:
                batch = await self._raw.get()
                await self._process(batch)
                if self._events.qsize() > MAX_PENDING_EVENTS:
                    raise ResourceExhausted(f"too many unread filesystem events: {self.root}")
        except WrennError as err:
            self._events.put_nowait(err)
        except Exception as err:
            _log.error("watch.failed", path=self.root, exc_info=err)
            self._events.put_nowait(Internal(f"watching failed: {self.root}"))

    async def _process(self, batch: list[inotify.RawEvent]) -> None:
        pending: list[tuple[str, EventType]] = []
        for raw in batch:
            if raw.mask & inotify.IN_Q_OVERFLOW:
                raise ResourceExhausted(f"filesystem event queue overflowed: {self.root}")
            if raw.mask & inotify.IN_IGNORED:
                self._paths.pop(raw.wd, None)
                continue
            base = self._paths.get(raw.wd)
            if base is None or (raw.mask & _SELF and base != ""):
                continue
            rel = os.path.join(base, raw.name) if raw.name else (base or ".")
            pending.extend((rel, kind) for kind in event_types(raw.mask))
            if not raw.mask & inotify.IN_ISDIR or not self.recursive:
                continue
            if raw.mask & _APPEARED:
                # Changes inside the new directory before its watch existed are reported as
                # creations of what the watch found there.
                await self._emit(pending)
                pending = []
                added = await identity.run_as(self.user, self._add_tree, rel, False)
                self._paths.update(added.watches)
                pending.extend((found, EventType.CREATE) for found in added.found)
            elif raw.mask & inotify.IN_MOVED_FROM:
                self._forget_tree(rel)
        await self._emit(pending)

    async def _emit(self, pending: list[tuple[str, EventType]]) -> None:
        if not pending:
            return
        entries: list[EntryInfo | None] = [None] * len(pending)
        if self.include_entry:
            paths = [os.path.join(self.root, rel) for rel, _ in pending]
            entries = await identity.run_as(self.user, _entries, paths)
        for (rel, kind), info in zip(pending, entries, strict=True):
            self._events.put_nowait(FilesystemEvent(name=rel, type=kind, entry=info))

    def _forget_tree(self, rel: str) -> None:
        prefix = rel + "/"
        for wd, path in list(self._paths.items()):
            if path == rel or path.startswith(prefix):
                del self._paths[wd]
                self._hub.remove(self, wd)

    # -- worker thread side (acting as the user) -------------------------------------------

    def _add_tree(self, rel: str, is_root: bool) -> _Added:
        """Watch ``rel`` and, when recursive, every directory below it. Blocking. Errors on
        the root are the caller's; a subdirectory that vanished or cannot be read is
        skipped."""
        added = _Added()
        stack = [rel]
        while stack:
            current = stack.pop()
            path = os.path.join(self.root, current) if current else self.root
            try:
                added.watches.append((self._hub.add(self, path), current))
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise ResourceExhausted(
                        f"inotify watch limit reached while watching {path}"
                    ) from err
                if is_root and current == rel:
                    raise from_os_error(err, path) from err
                continue
            if not self.recursive:
                break
            try:
                with os.scandir(path) as it:
                    children = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            for child in children:
                child_rel = os.path.join(current, child.name) if current else child.name
                if not is_root:
                    added.found.append(child_rel)
                if child.is_dir(follow_symlinks=False):
                    stack.append(child_rel)
        return added


def _entries(paths: list[str]) -> list[EntryInfo | None]:
    names = entry.Names()
    result: list[EntryInfo | None] = []
    for path in paths:
        try:
            result.append(entry.of_path(path, names))
        except OSError:
            result.append(None)
    return result
