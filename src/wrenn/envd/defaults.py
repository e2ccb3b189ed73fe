"""What /init sets and every request reads: env vars, access token, default user and workdir."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Defaults:
    env_vars: dict[str, str] = field(default_factory=dict)
    access_token: str | None = None
    user: str = "root"
    workdir: str | None = None
