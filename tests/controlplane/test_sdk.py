"""The official e2b SDK (not debug mode), configured only through its environment variables,
driving the control plane and a FakeHostAgent: create, list with a metadata filter,
set_timeout, get_info, pause/connect, kill. Commands need a real envd and are not used here."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState

from tests.controlplane.conftest import Stack


@pytest.fixture
def sdk_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("E2B_API_URL", stack.url)
    monkeypatch.setenv("E2B_API_KEY", stack.admin_key)
    monkeypatch.setenv("E2B_DOMAIN", "wrenn.test")
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_SANDBOX_URL", raising=False)
    yield stack


def test_sdk_create_list_timeout_info_kill(sdk_env: Stack) -> None:
    sbx = Sandbox.create(timeout=120, metadata={"suite": "sdk", "n": "1"}, envs={"A": "b"})
    other = Sandbox.create(metadata={"suite": "other"})
    try:
        host = sdk_env.host_of(sbx.sandbox_id)
        fake = host.agent.sandboxes[sbx.sandbox_id]
        assert fake.env_vars == {"A": "b"}
        assert fake.envd_access_token  # the SDK got the same token to talk to envd
        assert sbx.sandbox_domain == "wrenn.test"

        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"suite": "sdk", "n": "1"}
        assert info.state == SandboxState.RUNNING
        assert info.cpu_count == 2 and info.memory_mb == 512
        assert info.end_at - info.started_at == timedelta(seconds=120)

        found = Sandbox.list(query=SandboxQuery(metadata={"suite": "sdk"})).next_items()
        assert [s.sandbox_id for s in found] == [sbx.sandbox_id]

        sbx.set_timeout(3600)
        after = sbx.get_info()
        assert after.end_at > datetime.now(UTC) + timedelta(seconds=3500)

        assert sbx.kill() is True
        assert sbx.sandbox_id not in host.agent.sandboxes
        assert Sandbox.kill(sbx.sandbox_id) is False  # already gone: 404 → False
        remaining = Sandbox.list().next_items()
        assert [s.sandbox_id for s in remaining] == [other.sandbox_id]
    finally:
        for s in (sbx, other):
            Sandbox.kill(s.sandbox_id)


def test_sdk_pagination_and_state_filter(sdk_env: Stack) -> None:
    ids = [Sandbox.create(metadata={"page": "yes"}).sandbox_id for _ in range(5)]
    try:
        Sandbox.pause(ids[0])
        paginator = Sandbox.list(query=SandboxQuery(metadata={"page": "yes"}), limit=2)
        seen: list[str] = []
        pages = 0
        while paginator.has_next:
            seen += [s.sandbox_id for s in paginator.next_items()]
            pages += 1
        assert sorted(seen) == sorted(ids)
        assert pages == 3
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [ids[0]]
        assert paused[0].state == SandboxState.PAUSED

        resumed = Sandbox.connect(ids[0])
        assert resumed.get_info().state == SandboxState.RUNNING
    finally:
        for sid in ids:
            Sandbox.kill(sid)


def test_sdk_snapshots_and_metrics(sdk_env: Stack) -> None:
    sbx = Sandbox.create()
    try:
        metrics = sbx.get_metrics()
        assert len(metrics) == 1 and metrics[0].cpu_count == 2

        snap = sbx.create_snapshot(name="golden")
        assert snap.names == ["golden"]
        host = sdk_env.host_of(sbx.sandbox_id)
        assert snap.snapshot_id in host.agent.snapshots

        listed = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        by_name = Sandbox.list_snapshots(name="golden").next_items()
        assert [s.snapshot_id for s in by_name] == [snap.snapshot_id]

        child = Sandbox.create(template="golden")
        try:
            assert host.agent.sandboxes[child.sandbox_id].snapshot_id == snap.snapshot_id
        finally:
            child.kill()

        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert snap.snapshot_id not in host.agent.snapshots
        assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    finally:
        sbx.kill()
