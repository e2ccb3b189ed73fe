"""``GET /metrics``: the guest's resource usage, in E2B envd's JSON shape.

``cpu_used_pct`` is the CPU use since the previous call (the first call after start reports 0);
``mem_used`` excludes buffers and page cache, ``mem_cache`` is the page cache; disk figures are
for the root filesystem, ``disk_used`` counting blocks unavailable to unprivileged users.
``mem_total_mib`` / ``mem_used_mib`` are kept for clients of older envd versions.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MIB = 1024 * 1024


def collect(disk_path: str = "/") -> dict[str, Any]:
    """One sample; blocking (reads /proc and statfs). psutil is imported on the first call
    rather than with envd: it costs about 1 MB that an idle envd would otherwise hold."""
    import psutil

    mem = psutil.virtual_memory()
    cpu_pct = float(psutil.cpu_percent(interval=None))
    disk = os.statvfs(disk_path)
    disk_total = disk.f_blocks * disk.f_frsize
    disk_available = disk.f_bavail * disk.f_frsize
    return {
        "ts": int(time.time()),
        "cpu_count": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "cpu_used_pct": round(cpu_pct, 2),
        "mem_total": int(mem.total),
        "mem_used": int(mem.used),
        "mem_cache": int(getattr(mem, "cached", 0)),
        "mem_total_mib": int(mem.total) // MIB,
        "mem_used_mib": int(mem.used) // MIB,
        "disk_used": disk_total - disk_available,
        "disk_total": disk_total,
    }


async def get_metrics(request: Request) -> Response:
    sample = await asyncio.to_thread(collect)
    return JSONResponse(sample, headers={"Cache-Control": "no-store"})
