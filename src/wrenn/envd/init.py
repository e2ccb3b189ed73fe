"""``POST /init`` and ``GET /envs``.

/init configures the sandbox (E2B field names: ``envVars``, ``accessToken``, ``defaultUser``,
``defaultWorkdir``, ``timestamp``; unknown fields are tolerated). ``timestamp`` steps the
clock only where the ``clock_from_init`` setting asks for it (guests without a PTP clock; see
``clock``). It is idempotent: env vars are merged, the other fields replace
what was set, and absent or empty fields leave it unchanged. Nothing changes unless the whole
request is valid.

The first /init after ``/snapshot/prepare`` is a restore: connections opened before the snapshot
are aborted (their peers are gone), those opened after it stay (the /init's own included),
keep-alive comes back on, the port subsystem restarts (in the background), and the sandbox
metadata is read again from MMDS when MMDS answered at start (a template snapshot is restored
into many sandboxes).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wrenn import log
from wrenn.core.errors import InvalidArgument
from wrenn.envd import clock, conntrack, mmds, users

if TYPE_CHECKING:
    from wrenn.envd.app import Envd

_log = log.get(__name__)


@dataclass(frozen=True)
class InitRequest:
    env_vars: dict[str, str] | None = None
    access_token: str | None = None
    default_user: str | None = None
    default_workdir: str | None = None
    timestamp: Any = None


#: The string fields of the body, by wire name. Checked by hand rather than by a validation
#: library: after a restore this runs on the create path, where under emulation every code
#: path run for the first time in the restored VM costs its translation.
_STRINGS = {
    "accessToken": "access_token",
    "defaultUser": "default_user",
    "defaultWorkdir": "default_workdir",
}


def parse(body: bytes) -> InitRequest:
    if not body.strip():
        return InitRequest()
    try:
        data = json.loads(body)
    except ValueError:
        raise InvalidArgument("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    fields: dict[str, Any] = {"timestamp": data.get("timestamp")}
    env_vars = data.get("envVars")
    if env_vars is not None:
        if not isinstance(env_vars, dict):
            raise InvalidArgument("invalid envVars: must be an object of strings")
        for key, value in env_vars.items():
            if not isinstance(value, str):
                raise InvalidArgument(f"invalid envVars.{key}: {value!r} is not a string")
        fields["env_vars"] = env_vars
    for wire, name in _STRINGS.items():
        value = data.get(wire)
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"invalid {wire}: {value!r} is not a string")
        fields[name] = value
    return InitRequest(**fields)


def validate(req: InitRequest) -> users.User | None:
    """Check the user and workdir the request names (blocking: passwd lookup and stat)."""
    user = users.lookup(req.default_user) if req.default_user else None
    workdir = req.default_workdir
    if workdir:
        if not os.path.isabs(workdir):
            raise InvalidArgument(f"invalid defaultWorkdir: {workdir!r} is not an absolute path")
        if not os.path.isdir(workdir):
            raise InvalidArgument(f"invalid defaultWorkdir: {workdir!r} is not a directory")
    return user


def _changes_identity(envd: Envd, req: InitRequest) -> bool:
    """Whether the request names a user or workdir other than the current ones (those were
    checked when they were set). The host agent sends the same ones to every sandbox of a
    template, so the restore path usually skips the lookups and their thread hop."""
    defaults = envd.defaults
    return bool(
        (req.default_user and req.default_user != defaults.user)
        or (req.default_workdir and req.default_workdir != defaults.workdir)
    )


async def configure(envd: Envd, req: InitRequest) -> float | None:
    """Apply the request; returns the clock offset found (host minus guest, seconds) when the
    clock was compared with the request's timestamp."""
    host_ns = clock.parse_timestamp(req.timestamp) if req.timestamp is not None else None
    user = await asyncio.to_thread(validate, req) if _changes_identity(envd, req) else None
    offset_s = None
    if host_ns is not None and envd.settings.clock_from_init:
        offset_s = clock.step_to(host_ns)
    defaults = envd.defaults
    if req.env_vars:
        defaults.env_vars.update(req.env_vars)
    if req.access_token:
        defaults.access_token = req.access_token
    if user is not None:
        defaults.user = user.name
    if req.default_workdir:
        defaults.workdir = req.default_workdir
    return offset_s


async def restore(envd: Envd, own_conn: int | None) -> int:
    """Undo ``/snapshot/prepare`` after the VM was restored; returns how many pre-snapshot
    connections were aborted. The port subsystem restarts in the background: its first scan
    need not delay the answer (nothing forwards until a scan has run, as at start)."""
    aborted = envd.conns.restore(keep=own_conn)
    if envd.settings.ports:
        envd.ports.restart_soon()
    if envd.mmds_present:
        metadata = await mmds.read(envd.settings)
        if metadata is not None:
            mmds.apply(metadata, envd.defaults)
    return aborted


async def _log_init(event: str, **fields: Any) -> None:
    # A coroutine: Starlette would run a plain function on a worker thread.
    _log.info(event, **fields)


async def post_init(request: Request) -> Response:
    envd: Envd = request.app.state.envd
    req = parse(await request.body())
    offset_s = await configure(envd, req)
    restored = envd.conns.snapshot_pending
    aborted = await restore(envd, conntrack.conn_id(request.scope)) if restored else 0
    # One line per /init, written once the answer is sent: under emulation a line to the
    # console costs ~20 ms, and after a restore the answer is on the path of every create and
    # resume.
    logged = BackgroundTask(
        _log_init,
        "init.restored" if restored else "init.configured",
        env_vars=len(req.env_vars or {}),
        token_set=bool(req.access_token),
        user=envd.defaults.user,
        workdir=envd.defaults.workdir,
        clock_offset_s=None if offset_s is None else round(offset_s, 3),
        conns_aborted=aborted if restored else None,
    )
    return Response(status_code=204, headers={"Cache-Control": "no-store"}, background=logged)


async def get_envs(request: Request) -> Response:
    envd: Envd = request.app.state.envd
    return JSONResponse(dict(envd.defaults.env_vars), headers={"Cache-Control": "no-store"})
