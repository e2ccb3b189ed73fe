"""The processes envd started: running ones by pid, and the most recent finished ones, kept
so that Connect can still report how they ended.

The registry owns one supervision task per process (``ProcessHandle.run``); ``aclose`` kills
every process group still running and waits for those tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import OrderedDict

from protobuf import Oneof

from wrenn import log
from wrenn.core.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from wrenn.envd.process.fanout import Subscriber
from wrenn.envd.process.handle import ProcessHandle
from wrenn.envd.process.launch import LaunchSpec
from wrenn.envd.process.spawn import Spawned, Spawner
from wrenn.gen.process.process_pb import ProcessConfig, ProcessSelector

_log = log.get(__name__)

#: How many finished processes stay reachable by Connect.
FINISHED_KEPT = 256
#: How long ``aclose`` waits for killed processes to be reaped.
CLOSE_TIMEOUT_S = 5.0


class Registry:
    def __init__(self, spawner: Spawner | None = None) -> None:
        self._spawner = spawner if spawner is not None else Spawner()
        self._running: dict[int, ProcessHandle] = {}
        self._finished: OrderedDict[int, ProcessHandle] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting_tags: set[str] = set()
        self._closing = False

    # --- lookup --------------------------------------------------------------------------

    def running(self) -> list[ProcessHandle]:
        return list(self._running.values())

    def find(self, selector: ProcessSelector | None, *, running: bool = True) -> ProcessHandle:
        """The process a selector names. With ``running`` only a process that has not
        ended is returned; otherwise finished processes still kept are found too."""
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=int() as pid):
                handle = self._running.get(pid)
                if handle is None and not running:
                    handle = self._finished.get(pid)
                if handle is None:
                    raise NotFound(f"process with pid {pid} not found")
                return handle
            case Oneof(field="tag", value=str() as tag):
                for handle in self._running.values():
                    if handle.tag == tag:
                        return handle
                if not running:
                    for handle in reversed(self._finished.values()):
                        if handle.tag == tag:
                            return handle
                raise NotFound(f"process with tag '{tag}' not found")
            case _:
                raise InvalidArgument("a process selector (pid or tag) is required")

    def _check_tag_free(self, tag: str | None) -> None:
        if tag is not None and (
            tag in self._starting_tags or any(h.tag == tag for h in self._running.values())
        ):
            raise AlreadyExists(f"a running process already has tag '{tag}'")

    # --- lifecycle -----------------------------------------------------------------------

    async def launch(
        self,
        spec: LaunchSpec,
        config: ProcessConfig,
        tag: str | None,
        timeout_s: float | None,
    ) -> tuple[ProcessHandle, Subscriber]:
        """Start a process and subscribe to its output before any of it is read. A child
        born while the caller was cancelled is adopted (supervised, output dropped)."""
        if self._closing:
            raise Unavailable("envd is shutting down")
        self._check_tag_free(tag)
        spawning = self._spawner.spawn(spec)

        def adopt_orphan(f: asyncio.Future[Spawned]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._adopt(f.result(), config, tag, timeout_s)

        if tag is not None:
            self._starting_tags.add(tag)
        try:
            spawned = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            spawning.add_done_callback(adopt_orphan)
            raise
        finally:
            self._starting_tags.discard(tag or "")
        return self._adopt(spawned, config, tag, timeout_s)

    def _adopt(
        self, spawned: Spawned, config: ProcessConfig, tag: str | None, timeout_s: float | None
    ) -> tuple[ProcessHandle, Subscriber]:
        handle = ProcessHandle(spawned, config, tag)
        sub = handle.subscribe()
        if self._closing:
            handle.signal(signal.SIGKILL)
        elif timeout_s is not None:
            handle.kill_after(timeout_s)
        self._running[handle.pid] = handle
        task = asyncio.create_task(self._supervise(handle), name=f"process {handle.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        _log.debug("process.started", pid=handle.pid, cmd=config.cmd, tag=tag)
        return handle, sub

    async def _supervise(self, handle: ProcessHandle) -> None:
        try:
            await handle.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("process.supervision_failed", pid=handle.pid)
        finally:
            if self._running.get(handle.pid) is handle:
                del self._running[handle.pid]
            self._finished[handle.pid] = handle
            self._finished.move_to_end(handle.pid)
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)

    async def aclose(self) -> None:
        """Kill every running process group envd started and wait for them to end; a child
        whose start was under way is killed when it is adopted."""
        self._closing = True
        for handle in list(self._running.values()):
            handle.signal(signal.SIGKILL)
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
        await self._spawner.aclose()
