"""Control plane settings, read once from ``WRENN_CP_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WRENN_CP_")

    host: str = "127.0.0.1"
    port: int = 3000
    log_level: str = "info"
    #: Where the embedded SQLite database lives when ``database_url`` is not set.
    state_dir: Path = Path("/var/lib/wrenn/controlplane")
    #: SQLAlchemy URL: ``sqlite+aiosqlite:///path.db`` or ``postgresql+asyncpg://user@host/db``.
    #: Empty: a SQLite file under ``state_dir``.
    database_url: str = ""
    #: Base domain sandbox traffic is reachable under (``{port}-{sandbox_id}.{domain}``);
    #: returned to clients as ``domain``. Empty: clients use their own default.
    domain: str = ""
    #: A host silent for longer than this gets no new sandboxes.
    heartbeat_window_s: float = Field(default=30.0, gt=0)
    #: How often the lifecycle worker looks for expired sandboxes.
    lifecycle_interval_s: float = Field(default=1.0, gt=0)
    #: Timeout of a sandbox created without one (E2B: 15 s on /sandboxes, 300 s on /v2).
    default_timeout_s: int = Field(default=300, ge=0)
    #: Upper bound of any timeout a client asks for.
    max_timeout_s: int = Field(default=24 * 3600, ge=1)
    #: Kept free on every host, never given to sandboxes.
    reserve_vcpus: float = Field(default=0.0, ge=0)
    reserve_memory_mib: int = Field(default=512, ge=0)
    reserve_disk_mib: int = Field(default=2048, ge=0)
    #: vCPUs handed out per physical CPU of a host.
    cpu_overcommit: float = Field(default=4.0, gt=0)
    #: Disk a sandbox is expected to grow its copy-on-write layer to.
    sandbox_disk_mib: int = Field(default=1024, ge=0)
    #: Deadline of one RPC to a host agent.
    agent_timeout_s: float = Field(default=120.0, gt=0)
    #: Lifetime of a one-time host registration token.
    host_token_ttl_s: int = Field(default=3600, ge=1)
    #: On first start with an empty database, create an admin team and print its API key.
    bootstrap: bool = True

    # --- sandbox proxy ---
    #: Port of the sandbox proxy (``E2b-Sandbox-Id`` header or ``{port}-{id}.{domain}`` Host);
    #: 0: none of its own. The API port routes such requests to the proxy as well.
    proxy_port: int = Field(default=3001, ge=0, le=65535)
    #: Bound on connecting to a host agent's forwarding path (then 502, never a hang).
    proxy_connect_timeout_s: float = Field(default=5.0, gt=0)
    #: How long a request waits for a starting or resuming sandbox (incl. auto-resume).
    proxy_resume_wait_s: float = Field(default=60.0, gt=0)
    #: Dial a sandbox's guest directly when its host agent runs on this machine in this
    #: network namespace (``guestdial``: one relay instead of two); else, and when false,
    #: every request goes through the agent's forwarding path.
    proxy_dial_guests: bool = True
    #: Move long response bodies (4 MiB and more) from an upstream on this machine (an agent
    #: beside the control plane) to the client's socket in the kernel (a BPF sockmap
    #: redirect, ``core/http1/sockmap``: needs root) instead of through this process; the
    #: proxy copies where the kernel cannot. From a peer elsewhere (a guest, a remote agent)
    #: they are spliced in batches (``core/http1/wire.BATCH_S``).
    proxy_redirect_in_kernel: bool = True
    #: How long the proxy trusts what it looked up about a sandbox (changes made by this
    #: process are seen at once; other replicas' after at most this).
    proxy_cache_s: float = Field(default=1.0, ge=0)
    #: How long an authenticated API key is trusted without asking the database (revokes
    #: through this process apply at once; other replicas' after at most this). 0: always ask.
    api_key_cache_s: float = Field(default=5.0, ge=0)

    # --- metrics ---
    #: How often every running sandbox's usage is sampled (``GET /sandboxes/{id}/metrics``).
    metrics_interval_s: float = Field(default=5.0, gt=0)
    #: How long samples are kept.
    metrics_retention_s: float = Field(default=3600.0, gt=0)

    # --- idempotent creates ---
    #: How long an ``Idempotency-Key`` of a create is remembered (its response replayed).
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)

    # --- reconciler ---
    #: How often the database is compared with what every live host runs.
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    #: A down host's running sandboxes are marked failed once it has been silent this much
    #: longer than the heartbeat window (a network blip does not end them).
    host_lost_grace_s: float = Field(default=300.0, ge=0)

    # --- webhooks ---
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    webhook_backoff_base_s: float = Field(default=2.0, gt=0)
    webhook_backoff_cap_s: float = Field(default=600.0, gt=0)
    #: How often the webhook worker looks for retries coming due.
    webhook_poll_s: float = Field(default=1.0, gt=0)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.state_dir / 'controlplane.db'}"
