"""Sandbox metadata from Firecracker's MMDS (version 2, token based).

``PUT /latest/api/token`` with ``X-metadata-token-ttl-seconds`` returns a session token;
``GET /`` with ``X-metadata-token`` and ``Accept: application/json`` returns the metadata the
host put there: ``instanceID`` (sandbox id), ``envID`` (template id), ``teamID``, ``address``,
``traceID``. Under QEMU there is no MMDS; that is not an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
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


async def fetch(address: str) -> dict[str, Any]:
    """The metadata document at ``address``, without a deadline (callers set one)."""
    try:
        base_url = httpx.URL(f"http://{address}")
    except httpx.InvalidURL as exc:
        raise MmdsError(f"invalid MMDS address {address!r}") from exc
    async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
        try:
            response = await client.put(
                "/latest/api/token", headers={"X-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
            )
            token = response.text.strip()
            if response.status_code != 200 or not token:
                raise MmdsError(f"MMDS token request answered {response.status_code}")
            response = await client.get(
                "/", headers={"X-metadata-token": token, "Accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise MmdsError(f"MMDS request failed: {exc!r}") from exc
    if response.status_code != 200:
        raise MmdsError(f"MMDS metadata request answered {response.status_code}")
    try:
        metadata = response.json()
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
