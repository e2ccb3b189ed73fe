"""Request and response bodies of the E2B-compatible API, field for field as the e2b SDK's
models (``e2b.api.client.models``) read and write them. Field names follow E2B's JSON (mostly
camelCase, with its exceptions such as ``allow_internet_access`` in create requests)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from wrenn.controlplane.sandboxes import MAX_FORKS

MAX_METADATA_ENTRIES = 64
MAX_ENV_VARS = 256
#: Upper bound of any duration field, before the configured ``max_timeout_s`` applies.
MAX_SECONDS = 10 * 365 * 24 * 3600


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
MetadataKey = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_no_nul)]
MetadataValue = Annotated[str, Field(max_length=4096), AfterValidator(_no_nul)]
EnvName = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_no_nul)]
EnvValue = Annotated[str, Field(max_length=128 * 1024), AfterValidator(_no_nul)]
Ref = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]
Seconds = Annotated[int, Field(ge=0, le=MAX_SECONDS)]

Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_ENTRIES)]
EnvVars = Annotated[dict[EnvName, EnvValue], Field(max_length=MAX_ENV_VARS)]


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class SandboxState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"


class OnTimeout(StrEnum):
    KILL = "kill"
    PAUSE = "pause"


# --- requests ---------------------------------------------------------------------------


class AutoResumeConfig(_Model):
    enabled: bool


class NewSandbox(_Model):
    """POST /sandboxes and POST /v2/sandboxes."""

    template_id: Ref = Field(alias="templateID")
    timeout: Seconds | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")
    auto_pause_memory: bool | None = Field(default=None, alias="autoPauseMemory")
    auto_resume: AutoResumeConfig | None = Field(default=None, alias="autoResume")
    secure: bool | None = None
    allow_internet_access: bool | None = None
    metadata: Metadata | None = None
    env_vars: EnvVars | None = Field(default=None, alias="envVars")
    # Accepted so their presence can be refused by name (see routes.sandboxes).
    network: dict[str, object] | None = None
    mcp: dict[str, object] | None = None
    iam: dict[str, object] | None = None
    volume_mounts: list[dict[str, object]] | None = Field(default=None, alias="volumeMounts")


class NetworkUpdate(_Model):
    """PUT /sandboxes/{sandboxID}/network: the sandbox's egress from now on; a field left
    out is cleared (no entries; internet access on)."""

    allow_out: list[str] | None = Field(default=None, alias="allowOut")
    deny_out: list[str] | None = Field(default=None, alias="denyOut")
    dns_servers: list[str] | None = Field(default=None, alias="dnsServers")
    allow_internet_access: bool | None = Field(default=None, alias="allowInternetAccess")
    # Accepted so their presence can be refused by name (see routes.sandboxes).
    egress_proxy: dict[str, object] | None = Field(default=None, alias="egressProxy")
    rules: dict[str, object] | None = None


class TimeoutRequest(_Model):
    timeout: Seconds


class RefreshRequest(_Model):
    duration: Seconds | None = None


class PauseRequest(_Model):
    memory: bool | None = None
    require_healthy_guest: bool | None = Field(default=None, alias="requireHealthyGuest")


class ResumeRequest(_Model):
    timeout: Seconds | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")
    memory: bool | None = None


class ConnectRequest(_Model):
    """Both /sandboxes/{id}/connect (timeout required by the SDK model) and the /v2 one."""

    timeout: Seconds | None = None
    memory: bool | None = None


class SnapshotRequest(_Model):
    name: Ref | None = None
    memory: bool | None = None


class ForkRequest(_Model):
    timeout: Seconds = 15
    count: Annotated[int, Field(ge=1, le=MAX_FORKS)] = 1


# --- responses --------------------------------------------------------------------------


class Sandbox(_Model):
    template_id: str = Field(serialization_alias="templateID")
    sandbox_id: str = Field(serialization_alias="sandboxID")
    client_id: str = Field(serialization_alias="clientID")
    envd_version: str = Field(serialization_alias="envdVersion")
    alias: str | None = None
    envd_access_token: str | None = Field(default=None, serialization_alias="envdAccessToken")
    traffic_access_token: str | None = Field(default=None, serialization_alias="trafficAccessToken")
    domain: str | None = None


class ForkError(_Model):
    """Why one fork did not start: ``code`` is the HTTP status the error has elsewhere
    (what the e2b SDK reads from a fork's result)."""

    code: int
    message: str


class ForkResult(_Model):
    """One requested fork: exactly one of ``sandbox`` and ``error``."""

    sandbox: Sandbox | None = None
    error: ForkError | None = None


class Lifecycle(_Model):
    auto_resume: bool = Field(serialization_alias="autoResume")
    on_timeout: OnTimeout = Field(serialization_alias="onTimeout")


class ListedSandbox(_Model):
    template_id: str = Field(serialization_alias="templateID")
    alias: str | None = None
    sandbox_id: str = Field(serialization_alias="sandboxID")
    client_id: str = Field(serialization_alias="clientID")
    started_at: datetime = Field(serialization_alias="startedAt")
    end_at: datetime = Field(serialization_alias="endAt")
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    disk_size_mb: int = Field(serialization_alias="diskSizeMB")
    metadata: dict[str, str] = Field(default_factory=dict)
    state: SandboxState
    envd_version: str = Field(serialization_alias="envdVersion")


class SandboxDetail(ListedSandbox):
    envd_access_token: str | None = Field(default=None, serialization_alias="envdAccessToken")
    allow_internet_access: bool | None = Field(
        default=None, serialization_alias="allowInternetAccess"
    )
    domain: str | None = None
    lifecycle: Lifecycle | None = None
    #: ``allowPublicTraffic``, ``allowOut`` and ``denyOut`` as they are now.
    network: dict[str, object] | None = None


class SnapshotInfo(_Model):
    snapshot_id: str = Field(serialization_alias="snapshotID")
    names: list[str]


class SandboxMetric(_Model):
    timestamp: datetime
    timestamp_unix: int = Field(serialization_alias="timestampUnix")
    cpu_count: int = Field(serialization_alias="cpuCount")
    cpu_used_pct: float = Field(serialization_alias="cpuUsedPct")
    mem_used: int = Field(serialization_alias="memUsed")
    mem_total: int = Field(serialization_alias="memTotal")
    mem_cache: int = Field(serialization_alias="memCache")
    disk_used: int = Field(serialization_alias="diskUsed")
    disk_total: int = Field(serialization_alias="diskTotal")


class SandboxesWithMetrics(_Model):
    """``GET /sandboxes/metrics``: the latest sample of each sandbox asked for that has one."""

    sandboxes: dict[str, SandboxMetric]


class SandboxLog(_Model):
    timestamp: datetime
    line: str


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class SandboxLogEntry(_Model):
    timestamp: datetime
    level: LogLevel
    message: str
    fields: dict[str, str]


class SandboxLogs(_Model):
    logs: list[SandboxLog]
    log_entries: list[SandboxLogEntry] = Field(serialization_alias="logEntries")


class SandboxLogsV2(_Model):
    logs: list[SandboxLogEntry]


class LogsDirection(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"


class Template(_Model):
    template_id: str = Field(serialization_alias="templateID")
    build_id: str = Field(serialization_alias="buildID")
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    disk_size_mb: int = Field(serialization_alias="diskSizeMB")
    public: bool
    aliases: list[str]
    names: list[str]
    created_at: datetime = Field(serialization_alias="createdAt")
    updated_at: datetime = Field(serialization_alias="updatedAt")
    created_by: None = Field(default=None, serialization_alias="createdBy")
    last_spawned_at: datetime | None = Field(default=None, serialization_alias="lastSpawnedAt")
    spawn_count: int = Field(serialization_alias="spawnCount")
    build_count: int = Field(serialization_alias="buildCount")
    envd_version: str = Field(serialization_alias="envdVersion")
    build_status: str = Field(default="ready", serialization_alias="buildStatus")


class TemplateBuild(_Model):
    build_id: str = Field(serialization_alias="buildID")
    status: str = "ready"
    created_at: datetime = Field(serialization_alias="createdAt")
    updated_at: datetime = Field(serialization_alias="updatedAt")
    finished_at: datetime | None = Field(default=None, serialization_alias="finishedAt")
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    disk_size_mb: int = Field(serialization_alias="diskSizeMB")
    envd_version: str = Field(serialization_alias="envdVersion")


class TemplateWithBuilds(Template):
    builds: list[TemplateBuild]
