"""Placement: which host a sandbox goes to. Pure logic over host records and committed load.

A host is a candidate when it is active (not draining) and heard from within the heartbeat
window. For each resource the headroom left after placing the sandbox is a fraction of what the
host can give (capacity less its reserve); a host's score is its bottleneck — the smallest of
the CPU, memory and disk fractions — and the sandbox goes to the candidate with the largest
score that stays non-negative. A sandbox that must run where its data is (a snapshot stored on
one host, a paused sandbox's disk) is pinned to that host and fails rather than move. A sandbox
of a template goes only to a host that reported that template in its latest heartbeat; when no
host has it the create is refused (``Conflict``, naming the template) rather than sent to
a host that would have to answer "not found"; when only hosts that cannot take it now (silent,
draining, full) have it, ``NoHostAvailable`` says so, naming the template.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from wrenn.controlplane.db.records import Host, HostLoad, HostStatus
from wrenn.controlplane.errors import Conflict, NoHostAvailable

__all__ = [
    "Demand",
    "NoHostAvailable",
    "Policy",
    "Scheduler",
    "TemplateOnHosts",
    "headroom",
    "is_live",
    "place",
]


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mib: int
    disk_mib: int


@dataclass(frozen=True)
class TemplateOnHosts:
    """The template a sandbox starts from and the hosts that have it."""

    template_id: str
    host_ids: Collection[str]


@dataclass(frozen=True)
class Policy:
    heartbeat_window: timedelta
    reserve_vcpus: float = 0.0
    reserve_memory_mib: int = 0
    reserve_disk_mib: int = 0
    #: vCPUs handed out per host CPU.
    cpu_overcommit: float = 1.0
    #: Disk each placed sandbox is counted for.
    sandbox_disk_mib: int = 0


def is_live(host: Host, now: datetime, policy: Policy) -> bool:
    return host.last_heartbeat_at is not None and (
        now - host.last_heartbeat_at <= policy.heartbeat_window
    )


def _fraction(capacity: float, reserve: float, used: float, demand: float) -> float | None:
    usable = capacity - reserve
    if usable <= 0:
        return None
    return (usable - used - demand) / usable


def headroom(host: Host, load: HostLoad | None, demand: Demand, policy: Policy) -> float | None:
    """The bottleneck fraction left on ``host`` after placing ``demand``; ``None`` when the
    host cannot say (no capacity reported yet)."""
    placed = load.sandboxes if load else 0
    used_vcpus = load.vcpus if load else 0
    # Memory and disk: the larger of what we committed and what the host sees in use.
    used_memory = max(load.memory_mib if load else 0, host.memory_mib - host.memory_free_mib)
    used_disk = max(placed * policy.sandbox_disk_mib, host.disk_mib - host.disk_free_mib)
    fractions = (
        _fraction(
            host.vcpus * policy.cpu_overcommit, policy.reserve_vcpus, used_vcpus, demand.vcpus
        ),
        _fraction(host.memory_mib, policy.reserve_memory_mib, used_memory, demand.memory_mib),
        _fraction(host.disk_mib, policy.reserve_disk_mib, used_disk, demand.disk_mib),
    )
    if any(f is None for f in fractions):
        return None
    return min(f for f in fractions if f is not None)


def _why_not(
    host: Host, load: HostLoad | None, demand: Demand, policy: Policy, now: datetime
) -> str:
    if host.status is HostStatus.DRAINING:
        return "draining"
    if not is_live(host, now, policy):
        return "silent past the heartbeat window"
    score = headroom(host, load, demand, policy)
    if score is None:
        return "no capacity reported"
    if score < 0:
        return "without room"
    return ""


def place(
    hosts: Sequence[Host],
    loads: Mapping[str, HostLoad],
    demand: Demand,
    policy: Policy,
    now: datetime,
    *,
    pinned_host_id: str | None = None,
    pinned_reason: str = "",
    template: TemplateOnHosts | None = None,
) -> Host:
    """The host ``demand`` goes to, or ``NoHostAvailable`` saying why none fits. ``template``:
    only hosts that have it are candidates (``Conflict`` when no host has it)."""
    size = f"{demand.vcpus} vCPU, {demand.memory_mib} MiB"
    if pinned_host_id is None and template is not None and hosts:
        hosts = [h for h in hosts if h.id in template.host_ids]
        if not hosts:
            raise Conflict(
                f"template {template.template_id!r} is on no host: none reported it in its "
                "latest heartbeat"
            )
        size += f" of template {template.template_id!r}"
    if pinned_host_id is not None:
        host = next((h for h in hosts if h.id == pinned_host_id), None)
        if host is None:
            raise NoHostAvailable(f"host {pinned_host_id} holding {pinned_reason} is gone")
        why = _why_not(host, loads.get(host.id), demand, policy, now)
        if why:
            raise NoHostAvailable(
                f"host {host.id} holding {pinned_reason} cannot take a sandbox ({size}): {why}"
            )
        return host

    best: tuple[float, int, str] | None = None
    chosen: Host | None = None
    reasons: dict[str, int] = {}
    for host in hosts:
        load = loads.get(host.id)
        why = _why_not(host, load, demand, policy, now)
        if why:
            reasons[why] = reasons.get(why, 0) + 1
            continue
        score = headroom(host, load, demand, policy)
        assert score is not None
        # Most headroom first; then fewer sandboxes; then id, so placement is deterministic.
        key = (-score, load.sandboxes if load else 0, host.id)
        if best is None or key < best:
            best, chosen = key, host
    if chosen is None:
        if not hosts:
            raise NoHostAvailable(f"no host can take a sandbox ({size}): no hosts registered")
        detail = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        raise NoHostAvailable(f"no host can take a sandbox ({size}): {detail}")
    return chosen


class Scheduler:
    """The placement policy of this process, and the lock that serializes placements in it so
    two placements cannot both take a host's last room."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def placing(self) -> AsyncIterator[None]:
        """Hold while choosing a host and recording the sandbox on it."""
        async with self._lock:
            yield

    def is_live(self, host: Host, now: datetime | None = None) -> bool:
        return is_live(host, now or datetime.now(UTC), self.policy)

    def place(
        self,
        hosts: Sequence[Host],
        loads: Mapping[str, HostLoad],
        demand: Demand,
        *,
        pinned_host_id: str | None = None,
        pinned_reason: str = "",
        template: TemplateOnHosts | None = None,
    ) -> Host:
        return place(
            hosts,
            loads,
            demand,
            self.policy,
            datetime.now(UTC),
            pinned_host_id=pinned_host_id,
            pinned_reason=pinned_reason,
            template=template,
        )
