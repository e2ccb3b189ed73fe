"""Scheduler unit tests: pure placement logic over host records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from wrenn.controlplane.db.records import Host, HostLoad, HostStatus
from wrenn.controlplane.scheduler import Demand, NoHostAvailable, Policy, headroom, place

NOW = datetime(2030, 1, 1, tzinfo=UTC)
POLICY = Policy(heartbeat_window=timedelta(seconds=30), cpu_overcommit=1.0)
SMALL = Demand(vcpus=1, memory_mib=512, disk_mib=0)


def host(
    host_id: str,
    *,
    vcpus: int = 8,
    memory_mib: int = 8192,
    memory_free_mib: int | None = None,
    disk_mib: int = 100_000,
    disk_free_mib: int | None = None,
    status: HostStatus = HostStatus.ACTIVE,
    silent_s: float | None = 1.0,
) -> Host:
    return Host(
        id=host_id,
        address=f"http://{host_id}:5007",
        status=status,
        runtime="qemu",
        version="1",
        vcpus=vcpus,
        memory_mib=memory_mib,
        memory_free_mib=memory_mib if memory_free_mib is None else memory_free_mib,
        disk_mib=disk_mib,
        disk_free_mib=disk_mib if disk_free_mib is None else disk_free_mib,
        last_heartbeat_at=None if silent_s is None else NOW - timedelta(seconds=silent_s),
        created_at=NOW - timedelta(days=1),
    )


def load(host_id: str, sandboxes: int, vcpus: int, memory_mib: int) -> HostLoad:
    return HostLoad(host_id=host_id, sandboxes=sandboxes, vcpus=vcpus, memory_mib=memory_mib)


def test_picks_the_host_with_most_headroom() -> None:
    hosts = [host("a"), host("b"), host("c")]
    loads = {"a": load("a", 4, 4, 2048), "b": load("b", 1, 1, 1024), "c": load("c", 2, 6, 512)}
    # a: cpu 3/8, mem 5632/8192 → 0.375; b: cpu 6/8 → 0.75 bottleneck; c: cpu 1/8 → 0.125
    assert place(hosts, loads, SMALL, POLICY, NOW).id == "b"


def test_bottleneck_is_the_scarcest_resource() -> None:
    # cpu-rich but memory-poor host loses to a balanced one.
    hosts = [
        host("cpu-rich", vcpus=64, memory_mib=2048),
        host("balanced", vcpus=8, memory_mib=8192),
    ]
    assert place(hosts, {}, SMALL, POLICY, NOW).id == "balanced"
    assert headroom(hosts[0], None, SMALL, POLICY) == pytest.approx((2048 - 512) / 2048)


def test_observed_memory_use_counts_when_larger_than_committed() -> None:
    busy = host("busy", memory_free_mib=1024)  # something else uses 7 GiB
    idle = host("idle")
    assert place([busy, idle], {}, SMALL, POLICY, NOW).id == "idle"


def test_reserve_is_never_handed_out() -> None:
    policy = Policy(heartbeat_window=timedelta(seconds=30), reserve_memory_mib=7680)
    only = host("only", memory_mib=8192)
    assert place([only], {}, SMALL, policy, NOW).id == "only"  # exactly fits: 512 left
    with pytest.raises(NoHostAvailable, match="without room"):
        place([only], {"only": load("only", 1, 1, 1)}, SMALL, policy, NOW)


def test_cpu_overcommit_multiplies_cpus() -> None:
    h = host("h", vcpus=2)
    full = {"h": load("h", 2, 2, 0)}
    with pytest.raises(NoHostAvailable):
        place([h], full, SMALL, POLICY, NOW)
    policy = Policy(heartbeat_window=timedelta(seconds=30), cpu_overcommit=4.0)
    assert place([h], full, SMALL, policy, NOW).id == "h"


def test_silent_and_draining_hosts_get_nothing() -> None:
    hosts = [
        host("silent", silent_s=31),
        host("never", silent_s=None),
        host("draining", status=HostStatus.DRAINING),
        host("small", memory_mib=1024),
    ]
    assert place(hosts, {}, SMALL, POLICY, NOW).id == "small"
    with pytest.raises(NoHostAvailable) as err:
        place(hosts[:3], {}, SMALL, POLICY, NOW)
    assert "1 draining" in err.value.message
    assert "2 silent past the heartbeat window" in err.value.message


def test_no_hosts_is_a_clear_503() -> None:
    with pytest.raises(NoHostAvailable, match="no hosts registered") as err:
        place([], {}, SMALL, POLICY, NOW)
    assert err.value.http_status == 503
    assert err.value.code.value == "resource_exhausted"


def test_pinned_sandbox_goes_to_its_host_even_with_less_room() -> None:
    hosts = [host("roomy", memory_mib=65536), host("store", memory_mib=4096)]
    chosen = place(hosts, {}, SMALL, POLICY, NOW, pinned_host_id="store", pinned_reason="snap s1")
    assert chosen.id == "store"


@pytest.mark.parametrize(
    ("pinned", "why"),
    [
        (host("store", status=HostStatus.DRAINING), "draining"),
        (host("store", silent_s=300), "silent"),
        (host("store", memory_mib=256), "without room"),
    ],
)
def test_pinned_host_unavailable_fails_instead_of_moving(pinned: Host, why: str) -> None:
    hosts = [host("roomy"), pinned]
    with pytest.raises(NoHostAvailable, match=why) as err:
        place(hosts, {}, SMALL, POLICY, NOW, pinned_host_id="store", pinned_reason="snapshot s1")
    assert "snapshot s1" in err.value.message


def test_pinned_to_unknown_host() -> None:
    with pytest.raises(NoHostAvailable, match="gone"):
        place([host("a")], {}, SMALL, POLICY, NOW, pinned_host_id="x", pinned_reason="snapshot")


def test_host_without_reported_capacity_is_skipped() -> None:
    blank = host("blank", vcpus=0, memory_mib=0, disk_mib=0)
    with pytest.raises(NoHostAvailable, match="no capacity reported"):
        place([blank], {}, SMALL, POLICY, NOW)


def test_ties_break_by_fewer_sandboxes_then_id() -> None:
    hosts = [host("b"), host("a"), host("c")]
    # identical headroom (committed memory equal), different sandbox counts
    loads = {h.id: load(h.id, n, 0, 1024) for h, n in zip(hosts, (1, 3, 1), strict=True)}
    assert place(hosts, loads, SMALL, POLICY, NOW).id == "b"
    assert place(hosts, {}, SMALL, POLICY, NOW).id == "a"


def test_disk_counts_each_sandbox_growth_allowance() -> None:
    policy = Policy(heartbeat_window=timedelta(seconds=30), sandbox_disk_mib=1000)
    h = host("h", disk_mib=3000)
    demand = Demand(vcpus=1, memory_mib=1, disk_mib=1000)
    assert place([h], {"h": load("h", 2, 0, 0)}, demand, policy, NOW).id == "h"
    with pytest.raises(NoHostAvailable):
        place([h], {"h": load("h", 3, 0, 0)}, demand, policy, NOW)
