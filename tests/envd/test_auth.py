"""Access tokens: once /init has set one, every endpoint except /health needs X-Access-Token."""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.connection_config import ConnectionConfig
from e2b.envd.versions import ENVD_DEBUG_FALLBACK
from e2b.exceptions import AuthenticationException

from tests.conftest import EnvdProcess

TOKEN = "first-token-" + uuid.uuid4().hex
PROBE = Path(tempfile.gettempdir()) / f"wrenn-auth-probe-{uuid.uuid4().hex}"
CONNECT_JSON = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}

#: (method, path, body, headers): every kind of endpoint envd serves.
ENDPOINTS = [
    ("GET", "/envs", None, {}),
    ("GET", "/metrics", None, {}),
    ("GET", "/files?path=/etc/hostname", None, {}),
    ("POST", f"/files?path={PROBE}", b"x", {"Content-Type": "application/octet-stream"}),
    ("POST", "/init", b"{}", {"Content-Type": "application/json"}),
    ("POST", "/snapshot/prepare", None, {}),
    ("POST", "/process.Process/List", b"{}", CONNECT_JSON),
    ("POST", "/filesystem.Filesystem/Stat", b'{"path": "/"}', CONNECT_JSON),
    ("GET", "/no-such-endpoint", None, {}),
]
ENDPOINT_IDS = [f"{m} {p.split('?')[0]}" for m, p, _, _ in ENDPOINTS]


@pytest.fixture(scope="module")
def token_envd() -> Iterator[EnvdProcess]:
    """An envd whose token is set; tests here only send requests that it rejects or that
    change nothing."""
    proc = EnvdProcess()
    try:
        response = httpx.post(f"{proc.url}/init", json={"accessToken": TOKEN}, timeout=30)
        assert response.status_code == 204
        yield proc
    finally:
        proc.stop()
        proc.log.unlink(missing_ok=True)
        PROBE.unlink(missing_ok=True)


def send(
    envd: EnvdProcess,
    endpoint: tuple[str, str, bytes | None, dict[str, str]],
    token: str | None,
) -> httpx.Response:
    method, path, body, headers = endpoint
    headers = dict(headers)
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.request(method, envd.url + path, content=body, headers=headers, timeout=30)


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
def test_every_endpoint_but_health_needs_the_token(
    token_envd: EnvdProcess,
    endpoint: tuple[str, str, bytes | None, dict[str, str]],
    token: str | None,
) -> None:
    assert_unauthenticated(send(token_envd, endpoint, token))


def test_rejected_requests_have_no_effect(token_envd: EnvdProcess) -> None:
    upload = ENDPOINTS[3]
    try:
        assert_unauthenticated(send(token_envd, upload, "wrong"))
        assert not PROBE.exists()
    finally:
        PROBE.unlink(missing_ok=True)
    envs = ("POST", "/init", b'{"envVars": {"INTRUDER": "1"}}', {})
    assert_unauthenticated(send(token_envd, envs, "wrong"))
    envs_now = send(token_envd, ("GET", "/envs", None, {}), TOKEN).json()
    assert "INTRUDER" not in envs_now


def test_health_needs_no_token(token_envd: EnvdProcess) -> None:
    for token in (None, "wrong", TOKEN):
        assert send(token_envd, ("GET", "/health", None, {}), token).status_code == 204


@pytest.mark.parametrize(
    "endpoint",
    [
        ("GET", "/envs", None, {}),
        ("GET", "/metrics", None, {}),
        ("POST", "/process.Process/List", b"{}", CONNECT_JSON),
        ("POST", "/filesystem.Filesystem/Stat", b'{"path": "/"}', CONNECT_JSON),
    ],
    ids=["envs", "metrics", "process-list", "filesystem-stat"],
)
def test_the_right_token_is_let_through(
    token_envd: EnvdProcess, endpoint: tuple[str, str, bytes | None, dict[str, str]]
) -> None:
    response = send(token_envd, endpoint, TOKEN)
    assert response.status_code == 200, response.text


def test_no_token_needed_before_init_sets_one(fresh_envd: EnvdProcess) -> None:
    for endpoint in (("GET", "/envs", None, {}), ("GET", "/metrics", None, {})):
        assert send(fresh_envd, endpoint, None).status_code == 200


def test_init_replaces_the_token(fresh_envd: EnvdProcess) -> None:
    first, second = "token-one", "token-two"
    envs = ("GET", "/envs", None, {})

    def init(body: dict[str, object], token: str | None) -> httpx.Response:
        request = ("POST", "/init", json.dumps(body).encode(), {})
        return send(fresh_envd, request, token)

    assert init({"accessToken": first}, None).status_code == 204
    # Nobody without the current token may set another one.
    assert_unauthenticated(init({"accessToken": "attacker"}, None))
    assert_unauthenticated(init({"accessToken": "attacker"}, "wrong"))

    assert init({"accessToken": second}, first).status_code == 204
    assert_unauthenticated(send(fresh_envd, envs, first))
    assert send(fresh_envd, envs, second).status_code == 200

    # An /init without accessToken keeps the token.
    assert init({"envVars": {"K": "v"}}, second).status_code == 204
    assert send(fresh_envd, envs, second).json() == {"K": "v"}
    assert_unauthenticated(send(fresh_envd, envs, None))


def sdk_sandbox(envd: EnvdProcess, token: str | None) -> Sandbox:
    """The SDK's handle as it is after ``Sandbox.create`` of a secured sandbox: the API would
    hand over ``envd_access_token`` and the SDK sends it as X-Access-Token. Debug mode does
    not go through the API, so the same configuration is assembled here."""
    headers = {"E2b-Sandbox-Id": "debug_sandbox_id"}
    if token is not None:
        headers["X-Access-Token"] = token
    return Sandbox(
        sandbox_id="debug_sandbox_id",
        sandbox_domain=None,
        envd_version=ENVD_DEBUG_FALLBACK,
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=ConnectionConfig(
            debug=True, sandbox_url=envd.url, extra_sandbox_headers=headers
        ),
    )


@pytest.mark.parametrize("token", [None, "wrong"])
def test_sdk_without_the_right_token_is_unauthenticated(
    token_envd: EnvdProcess, token: str | None
) -> None:
    sandbox = sdk_sandbox(token_envd, token)
    with pytest.raises(AuthenticationException):
        sandbox.commands.list()
    with pytest.raises(AuthenticationException):
        sandbox.files.list("/")
    with pytest.raises(AuthenticationException):
        sandbox.files.read("/etc/hostname")


def test_sdk_with_the_right_token_works(token_envd: EnvdProcess) -> None:
    sandbox = sdk_sandbox(token_envd, TOKEN)
    assert isinstance(sandbox.commands.list(), list)
    assert any(entry.name == "etc" for entry in sandbox.files.list("/"))
    assert sandbox.files.read("/etc/hostname") == Path("/etc/hostname").read_text()
