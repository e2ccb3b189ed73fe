"""``POST /snapshot/prepare``: quiesce envd before the VM is paused for a snapshot.

Must be called while the VM still runs, right before the pause. Stops everything that runs
continuously (a task frozen mid-operation resumes confused), collects garbage (fewer dirty pages
in the memory snapshot), flushes filesystems (files written just before the pause must survive),
and quiesces client connections (see ``conntrack``). Idempotent; /init after the restore undoes
it.
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from wrenn import log

if TYPE_CHECKING:
    from wrenn.envd.app import Envd

_log = log.get(__name__)


async def quiesce(envd: Envd) -> None:
    envd.conns.set_keep_alive(False)
    await envd.ports.stop()
    collected = gc.collect()
    await asyncio.to_thread(os.sync)
    closed = envd.conns.prepare_snapshot()
    _log.info("snapshot.prepared", gc_collected=collected, conns_closed=closed)


async def prepare(request: Request) -> Response:
    await quiesce(request.app.state.envd)
    return Response(status_code=204, headers={"Cache-Control": "no-store"})
