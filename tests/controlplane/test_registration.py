"""The agent side of host registration (wrenn.agent.registration) against the real control
plane: a one-time token traded for credentials that are stored and reused, heartbeats that
make the host live with its capacity and templates, and a loop that survives refusals."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.controlplane.conftest import Stack, wait_for
from wrenn.agent import registration
from wrenn.agent.registration import Capacity, Credentials, TemplateReport
from wrenn.core.errors import InvalidArgument, Unauthenticated

CAPACITY = Capacity(
    runtime="qemu",
    version="0.1.0",
    vcpus=4,
    memory_mib=8192,
    memory_free_mib=6000,
    disk_mib=50_000,
    disk_free_mib=40_000,
    templates=[TemplateReport("py", "build-1", 2, 1024, 4096, "0.6.4")],
)


def token(stack: Stack) -> str:
    resp = stack.admin.post("/v1/hosts/tokens")
    assert resp.status_code == 201
    value: str = resp.json()["token"]
    return value


def test_register_store_and_heartbeat(make_stack: Callable[..., Stack]) -> None:
    stack: Stack = make_stack()
    state = Path(tempfile.mkdtemp(prefix="wrenn-agent-state-"))
    try:
        one_time = token(stack)
        creds = stack.run(
            registration.load_or_register(state, stack.url, one_time, "http://10.0.0.5:5007")
        )
        path = state / registration.CREDENTIALS_FILE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # A restart reuses what was stored: no token needed, the used one refused anyway.
        again = stack.run(registration.load_or_register(state, stack.url, "", "http://x:1"))
        assert again == creds
        with pytest.raises(Unauthenticated):
            stack.run(registration.register(stack.url, one_time, "http://10.0.0.6:5007"))

        assert stack.run(registration.heartbeat(stack.url, creds, CAPACITY)) == "active"
        hosts = {h["hostID"]: h for h in stack.admin.get("/v1/hosts").json()}
        host = hosts[creds.host_id]
        assert host["address"] == "http://10.0.0.5:5007"
        assert (host["live"], host["runtime"], host["cpuCount"], host["memoryFreeMB"]) == (
            True,
            "qemu",
            4,
            6000,
        )
        template = stack.admin.get("/templates/py").json()
        assert (template["cpuCount"], template["memoryMB"], template["envdVersion"]) == (
            2,
            1024,
            "0.6.4",
        )
        stack.admin.post(f"/v1/hosts/{creds.host_id}/drain")
        assert stack.run(registration.heartbeat(stack.url, creds, CAPACITY)) == "draining"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_unregistered_host_without_a_token_is_told_what_to_set(
    make_stack: Callable[..., Stack],
) -> None:
    stack: Stack = make_stack()
    with tempfile.TemporaryDirectory() as state, pytest.raises(InvalidArgument) as err:
        stack.run(registration.load_or_register(Path(state), stack.url, "", "http://h:1"))
    assert "WRENN_AGENT_REGISTRATION_TOKEN" in err.value.message


def test_heartbeat_loop_keeps_beating_through_refusals(make_stack: Callable[..., Stack]) -> None:
    stack: Stack = make_stack()
    host_id, secret = stack.run(
        registration.register(stack.url, token(stack), "http://10.0.0.7:5007")
    )
    beats = 0

    async def capacity() -> Capacity:
        nonlocal beats
        beats += 1
        return CAPACITY

    async def loop(creds: Credentials) -> None:
        await registration.heartbeat_loop(stack.url, creds, capacity, interval_s=0.02)

    wrong = stack.loop.submit(loop(Credentials(host_id, "wrnh_wrong")))
    wait_for(lambda: beats >= 3, "refused heartbeats to go on")
    assert not wrong.done()
    wrong.cancel()

    right = stack.loop.submit(loop(Credentials(host_id, secret)))
    try:

        def live() -> bool:
            hosts = {h["hostID"]: h for h in stack.admin.get("/v1/hosts").json()}
            return bool(hosts[host_id]["live"])

        wait_for(live, "the host to be live")
    finally:
        right.cancel()
    stack.run(asyncio.sleep(0))
