"""HTTP client of the control plane's REST API. Error bodies ``{"code", "message"}`` become
the ``wrenn.core.errors`` class of their code; a server that cannot be reached is
``Unavailable`` with a message that says where the CLI looked."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from wrenn.core.errors import (
    HTTP_STATUS,
    Code,
    DeadlineExceeded,
    Unauthenticated,
    Unavailable,
    WrennError,
    from_code,
)

#: Seconds for one request; creating or resuming a sandbox can take a VM restore.
DEFAULT_TIMEOUT_S = 120.0

Params = Mapping[str, str | int | list[str]]

_CODE_BY_STATUS: dict[int, Code] = {status: code for code, status in HTTP_STATUS.items()} | {
    400: Code.INVALID_ARGUMENT,
    409: Code.ALREADY_EXISTS,
    500: Code.INTERNAL,
    507: Code.RESOURCE_EXHAUSTED,
}


def error_from_response(resp: httpx.Response) -> WrennError:
    """The error a failed response carries (its body's code, else its status)."""
    code: str | None = None
    message = ""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        message = str(body.get("message") or "")
    if code is None:
        code = _CODE_BY_STATUS.get(resp.status_code, Code.UNKNOWN).value
    if not message:
        message = f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
    return from_code(code, message)


class ControlPlaneClient:
    """One control plane, one API key. ``transport`` replaces the network in tests."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=self.api_url, headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, json: Any = None, params: Params | None = None
    ) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=json, params=params)
        except httpx.TimeoutException as err:
            raise DeadlineExceeded(
                f"the control plane at {self.api_url} did not answer {method} {path} in time"
            ) from err
        except httpx.TransportError as err:
            reason = str(err) or type(err).__name__
            raise Unavailable(
                f"cannot reach the control plane at {self.api_url} ({reason}); is it running? "
                "`wrenn up` starts one, --api-url or WRENN_API_URL points elsewhere"
            ) from err
        if resp.is_success:
            return resp
        failure = error_from_response(resp)
        if isinstance(failure, Unauthenticated):
            failure = Unauthenticated(
                f"{failure.message} (control plane {self.api_url}); pass --api-key, set "
                "WRENN_API_KEY or save a key with `wrenn login`"
            )
        raise failure

    def get(self, path: str, *, params: Params | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None) -> Any:
        resp = self.request("POST", path, json=json)
        return resp.json() if resp.content else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def pages(
        self, path: str, params: Mapping[str, str | int | list[str]], limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every item of a listing that pages with ``nextToken`` / ``x-next-token``; at most
        ``limit`` when given."""
        query: dict[str, str | int | list[str]] = dict(params)
        seen = 0
        while True:
            resp = self.request("GET", path, params=query)
            for item in resp.json():
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            token = resp.headers.get("x-next-token")
            if not token or (limit is not None and seen >= limit):
                return
            query["nextToken"] = token
