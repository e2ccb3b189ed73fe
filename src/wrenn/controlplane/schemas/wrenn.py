"""Bodies of Wrenn's own API under /v1 (hosts, teams and API keys, named snapshots, audit,
webhook channels)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from wrenn.controlplane.events import EventType
from wrenn.controlplane.schemas.e2b import Ref, Text


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) <= len("http://"):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


HttpUrl = Annotated[str, Field(max_length=512), AfterValidator(_http_url)]
Name = Annotated[Text, Field(min_length=1, max_length=128)]
Mib = Annotated[int, Field(ge=0, le=2**40)]


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


# --- hosts ------------------------------------------------------------------------------


class HostToken(_Model):
    token: str
    expires_at: datetime = Field(serialization_alias="expiresAt")


class HostRegistration(_Model):
    token: Annotated[Text, Field(min_length=1, max_length=256)]
    #: Base URL the control plane reaches the host agent at, e.g. ``http://10.0.0.5:5007``.
    address: HttpUrl


class RegisteredHost(_Model):
    host_id: str = Field(serialization_alias="hostID")
    host_secret: str = Field(serialization_alias="hostSecret")


class ReportedTemplate(_Model):
    template_id: Ref = Field(alias="templateID")
    build_id: Annotated[Text, Field(max_length=64)] = Field(alias="buildID")
    cpu_count: Annotated[int, Field(ge=1, le=1024)] = Field(alias="cpuCount")
    memory_mb: Annotated[int, Field(ge=1, le=2**31 - 1)] = Field(alias="memoryMB")
    disk_size_mb: Mib = Field(default=0, alias="diskSizeMB")
    envd_version: Annotated[Text, Field(max_length=32)] = Field(default="", alias="envdVersion")


class Heartbeat(_Model):
    runtime: Annotated[Text, Field(max_length=32)] = ""
    version: Annotated[Text, Field(max_length=64)] = ""
    cpu_count: Annotated[int, Field(ge=0, le=2**20)] = Field(alias="cpuCount")
    memory_mb: Mib = Field(alias="memoryMB")
    memory_free_mb: Mib = Field(alias="memoryFreeMB")
    disk_size_mb: Mib = Field(alias="diskSizeMB")
    disk_free_mb: Mib = Field(alias="diskFreeMB")
    templates: Annotated[list[ReportedTemplate], Field(max_length=10_000)] = Field(
        default_factory=list
    )


class HeartbeatAck(_Model):
    host_id: str = Field(serialization_alias="hostID")
    status: str


class HostOut(_Model):
    host_id: str = Field(serialization_alias="hostID")
    address: str
    status: str
    live: bool
    runtime: str
    version: str
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    memory_free_mb: int = Field(serialization_alias="memoryFreeMB")
    disk_size_mb: int = Field(serialization_alias="diskSizeMB")
    disk_free_mb: int = Field(serialization_alias="diskFreeMB")
    sandboxes: int
    last_heartbeat_at: datetime | None = Field(serialization_alias="lastHeartbeatAt")
    created_at: datetime = Field(serialization_alias="createdAt")


# --- teams and keys ---------------------------------------------------------------------


class NewTeam(_Model):
    name: Name


class TeamOut(_Model):
    team_id: str = Field(serialization_alias="teamID")
    name: str
    is_admin: bool = Field(serialization_alias="isAdmin")
    created_at: datetime = Field(serialization_alias="createdAt")


class NewApiKey(_Model):
    name: Name = "default"


class ApiKeyOut(_Model):
    key_id: str = Field(serialization_alias="keyID")
    team_id: str = Field(serialization_alias="teamID")
    name: str
    prefix: str
    created_at: datetime = Field(serialization_alias="createdAt")
    revoked_at: datetime | None = Field(default=None, serialization_alias="revokedAt")
    last_used_at: datetime | None = Field(default=None, serialization_alias="lastUsedAt")


class CreatedApiKey(ApiKeyOut):
    #: The secret; shown in this response only.
    key: str


# --- snapshots --------------------------------------------------------------------------


class NewSnapshot(_Model):
    sandbox_id: Annotated[Text, Field(min_length=1, max_length=64)] = Field(alias="sandboxID")
    name: Ref | None = None


class SnapshotOut(_Model):
    snapshot_id: str = Field(serialization_alias="snapshotID")
    name: str | None
    sandbox_id: str | None = Field(serialization_alias="sandboxID")
    template_id: str = Field(serialization_alias="templateID")
    host_id: str | None = Field(serialization_alias="hostID")
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    size_bytes: int = Field(serialization_alias="sizeBytes")
    created_at: datetime = Field(serialization_alias="createdAt")


# --- audit ------------------------------------------------------------------------------


class AuditEntryOut(_Model):
    id: int
    time: datetime
    team_id: str | None = Field(serialization_alias="teamID")
    actor: str | None
    action: str
    target_type: str = Field(serialization_alias="targetType")
    target_id: str = Field(serialization_alias="targetID")
    result: str
    details: dict[str, Any]


# --- webhook channels -------------------------------------------------------------------

EVENT_TYPES = tuple(kind.value for kind in EventType)
EVENT_PATTERNS = frozenset({*EVENT_TYPES, "*", "sandbox.*", "host.*"})


def _event_pattern(value: str) -> str:
    if value not in EVENT_PATTERNS:
        raise ValueError(f"must be one of {', '.join(sorted(EVENT_PATTERNS))}")
    return value


def _webhook_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, ValueError) as err:
        raise ValueError("must be an http:// or https:// URL") from err
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


WebhookUrl = Annotated[Text, Field(max_length=2048), AfterValidator(_webhook_url)]
EventPattern = Annotated[str, AfterValidator(_event_pattern)]
EventFilter = Annotated[list[EventPattern], Field(max_length=32)]


class NewChannel(_Model):
    url: WebhookUrl
    name: Name = "webhook"
    #: Event types, ``sandbox.*``, ``host.*`` or ``*``; empty or left out: every event.
    events: EventFilter = Field(default_factory=list)


class ChannelUpdate(_Model):
    url: WebhookUrl | None = None
    name: Name | None = None
    events: EventFilter | None = None
    enabled: bool | None = None


class ChannelOut(_Model):
    channel_id: str = Field(serialization_alias="channelID")
    team_id: str = Field(serialization_alias="teamID")
    name: str
    url: str
    events: list[str]
    enabled: bool
    created_at: datetime = Field(serialization_alias="createdAt")
    updated_at: datetime = Field(serialization_alias="updatedAt")


class CreatedChannel(ChannelOut):
    #: The signing secret; shown in this response only.
    secret: str


class DeliveryOut(_Model):
    delivery_id: int = Field(serialization_alias="deliveryID")
    event_id: str = Field(serialization_alias="eventID")
    event_type: str = Field(serialization_alias="eventType")
    status: str
    attempts: int
    last_status: int | None = Field(serialization_alias="lastStatus")
    last_error: str | None = Field(serialization_alias="lastError")
    next_attempt_at: datetime = Field(serialization_alias="nextAttemptAt")
    created_at: datetime = Field(serialization_alias="createdAt")
    delivered_at: datetime | None = Field(serialization_alias="deliveredAt")
