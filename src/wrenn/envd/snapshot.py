"""``POST /snapshot/prepare``: quiesce envd before the VM is paused for a snapshot.

Must be called while the VM still runs, right before the pause. Stops everything that runs
continuously (a task frozen mid-operation resumes confused), collects garbage (fewer dirty pages
in the memory snapshot), flushes filesystems (files written just before the pause must survive),
and quiesces client connections (see ``conntrack``). Idempotent; /init after the restore undoes
it. The response's ``Server-Timing`` header says how long each part took.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from wrenn import log

if TYPE_CHECKING:
    from wrenn.envd.app import Envd

_log = log.get(__name__)

#: Whether this process's heap has been collected and frozen (by an earlier prepare: the
#: template's, for every sandbox restored from it). Kept here because ``gc.get_freeze_count``
#: walks every frozen object: after a restore that touched ~14 MiB of guest memory the VM had
#: not read back yet, ~120 ms per pause under emulation.
_frozen = False


async def quiesce(envd: Envd) -> dict[str, float]:
    """Quiesce; how long each part took, in ms."""
    ms: dict[str, float] = {}
    last = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        ms[name] = round((now - last) * 1000, 1)
        last = now

    global _frozen
    envd.conns.set_keep_alive(False)
    collected = None  # logged as such when the heap was frozen already
    if not _frozen:
        collected = gc.collect()
        gc.freeze()
        _frozen = True
    mark("gc")
    await asyncio.gather(asyncio.to_thread(os.sync), envd.ports.stop())
    mark("sync")
    closed = envd.conns.prepare_snapshot()
    mark("conns")
    _log.info("snapshot.prepared", gc_collected=collected, conns_closed=closed, ms=ms)
    return ms


async def prepare(request: Request) -> Response:
    ms = await quiesce(request.app.state.envd)
    timing = ", ".join(f"{name};dur={value}" for name, value in ms.items())
    return Response(status_code=204, headers={"Cache-Control": "no-store", "Server-Timing": timing})
