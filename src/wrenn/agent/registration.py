"""This host's registration with the control plane and its heartbeats, over the control plane's
HTTP API (docs/api.md, "Hosts"): the agent knows the wire format, nothing of the control
plane's code.

- ``register`` trades a one-time registration token for a host id and secret;
- ``load_or_register`` keeps them in ``<state_dir>/controlplane.json`` (mode 0600) so a
  restart reuses them (a token works once);
- ``heartbeat_loop`` reports the host's capacity and templates every ``interval_s``; the
  control plane counts a host live while heartbeats arrive within its window (30 s).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from wrenn import log
from wrenn.core.errors import InvalidArgument, Unavailable, WrennError, from_code

_log = log.get(__name__)

CREDENTIALS_FILE = "controlplane.json"
_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TemplateReport:
    template_id: str
    build_id: str
    vcpus: int
    memory_mib: int
    disk_mib: int = 0
    envd_version: str = ""


@dataclass(frozen=True)
class Capacity:
    """What a heartbeat reports (the caller fills it from its host info)."""

    runtime: str
    version: str
    vcpus: int
    memory_mib: int
    memory_free_mib: int
    disk_mib: int
    disk_free_mib: int
    templates: list[TemplateReport] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "version": self.version,
            "cpuCount": self.vcpus,
            "memoryMB": self.memory_mib,
            "memoryFreeMB": self.memory_free_mib,
            "diskSizeMB": self.disk_mib,
            "diskFreeMB": self.disk_free_mib,
            "templates": [
                {
                    "templateID": t.template_id,
                    "buildID": t.build_id,
                    "cpuCount": t.vcpus,
                    "memoryMB": t.memory_mib,
                    "diskSizeMB": t.disk_mib,
                    "envdVersion": t.envd_version,
                }
                for t in self.templates
            ],
        }


@dataclass(frozen=True)
class Credentials:
    host_id: str
    secret: str


def _error(resp: httpx.Response, what: str) -> WrennError:
    """The control plane's ``{code, message}`` answer as the error class of its code."""
    try:
        body = resp.json()
        return from_code(str(body["code"]), f"{what}: {body['message']}")
    except (ValueError, KeyError, TypeError):
        return Unavailable(f"{what}: HTTP {resp.status_code}")


async def _post(
    client: httpx.AsyncClient | None, url: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    try:
        if client is not None:
            return await client.post(url, json=body, headers=headers)
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as own:
            return await own.post(url, json=body, headers=headers)
    except httpx.HTTPError as err:
        raise Unavailable(f"control plane at {url} unreachable: {type(err).__name__}") from err


async def register(
    cp_url: str, token: str, address: str, *, client: httpx.AsyncClient | None = None
) -> tuple[str, str]:
    """Register this host, reachable by the control plane at ``address`` (the agent's base
    URL); its host id and secret."""
    resp = await _post(
        client, f"{cp_url.rstrip('/')}/v1/hosts/register", {"token": token, "address": address}, {}
    )
    if resp.status_code != 201:
        raise _error(resp, "registration refused")
    body = resp.json()
    return str(body["hostID"]), str(body["hostSecret"])


async def heartbeat(
    cp_url: str,
    creds: Credentials,
    capacity: Capacity,
    *,
    client: httpx.AsyncClient | None = None,
) -> str:
    """One heartbeat; the host's status as the control plane sees it (active or draining)."""
    resp = await _post(
        client,
        f"{cp_url.rstrip('/')}/v1/hosts/{creds.host_id}/heartbeat",
        capacity.body(),
        {"Authorization": f"Bearer {creds.secret}"},
    )
    if resp.status_code != 200:
        raise _error(resp, "heartbeat refused")
    return str(resp.json()["status"])


async def heartbeat_loop(
    cp_url: str,
    creds: Credentials,
    capacity: Callable[[], Awaitable[Capacity]],
    *,
    interval_s: float = 10.0,
    client: httpx.AsyncClient | None = None,
) -> None:
    """Heartbeat every ``interval_s`` until cancelled; failures are logged and retried at the
    next beat (the control plane being away must not stop the host)."""
    own = client or httpx.AsyncClient(timeout=_TIMEOUT_S)
    status = ""
    try:
        while True:
            try:
                now = await heartbeat(cp_url, creds, await capacity(), client=own)
                if now != status:
                    _log.info("registration.status", host_id=creds.host_id, status=now)
                    status = now
            except WrennError as err:
                _log.warning(
                    "registration.heartbeat_failed", code=err.code.value, message=err.message
                )
            await asyncio.sleep(interval_s)
    finally:
        if client is None:
            await own.aclose()


def _store(path: Path, creds: Credentials) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"hostID": creds.host_id, "hostSecret": creds.secret}, out)
    os.replace(tmp, path)


async def load_or_register(
    state_dir: Path,
    cp_url: str,
    token: str,
    address: str,
    *,
    client: httpx.AsyncClient | None = None,
) -> Credentials:
    """The credentials stored under ``state_dir``, or new ones from ``register`` (stored)."""
    path = state_dir / CREDENTIALS_FILE
    try:
        stored = json.loads(await asyncio.to_thread(path.read_text))
        return Credentials(host_id=str(stored["hostID"]), secret=str(stored["hostSecret"]))
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidArgument(f"{path}: not host credentials; remove it to register again") from err
    if not token:
        raise InvalidArgument(
            "not registered with the control plane yet: set WRENN_AGENT_REGISTRATION_TOKEN"
        )
    host_id, secret = await register(cp_url, token, address, client=client)
    creds = Credentials(host_id=host_id, secret=secret)
    await asyncio.to_thread(_store, path, creds)
    _log.info("registration.registered", host_id=host_id, address=address)
    return creds
