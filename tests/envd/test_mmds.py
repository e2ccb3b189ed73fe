"""Reading sandbox metadata from MMDS. Firecracker's MMDS cannot run outside a Firecracker VM,
so ``MmdsDouble`` stands in for it: a real HTTP server on a loopback address speaking the
MMDS v2 token protocol."""

from __future__ import annotations

import json
import secrets
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import EnvdProcess, free_port
from wrenn.envd import mmds
from wrenn.envd.config import EnvdSettings
from wrenn.envd.defaults import Defaults


class MmdsDouble:
    """Test double of Firecracker's MMDS (version 2): ``PUT /latest/api/token`` with
    ``X-metadata-token-ttl-seconds`` issues a token; ``GET /`` with that token in
    ``X-metadata-token`` and ``Accept: application/json`` returns the metadata document.
    Anything else is answered 401/400 as Firecracker does."""

    def __init__(self, metadata: Any) -> None:
        self.metadata = metadata
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                double.requests.append(("PUT", self.path))
                ttl = self.headers.get("X-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl or not ttl.isdigit():
                    self._answer(400, b"bad token request", "text/plain")
                    return
                token = secrets.token_hex(16)
                double.tokens.add(token)
                self._answer(200, token.encode(), "text/plain")

            def do_GET(self) -> None:
                double.requests.append(("GET", self.path))
                if self.headers.get("X-metadata-token") not in double.tokens:
                    self._answer(401, b"missing or invalid token", "text/plain")
                    return
                if self.headers.get("Accept") != "application/json":
                    self._answer(200, b"instanceID\nenvID", "text/plain")
                    return
                self._answer(200, json.dumps(double.metadata).encode(), "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


METADATA = {
    "instanceID": "sbx-1234",
    "envID": "tpl-base",
    "teamID": "team-7",
    "address": "logs.invalid",
    "traceID": "trace-9",
}


@pytest.fixture
def double() -> Iterator[MmdsDouble]:
    server = MmdsDouble(dict(METADATA))
    yield server
    server.close()


def settings(address: str, timeout_s: float = 10.0) -> EnvdSettings:
    return EnvdSettings(mmds_address=address, mmds_timeout_s=timeout_s)


async def test_reads_metadata_with_the_token_protocol(double: MmdsDouble) -> None:
    assert await mmds.read(settings(double.address)) == METADATA
    assert double.requests == [("PUT", "/latest/api/token"), ("GET", "/")]


def test_apply_exposes_the_identity_as_env_vars() -> None:
    defaults = Defaults(env_vars={"KEEP": "1"})
    mmds.apply(METADATA, defaults)
    assert defaults.env_vars == {
        "KEEP": "1",
        "E2B_SANDBOX_ID": "sbx-1234",
        "E2B_TEMPLATE_ID": "tpl-base",
        "E2B_TEAM_ID": "team-7",
    }


def test_apply_ignores_missing_and_non_string_fields() -> None:
    defaults = Defaults()
    mmds.apply({"instanceID": 5, "envID": "", "other": "x"}, defaults)
    assert defaults.env_vars == {}


async def test_no_mmds_is_not_an_error() -> None:
    closed_port = free_port()
    assert await mmds.read(settings(f"127.0.0.1:{closed_port}")) is None


async def test_an_invalid_address_is_no_mmds() -> None:
    assert await mmds.read(settings("not an address:x")) is None


async def test_an_mmds_that_never_answers_is_given_up() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        assert await mmds.read(settings(f"127.0.0.1:{port}", timeout_s=0.2)) is None


@pytest.mark.parametrize("metadata", [["not", "an", "object"], "text"])
async def test_metadata_that_is_not_an_object_is_ignored(metadata: Any) -> None:
    server = MmdsDouble(metadata)
    try:
        assert await mmds.read(settings(server.address)) is None
    finally:
        server.close()


@pytest.fixture
def mmds_envd(double: MmdsDouble, request: pytest.FixtureRequest) -> Iterator[EnvdProcess]:
    proc = EnvdProcess(
        env={"WRENN_ENVD_MMDS_ADDRESS": double.address, "WRENN_ENVD_MMDS_TIMEOUT_S": "10"}
    )
    yield proc
    proc.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- envd log ---\n{proc.logs()}")
    proc.log.unlink(missing_ok=True)


def test_envd_applies_metadata_at_start(mmds_envd: EnvdProcess) -> None:
    envs = httpx.get(f"{mmds_envd.url}/envs", timeout=30).json()
    assert envs["E2B_SANDBOX_ID"] == "sbx-1234"
    assert envs["E2B_TEMPLATE_ID"] == "tpl-base"


def test_envd_rereads_metadata_after_a_restore(mmds_envd: EnvdProcess, double: MmdsDouble) -> None:
    with httpx.Client(base_url=mmds_envd.url, timeout=30) as client:
        assert client.post("/snapshot/prepare").status_code == 204
        # The snapshot is restored as another sandbox: the host changed the metadata.
        double.metadata = {**METADATA, "instanceID": "sbx-restored"}
        assert client.post("/init", json={}).status_code == 204
        assert client.get("/envs").json()["E2B_SANDBOX_ID"] == "sbx-restored"
