"""No input yields a 500: random JSON bodies, query strings and path segments against the
endpoints, on both databases; every rejection is a 4xx with a {code, message} body."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.controlplane.conftest import Stack

FIELDS = [
    "templateID",
    "timeout",
    "autoPause",
    "autoPauseMemory",
    "autoResume",
    "secure",
    "allow_internet_access",
    "metadata",
    "envVars",
    "network",
    "mcp",
    "iam",
    "volumeMounts",
    "duration",
    "memory",
    "name",
    "requireHealthyGuest",
    "token",
    "address",
    "sandboxID",
    "cpuCount",
    "memoryMB",
    "memoryFreeMB",
    "diskSizeMB",
    "diskFreeMB",
    "templates",
    "runtime",
]
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | text, values, max_size=6) | values

FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,  # leave no example files behind
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def check(resp: httpx.Response) -> None:
    if resp.status_code == 503:  # no room is not a crash
        assert resp.json()["code"] in ("resource_exhausted", "unavailable"), resp.text
        return
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"code", "message"}, body


@pytest.fixture
def sid(stack: Stack) -> str:
    resp = stack.admin.post("/v2/sandboxes", json={"templateID": "base", "timeout": 3600})
    assert resp.status_code == 201
    sandbox_id: str = resp.json()["sandboxID"]
    return sandbox_id


@FUZZ
@given(
    body=bodies,
    path=st.sampled_from(
        [
            "/v2/sandboxes",
            "/sandboxes",
            "/sandboxes/{sid}/timeout",
            "/sandboxes/{sid}/refreshes",
            "/sandboxes/{sid}/pause",
            "/sandboxes/{sid}/resume",
            "/v2/sandboxes/{sid}/connect",
            "/sandboxes/{sid}/snapshots",
            "/v1/teams",
            "/v1/snapshots",
            "/v1/hosts/register",
            "/v1/hosts/{host}/heartbeat",
        ]
    ),
)
def test_random_bodies(stack: Stack, sid: str, body: Any, path: str) -> None:
    host = stack.hosts[0]
    url = path.format(sid=sid, host=host.host_id)
    headers = {"Authorization": f"Bearer {host.secret}"} if "heartbeat" in url else {}
    check(stack.admin.post(url, json=body, headers=headers))


@FUZZ
@given(
    segment=text,
    query=st.dictionaries(
        st.sampled_from(
            [
                "metadata",
                "state",
                "order",
                "startedAfter",
                "template",
                "nextToken",
                "limit",
                "cursor",
                "direction",
                "level",
                "search",
                "sandboxID",
                "name",
                "start",
                "end",
                "teamID",
            ]
        )
        | text,
        text,
        max_size=4,
    ),
)
def test_random_paths_and_queries(stack: Stack, segment: str, query: dict[str, str]) -> None:
    seg = quote(segment, safe="") or "x"
    for method, url in (
        ("GET", f"/sandboxes/{seg}"),
        ("DELETE", f"/sandboxes/{seg}"),
        ("GET", f"/sandboxes/{seg}/metrics"),
        ("GET", f"/sandboxes/{seg}/logs"),
        ("GET", f"/v2/sandboxes/{seg}/logs"),
        ("GET", f"/templates/{seg}"),
        ("DELETE", f"/templates/{seg}"),
        ("GET", f"/v1/snapshots/{seg}"),
        ("POST", f"/v1/hosts/{seg}/drain"),
        ("DELETE", f"/v1/teams/{seg}/api-keys/{seg}"),
        ("GET", "/v2/sandboxes"),
        ("GET", "/snapshots"),
        ("GET", "/templates"),
    ):
        check(stack.admin.request(method, url, params=query))


@FUZZ
@given(key=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80))
def test_random_api_keys(stack: Stack, key: str) -> None:
    headers = {"X-API-Key": key.encode("latin-1")}
    resp = httpx.get(f"{stack.url}/v2/sandboxes", headers=headers)
    assert resp.status_code == 401, resp.text
