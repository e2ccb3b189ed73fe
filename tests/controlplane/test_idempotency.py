"""``Idempotency-Key`` on creates (POST /sandboxes, /v2/sandboxes, /v1/snapshots): a retry gets
the first response, a different request with the same key is refused, concurrent duplicates
make one sandbox, a failed create frees the key, keys are per team and expire. SQLite and
PostgreSQL, FakeHostAgent test doubles."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import Sandbox, SandboxException

from tests.controlplane.conftest import Stack, wait_for
from tests.controlplane.fake_agent import FakeSandbox

BASE = {"templateID": "base"}


def creates(stack: Stack) -> int:
    return sum(1 for h in stack.hosts for rpc, _ in h.agent.calls if rpc == "CreateSandbox")


def post(c: httpx.Client, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    return c.post(path, json=body, headers={"Idempotency-Key": key})


def test_a_retry_gets_the_first_response(stack: Stack) -> None:
    c = stack.admin
    first = post(c, "/v2/sandboxes", {**BASE, "metadata": {"a": "1"}}, "create-1")
    assert first.status_code == 201, first.text
    again = post(c, "/v2/sandboxes", {"metadata": {"a": "1"}, **BASE}, "create-1")
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert creates(stack) == 1

    # Without a key, or with another one, every create is a new sandbox.
    assert c.post("/v2/sandboxes", json=BASE).json()["sandboxID"] != first.json()["sandboxID"]
    other = post(c, "/v2/sandboxes", BASE, "create-2")
    assert other.json()["sandboxID"] != first.json()["sandboxID"]
    assert creates(stack) == 3

    # The same key for a different request: refused, naming the key.
    for path, body in (
        ("/v2/sandboxes", {**BASE, "metadata": {"a": "2"}}),
        ("/sandboxes", {**BASE, "metadata": {"a": "1"}}),
    ):
        resp = post(c, path, body, "create-1")
        assert resp.status_code == 409, resp.text
        assert "create-1" in resp.json()["message"] and "different" in resp.json()["message"]
    assert creates(stack) == 3

    # Keys are per team.
    _, key = stack.new_team("other")
    theirs = post(stack.client(key), "/v2/sandboxes", {**BASE, "metadata": {"a": "1"}}, "create-1")
    assert theirs.status_code == 201
    assert theirs.json()["sandboxID"] != first.json()["sandboxID"]


def test_concurrent_duplicates_make_one_sandbox(stack: Stack) -> None:
    gate = asyncio.Event()
    agent = stack.hosts[0].agent

    async def slow_start(_: FakeSandbox) -> None:
        await gate.wait()

    agent.on_start = slow_start
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(post, stack.client(stack.admin_key), "/v2/sandboxes", BASE, "once")
            for _ in range(6)
        ]
        wait_for(lambda: creates(stack) >= 1, "the first create to reach the host")
        stack.loop.loop.call_soon_threadsafe(gate.set)
        answers = [f.result(60) for f in futures]
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["sandboxID"] for a in answers}) == 1
    assert creates(stack) == 1
    assert len(agent.running()) == 1


def test_a_failed_create_frees_its_key(stack: Stack) -> None:
    agent = stack.hosts[0].agent
    agent.fail_next["CreateSandbox"] = ConnectError(Code.RESOURCE_EXHAUSTED, "no free slot")
    failed = post(stack.admin, "/v2/sandboxes", BASE, "retry-me")
    assert failed.status_code == 429, failed.text
    retried = post(stack.admin, "/v2/sandboxes", BASE, "retry-me")
    assert retried.status_code == 201, retried.text
    assert retried.headers.get("idempotent-replayed") is None
    assert agent.running() == [retried.json()["sandboxID"]]


def test_keys_expire(make_stack: Any) -> None:
    stack: Stack = make_stack(idempotency_ttl_s=0.3)
    stack.add_host()
    first = post(stack.admin, "/v2/sandboxes", BASE, "short-lived")
    time.sleep(0.4)  # past the key's lifetime
    again = post(stack.admin, "/v2/sandboxes", BASE, "short-lived")
    assert again.status_code == 201
    assert again.json()["sandboxID"] != first.json()["sandboxID"]


def test_bad_keys_are_refused(stack: Stack) -> None:
    for bad in ("", "has space", "x" * 256, "tab\there"):
        resp = post(stack.admin, "/v2/sandboxes", BASE, bad)
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["code"] == "invalid_argument"
        assert "dempotency" in resp.json()["message"]
    assert creates(stack) == 0


def test_named_snapshots_and_the_v1_create(stack: Stack) -> None:
    c = stack.admin
    sandbox = post(c, "/sandboxes", BASE, "v1")
    assert post(c, "/sandboxes", BASE, "v1").json() == sandbox.json()
    sid = sandbox.json()["sandboxID"]
    body = {"sandboxID": sid, "name": "warm"}
    snap = post(c, "/v1/snapshots", body, "snap-1")
    assert snap.status_code == 201, snap.text
    again = post(c, "/v1/snapshots", body, "snap-1")
    assert again.status_code == 201 and again.json() == snap.json()
    agent = stack.hosts[0].agent
    assert [rpc for rpc, _ in agent.calls].count("CreateSnapshot") == 1
    # Without the key, the same name is taken.
    assert c.post("/v1/snapshots", json=body).status_code == 409


def test_the_sdk_create_with_an_idempotency_key(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_URL", stack.url)
    monkeypatch.setenv("E2B_API_KEY", stack.admin_key)
    monkeypatch.setenv("E2B_DOMAIN", "wrenn.test")
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    key = "0b7c2e6e-9d0f-4c7a-8f7e-4f3b2a1c0d9e"
    first = Sandbox.create(metadata={"k": "1"}, idempotency_key=key)
    try:
        again = Sandbox.create(metadata={"k": "1"}, idempotency_key=key)
        assert again.sandbox_id == first.sandbox_id
        assert creates(stack) == 1
        with pytest.raises(SandboxException):
            Sandbox.create(metadata={"k": "2"}, idempotency_key=key)
    finally:
        Sandbox.kill(first.sandbox_id)
