"""Sandbox metrics over time (the metrics sampler, its retention, ``GET /sandboxes/{id}/metrics``
between ``start`` and ``end``, ``GET /sandboxes/metrics``) and sandbox logs (``GET
/sandboxes/{id}/logs`` through the host agent's GetSandboxLogs), read back with the e2b SDK's
own models, on SQLite and PostgreSQL against FakeHostAgent test doubles."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import Sandbox
from e2b.api.client.models import SandboxLogs, SandboxLogsV2Response, SandboxMetric

from tests.controlplane.conftest import Stack, wait_for
from wrenn.controlplane.sampler import MetricsSampler


def error(resp: Any, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.json()["code"] == code, resp.text
    message: str = resp.json()["message"]
    return message


def create(stack: Stack, key: str | None = None) -> str:
    c = stack.client(key) if key else stack.admin
    resp = c.post("/v2/sandboxes", json={"templateID": "base"})
    assert resp.status_code == 201, resp.text
    sandbox_id: str = resp.json()["sandboxID"]
    return sandbox_id


def series(stack: Stack, sandbox_id: str, **params: int) -> list[SandboxMetric]:
    resp = stack.admin.get(f"/sandboxes/{sandbox_id}/metrics", params=params)
    assert resp.status_code == 200, resp.text
    return [SandboxMetric.from_dict(x) for x in resp.json()]


# --- metrics ---------------------------------------------------------------------------


def test_metrics_are_sampled_over_time_and_filtered(make_stack: Any) -> None:
    stack: Stack = make_stack(metrics_interval_s=0.05)
    stack.add_host()
    sid = create(stack)
    wait_for(lambda: len(series(stack, sid)) >= 4, "four samples")
    samples = series(stack, sid)
    stamps = [m.timestamp for m in samples]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(m.cpu_count == 2 and m.mem_total == 512 * 1024 * 1024 for m in samples)
    assert all(m.mem_cache == 50 * 1024 * 1024 for m in samples)  # kept with each sample
    assert all(m.timestamp_unix == int(m.timestamp.timestamp()) for m in samples)

    # start and end are unix seconds, both included.
    first = samples[0].timestamp_unix
    assert all(m.timestamp_unix <= first for m in series(stack, sid, end=first))
    assert all(m.timestamp_unix >= first + 1 for m in series(stack, sid, start=first + 1))
    assert series(stack, sid, start=0, end=1) == []
    assert "after end" in error(
        stack.admin.get(f"/sandboxes/{sid}/metrics", params={"start": 5, "end": 4}),
        400,
        "invalid_argument",
    )
    error(
        stack.admin.get(f"/sandboxes/{sid}/metrics", params={"start": -1}), 400, "invalid_argument"
    )


def test_sdk_get_metrics_reads_the_series(make_stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stack: Stack = make_stack(metrics_interval_s=0.05)
    stack.add_host()
    monkeypatch.setenv("E2B_API_URL", stack.url)
    monkeypatch.setenv("E2B_API_KEY", stack.admin_key)
    monkeypatch.setenv("E2B_DOMAIN", "wrenn.test")
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    sbx = Sandbox.create()
    try:
        wait_for(lambda: len(sbx.get_metrics()) >= 3, "three samples")
        everything = sbx.get_metrics()
        assert [m.timestamp for m in everything] == sorted(m.timestamp for m in everything)
        assert everything[0].cpu_count == 2 and everything[0].disk_total == 1024**3
        long_ago = datetime(2000, 1, 1, tzinfo=UTC)
        assert Sandbox.get_metrics(sbx.sandbox_id, start=long_ago, end=long_ago) == []
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_the_sampler_skips_paused_sandboxes_and_prunes_old_samples(make_stack: Any) -> None:
    # The background sampler takes a sample at start and then waits an hour; the test runs
    # its own sampler's ticks.
    stack: Stack = make_stack(metrics_interval_s=3600)
    stack.add_host()
    running, paused = create(stack), create(stack)
    assert stack.admin.post(f"/sandboxes/{paused}/pause").status_code == 204
    ctx = stack.cp
    sampler = MetricsSampler(ctx.db, ctx.hosts, ctx.scheduler, interval_s=0.001, retention_s=3600)
    assert stack.run(sampler.tick()) == 1
    assert stack.run(sampler.tick()) == 1
    assert len(series(stack, running)) == 2
    assert series(stack, paused) == []  # a paused sandbox has no current sample either

    pruning = MetricsSampler(ctx.db, ctx.hosts, ctx.scheduler, interval_s=3600, retention_s=1e-6)
    # Sampled within the last half interval: not sampled again, but the old samples go.
    assert stack.run(pruning.tick()) == 0
    # Only the current sample is left to answer with while none is kept.
    assert len(series(stack, running)) == 1
    assert stack.host_of(running).agent.calls.count(("GetSandboxMetrics", paused)) == 0


def test_latest_metrics_of_several_sandboxes(make_stack: Any) -> None:
    stack: Stack = make_stack(metrics_interval_s=0.05)
    stack.add_host()
    mine = [create(stack), create(stack)]
    _, other_key = stack.new_team("other")
    theirs = create(stack, other_key)
    everyone = [*mine, theirs]

    def sampled() -> set[str]:
        async def query() -> set[str]:
            async with stack.cp.db.transaction() as tx:
                return await tx.metrics.sampled_since(datetime(2000, 1, 1, tzinfo=UTC))

        return stack.run(query())

    wait_for(lambda: sampled() >= set(everyone), "a sample of each sandbox")
    resp = stack.admin.get(
        "/sandboxes/metrics", params={"sandbox_ids": ",".join([*everyone, "nope"])}
    )
    assert resp.status_code == 200, resp.text
    found = resp.json()["sandboxes"]
    assert sorted(found) == sorted(mine)  # another team's and unknown ids are left out
    for sid in mine:
        assert SandboxMetric.from_dict(found[sid]).cpu_count == 2

    error(stack.admin.get("/sandboxes/metrics"), 400, "invalid_argument")
    error(
        stack.admin.get("/sandboxes/metrics", params={"sandbox_ids": " , "}),
        400,
        "invalid_argument",
    )
    many = ",".join(f"i{n:019d}" for n in range(101))
    assert "at most 100" in error(
        stack.admin.get("/sandboxes/metrics", params={"sandbox_ids": many}), 400, "invalid_argument"
    )


# --- logs ------------------------------------------------------------------------------


def logs(stack: Stack, sandbox_id: str, **params: int) -> SandboxLogs:
    resp = stack.admin.get(f"/sandboxes/{sandbox_id}/logs", params=params)
    assert resp.status_code == 200, resp.text
    return SandboxLogs.from_dict(resp.json())


def test_logs_come_from_the_host_agent(stack: Stack) -> None:
    sid = create(stack)
    agent = stack.host_of(sid).agent
    agent.log(sid, "envd.started", at_ms=1_700_000_000_000, port="49983")
    agent.log(sid, "ports.forward_failed", level="warn", at_ms=1_700_000_001_000, port="8080")
    agent.log(sid, "watch.failed", level="error", at_ms=1_700_000_002_500)

    got = logs(stack, sid)
    assert [e.message for e in got.log_entries] == [
        "envd.started",
        "ports.forward_failed",
        "watch.failed",
    ]
    assert [e.level.value for e in got.log_entries] == ["info", "warn", "error"]
    assert got.log_entries[0].fields.additional_properties == {"port": "49983"}
    assert got.log_entries[2].timestamp == datetime(2023, 11, 14, 22, 13, 22, 500000, UTC)
    assert [line.timestamp for line in got.logs] == [e.timestamp for e in got.log_entries]
    assert '"event": "envd.started"' in got.logs[0].line

    # start: unix milliseconds, included; limit: the oldest so many.
    assert [e.message for e in logs(stack, sid, start=1_700_000_001_000).log_entries] == [
        "ports.forward_failed",
        "watch.failed",
    ]
    assert [e.message for e in logs(stack, sid, limit=1).log_entries] == ["envd.started"]
    assert logs(stack, sid, limit=0).log_entries == []
    assert logs(stack, sid, start=2**53).log_entries == []
    error(stack.admin.get(f"/sandboxes/{sid}/logs", params={"limit": -1}), 400, "invalid_argument")
    error(stack.admin.get(f"/sandboxes/{sid}/logs", params={"start": "x"}), 400, "invalid_argument")
    error(stack.admin.get("/sandboxes/inope/logs"), 404, "not_found")
    _, other_key = stack.new_team("other")
    error(stack.client(other_key).get(f"/sandboxes/{sid}/logs"), 404, "not_found")


def logs_v2(stack: Stack, sandbox_id: str, **params: int | str) -> list[str]:
    resp = stack.admin.get(f"/v2/sandboxes/{sandbox_id}/logs", params=params)
    assert resp.status_code == 200, resp.text
    return [e.message for e in SandboxLogsV2Response.from_dict(resp.json()).logs]


def test_logs_v2_filter_by_cursor_direction_level_and_search(stack: Stack) -> None:
    sid = create(stack)
    agent = stack.host_of(sid).agent
    agent.log(sid, "envd.started", at_ms=1_700_000_000_000, port="49983")
    agent.log(sid, "ports.forward_failed", level="warn", at_ms=1_700_000_001_000, port="8080")
    agent.log(sid, "process.debug", level="debug", at_ms=1_700_000_001_500)
    agent.log(sid, "watch.failed", level="error", at_ms=1_700_000_002_500)

    everything = ["envd.started", "ports.forward_failed", "process.debug", "watch.failed"]
    assert logs_v2(stack, sid) == everything
    assert logs_v2(stack, sid, direction="backward") == everything[::-1]
    # cursor: unix ms, included; forward from it, backward up to it.
    assert logs_v2(stack, sid, cursor=1_700_000_001_000) == everything[1:]
    assert logs_v2(stack, sid, cursor=1_700_000_001_000, direction="backward") == [
        "ports.forward_failed",
        "envd.started",
    ]
    assert logs_v2(stack, sid, level="warn") == ["ports.forward_failed", "watch.failed"]
    assert logs_v2(stack, sid, level="debug") == everything
    # search: the message or a field's value.
    assert logs_v2(stack, sid, search="failed") == ["ports.forward_failed", "watch.failed"]
    assert logs_v2(stack, sid, search="8080") == ["ports.forward_failed"]
    assert logs_v2(stack, sid, search="nothing like it") == []
    assert logs_v2(stack, sid, limit=1, direction="backward") == ["watch.failed"]
    assert logs_v2(stack, sid, limit=0) == []

    for bad in ({"direction": "sideways"}, {"level": "loud"}, {"cursor": -1}, {"limit": 10_001}):
        message = error(
            stack.admin.get(f"/v2/sandboxes/{sid}/logs", params=bad), 400, "invalid_argument"
        )
        assert next(iter(bad)) in message
    error(stack.admin.get("/v2/sandboxes/inope/logs"), 404, "not_found")
    _, other_key = stack.new_team("other")
    error(stack.client(other_key).get(f"/v2/sandboxes/{sid}/logs"), 404, "not_found")


def test_logs_of_a_paused_sandbox_and_of_a_gone_host(stack: Stack) -> None:
    sid = create(stack)
    host = stack.host_of(sid)
    host.agent.log(sid, "init.restored")
    assert stack.admin.post(f"/sandboxes/{sid}/pause").status_code == 204
    assert [e.message for e in logs(stack, sid).log_entries] == ["init.restored"]

    # A paused sandbox whose host fails to answer: none, not an error.
    host.agent.fail_next["GetSandboxLogs"] = ConnectError(Code.UNAVAILABLE, "agent restarting")
    assert logs(stack, sid).log_entries == []

    # A running one whose host fails is an error the client can retry.
    assert stack.admin.post(f"/sandboxes/{sid}/resume", json={}).status_code == 201
    host.agent.fail_next["GetSandboxLogs"] = ConnectError(Code.UNAVAILABLE, "agent restarting")
    error(stack.admin.get(f"/sandboxes/{sid}/logs"), 503, "unavailable")

    # The host no longer holds it (its agent restarted): none.
    del host.agent.sandboxes[sid]
    assert logs(stack, sid).log_entries == []

    # A silent host is not asked.
    stack.update_host(host.host_id, last_heartbeat_at=datetime(2020, 1, 1, tzinfo=UTC))
    calls = len(host.agent.calls)
    assert logs(stack, sid).log_entries == []
    assert len(host.agent.calls) == calls
