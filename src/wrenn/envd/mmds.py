"""Sandbox metadata from Firecracker's MMDS (version 2, token based).

``PUT /latest/api/token`` with ``X-metadata-token-ttl-seconds`` returns a session token;
``GET /`` with ``X-metadata-token`` and ``Accept: application/json`` returns the metadata the
host put there: ``instanceID`` (sandbox id), ``envID`` (template id), ``teamID``, ``address``,
``traceID``. Under QEMU there is no MMDS; that is not an error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog

from wrenn import log
from wrenn.envd.config import EnvdSettings
from wrenn.envd.defaults import Defaults

_log = log.get(__name__)

TOKEN_TTL_S = 60

#: Metadata field → env var every process sees, as E2B's envd names them.
ENV_VARS = {
    "instanceID": "E2B_SANDBOX_ID",
    "envID": "E2B_TEMPLATE_ID",
    "teamID": "E2B_TEAM_ID",
}


class MmdsError(Exception):
    """No MMDS at the address, or it did not answer as Firecracker's MMDS does."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, 80
    if not port.isdigit() or not host:
        raise MmdsError(f"invalid MMDS address {address!r}")
    return host.strip("[]"), int(port)


async def _request(
    host: str, port: int, method: str, path: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection. MMDS is a link-local endpoint answered by
    the VMM; a minimal client keeps an HTTP library out of envd's memory."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise MmdsError(f"MMDS unreachable: {exc}") from exc
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if method == "PUT":
            lines.append("Content-Length: 0")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise MmdsError(f"MMDS answered a malformed status line {status_line!r}")
        length = None
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        body = await (reader.readexactly(length) if length is not None else reader.read())
        return int(parts[1]), body
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise MmdsError(f"MMDS request failed: {exc!r}") from exc
    finally:
        writer.close()


async def fetch(address: str) -> dict[str, Any]:
    """The metadata document at ``address``, without a deadline (callers set one)."""
    host, port = _split_address(address)
    status, body = await _request(
        host, port, "PUT", "/latest/api/token", {"X-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
    )
    token = body.decode(errors="replace").strip()
    if status != 200 or not token:
        raise MmdsError(f"MMDS token request answered {status}")
    status, body = await _request(
        host, port, "GET", "/", {"X-metadata-token": token, "Accept": "application/json"}
    )
    if status != 200:
        raise MmdsError(f"MMDS metadata request answered {status}")
    try:
        metadata = json.loads(body)
    except ValueError as exc:
        raise MmdsError("MMDS metadata is not JSON") from exc
    if not isinstance(metadata, dict):
        raise MmdsError("MMDS metadata is not a JSON object")
    return metadata


async def read(settings: EnvdSettings) -> dict[str, Any] | None:
    """The sandbox's metadata, or None when no MMDS answers within ``mmds_timeout_s``."""
    try:
        async with asyncio.timeout(settings.mmds_timeout_s):
            metadata = await fetch(settings.mmds_address)
    except (TimeoutError, MmdsError) as exc:
        _log.debug("mmds.unavailable", address=settings.mmds_address, reason=str(exc) or repr(exc))
        return None
    _log.info("mmds.read", address=settings.mmds_address, fields=sorted(metadata))
    return metadata


def apply(metadata: dict[str, Any], defaults: Defaults) -> None:
    """Expose the sandbox's identity to its processes as env vars, and bind it to the log
    context of the calling task (and of the tasks it starts afterwards)."""
    for field, env_var in ENV_VARS.items():
        value = metadata.get(field)
        if isinstance(value, str) and value:
            defaults.env_vars[env_var] = value
    sandbox_id = metadata.get("instanceID")
    if isinstance(sandbox_id, str) and sandbox_id:
        structlog.contextvars.bind_contextvars(sandbox_id=sandbox_id)
    template_id = metadata.get("envID")
    if isinstance(template_id, str) and template_id:
        structlog.contextvars.bind_contextvars(template_id=template_id)
