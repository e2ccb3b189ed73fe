"""What the repositories hand out: plain frozen dataclasses (named tuples where a listing makes
hundreds at once), never database rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, NamedTuple, TypeVar


class SandboxState(StrEnum):
    """A sandbox's state as the control plane records it.

    starting → running → pausing → paused → resuming → running; any → stopping → killed;
    starting/resuming → failed. Only running and paused (with their transitional states
    folded in) are visible through the E2B API: a sandbox being killed is gone for it already
    (only a kill retried finds it).
    """

    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPING = "stopping"
    KILLED = "killed"
    FAILED = "failed"


#: States in which a sandbox holds (or is about to hold) a host's CPU and memory.
ACTIVE_STATES = frozenset(
    {SandboxState.STARTING, SandboxState.RUNNING, SandboxState.PAUSING, SandboxState.RESUMING}
)
#: States a client can see; sandboxes being killed, killed and failed are gone for the API
#: (GET, lists and metrics agree: a listing never omits what a GET still shows).
VISIBLE_STATES = frozenset(
    {
        SandboxState.STARTING,
        SandboxState.RUNNING,
        SandboxState.PAUSING,
        SandboxState.PAUSED,
        SandboxState.RESUMING,
    }
)


class HostStatus(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    is_admin: bool
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: str
    team_id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the team an API key belongs to."""

    team: Team
    key_id: str


@dataclass(frozen=True)
class Host:
    id: str
    address: str
    status: HostStatus
    runtime: str
    version: str
    vcpus: int
    memory_mib: int
    memory_free_mib: int
    disk_mib: int
    disk_free_mib: int
    last_heartbeat_at: datetime | None
    created_at: datetime
    #: When the host was found silent past the heartbeat window (``host.down``); cleared by
    #: its next heartbeat (``host.up``).
    down_at: datetime | None = None


@dataclass(frozen=True)
class HostLoad:
    """What the control plane has committed on a host: its active sandboxes."""

    host_id: str
    sandboxes: int
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class Template:
    id: str
    team_id: str | None
    build_id: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    envd_version: str
    public: bool
    spawn_count: int
    last_spawned_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Sandbox:
    id: str
    team_id: str
    host_id: str | None
    template_id: str
    alias: str | None
    snapshot_id: str | None
    state: SandboxState
    vcpus: int
    memory_mib: int
    disk_mib: int
    envd_version: str
    envd_access_token: str
    allow_internet_access: bool | None
    auto_pause: bool
    auto_resume: bool
    build_id: str | None
    started_at: datetime
    end_at: datetime
    created_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    #: Required (``e2b-traffic-access-token``) on ports other than envd's when the sandbox
    #: was created without public traffic; ``None``: its ports are public.
    traffic_access_token: str | None = None
    ended_at: datetime | None = None
    #: Destinations the guest may always / never reach (normalised IPv4 CIDR blocks).
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    #: The guest's address on its host, as the host's agent gave it when the sandbox last
    #: started or resumed (the proxy may dial it there); empty: none known.
    guest_address: str = ""


class SandboxSummary(NamedTuple):
    """A sandbox as the listings show it: a tuple, since a page holds up to a thousand."""

    id: str
    template_id: str
    alias: str | None
    host_id: str | None
    state: SandboxState
    vcpus: int
    memory_mib: int
    disk_mib: int
    envd_version: str
    started_at: datetime
    end_at: datetime
    #: The metadata as the text of a JSON object of strings, as stored.
    metadata_json: str


@dataclass(frozen=True)
class Snapshot:
    id: str
    team_id: str
    name: str | None
    sandbox_id: str | None
    template_id: str
    host_id: str | None
    vcpus: int
    memory_mib: int
    size_bytes: int
    created_at: datetime
    #: Taken for a fork: hidden from the API, deleted once no sandbox started from it is left.
    for_fork: bool = False


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str | None


@dataclass(frozen=True)
class Capacity:
    """What a host reports in its heartbeat."""

    runtime: str
    version: str
    vcpus: int
    memory_mib: int
    memory_free_mib: int
    disk_mib: int
    disk_free_mib: int


@dataclass(frozen=True)
class TemplateReport:
    """A template a host reports having."""

    id: str
    build_id: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    envd_version: str = ""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: datetime
    team_id: str | None
    actor: str | None
    action: str
    target_type: str
    target_id: str
    result: str
    details: dict[str, Any]


@dataclass(frozen=True)
class AuditQuery:
    team_id: str | None = None
    actor: str | None = None
    action: str | None = None
    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    #: Entries older than this id (the cursor of the previous page).
    before_id: int | None = None


@dataclass(frozen=True)
class Channel:
    """A webhook channel: where a team's events go and which ones."""

    id: str
    team_id: str
    name: str
    url: str
    #: Event types or ``prefix.*`` patterns; empty means every event.
    events: list[str]
    enabled: bool
    created_at: datetime
    updated_at: datetime


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Delivery:
    id: int
    channel_id: str
    event_id: str
    event_type: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class MetricSample:
    """A sandbox's usage at one moment, as its host's agent measured it."""

    sandbox_id: str
    sampled_at: datetime
    cpu_count: int
    cpu_used_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    #: The guest's page cache (0 in samples taken before it was recorded).
    mem_cache_bytes: int = 0


@dataclass(frozen=True)
class IdempotentRequest:
    """A request made with an ``Idempotency-Key``: what it was (``fingerprint``) and, once it
    finished, the response it got."""

    team_id: str
    key: str
    fingerprint: str
    #: ``None`` while the first request is still being served.
    status_code: int | None
    response: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime
