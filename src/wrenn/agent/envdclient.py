"""The agent's clients for one sandbox's envd.

Two HTTP clients with different contracts:

* the *timeout* client (2 min per request) for unary calls — /health, /init,
  /snapshot/prepare, metrics;
* the *streaming* client (no read timeout) for file transfers and process streams, which may
  legitimately stay open for hours.

Before a snapshot the agent closes the idle connections of both (``close_idle``) so that their
FINs reach the guest while it still runs: a connection left open across a pause comes back as
a zombie the guest has to reap.

envd speaks plain HTTP, yet httpx builds an SSL context (loading the CA bundle, ~25 ms) for
every client it makes unless given one: all clients share one, made on first use.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from wrenn.core.errors import DeadlineExceeded, Unavailable, from_code

UNARY_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0
TOKEN_HEADER = "X-Access-Token"


def _limits() -> httpx.Limits:
    return httpx.Limits(max_keepalive_connections=8, keepalive_expiry=30.0)


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


def never_sent(err: BaseException) -> bool:
    """Whether a failed call's request never reached envd (no connection was made), so it
    can be sent again whatever it does."""
    return isinstance(err.__cause__, httpx.ConnectError | httpx.ConnectTimeout)


class EnvdClient:
    def __init__(self, base_url: str, access_token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self._unary = self._new_unary()
        self._streaming = self._new_streaming()

    def _headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self.access_token} if self.access_token else {}

    def _new_unary(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(UNARY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=_limits(),
            verify=_tls(),
        )

    def _new_streaming(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
            limits=_limits(),
            verify=_tls(),
        )

    @property
    def streaming(self) -> httpx.AsyncClient:
        """The client without a read timeout, for file transfers and process streams."""
        return self._streaming

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._unary.request(method, path, headers=self._headers(), **kwargs)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"envd {method} {path} timed out") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"envd unreachable at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
                raise from_code(body.get("code", "internal"), body.get("message", ""))
            except ValueError:
                raise Unavailable(f"envd {method} {path} answered {response.status_code}") from None
        return response

    async def health(self) -> bool:
        try:
            response = await self._unary.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 204

    async def wait_ready(self, timeout_s: float, *, interval_s: float = 0.05) -> float:
        """Poll /health until envd answers; returns seconds waited. Raises DeadlineExceeded."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            if await self.health():
                return time.monotonic() - start
            await asyncio.sleep(interval_s)
        raise DeadlineExceeded(f"envd at {self.base_url} not ready after {timeout_s:.0f}s")

    async def init(
        self,
        *,
        env_vars: dict[str, str] | None = None,
        access_token: str | None = None,
        default_user: str | None = None,
        default_workdir: str | None = None,
    ) -> None:
        """POST /init. After it, the new token (if any) authenticates every later call. The
        host's time goes along: guests without a PTP clock step theirs to it."""
        body: dict[str, Any] = {
            "envVars": env_vars or {},
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        if access_token:
            body["accessToken"] = access_token
        if default_user:
            body["defaultUser"] = default_user
        if default_workdir:
            body["defaultWorkdir"] = default_workdir
        await self._call("POST", "/init", json=body)
        if access_token:
            self.access_token = access_token

    async def prepare_snapshot(self) -> None:
        """POST /snapshot/prepare: envd quiesces and closes its idle connections."""
        await self._call("POST", "/snapshot/prepare")

    async def metrics(self) -> dict[str, Any]:
        response = await self._call("GET", "/metrics")
        data: dict[str, Any] = response.json()
        return data

    async def close_idle(self) -> None:
        """Close every idle pooled connection (both clients) so FINs reach the guest."""
        old_unary, old_streaming = self._unary, self._streaming
        self._unary = self._new_unary()
        self._streaming = self._new_streaming()
        await asyncio.gather(old_unary.aclose(), old_streaming.aclose())

    async def aclose(self) -> None:
        await asyncio.gather(self._unary.aclose(), self._streaming.aclose())
