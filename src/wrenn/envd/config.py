"""envd settings, read once from ``WRENN_ENVD_*`` environment variables and flags."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

#: The envd version reported to clients. The e2b SDK gates features on it; this is the
#: E2B envd release whose wire behaviour Wrenn's envd implements.
ENVD_VERSION = "0.6.4"


class EnvdSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WRENN_ENVD_")

    host: str = "0.0.0.0"
    port: int = 49983
    log_level: str = "info"
    #: JSON log lines; unset: JSON unless stderr is a terminal. The guest's console is one, and
    #: the host agent parses envd's lines from it, so wrenn-init sets this.
    log_json: bool | None = None
    #: User for requests that name none, until /init sets ``defaultUser``.
    default_user: str = "root"
    #: Working directory for processes that name none (the user's home when unset).
    default_workdir: str | None = None
    #: Root of the cgroup hierarchy; user processes go in a child group of it.
    cgroup_root: str = "/sys/fs/cgroup"
    cgroups: bool = True
    #: Start processes with posix_spawn behind the spawn gate (needs root and fanotify
    #: permission events); off, or where unavailable, envd forks and sets up each child.
    fast_spawn: bool = True
    #: Port subsystem: make loopback-only listeners reachable on the external address.
    ports: bool = True
    port_scan_interval_s: float = 1.0
    #: Address loopback-only listeners are forwarded to. Unset: the address of the interface
    #: holding the default route; empty: forwarding off.
    port_forward_address: str | None = None
    #: Step the clock to /init's ``timestamp`` (guests without a PTP clock to run chronyd on).
    clock_from_init: bool = False
    #: Firecracker's MMDS, as ``host`` or ``host:port``.
    mmds_address: str = "169.254.169.254"
    mmds_timeout_s: float = 0.3
