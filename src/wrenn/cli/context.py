"""What every command works with: where the control plane is, the API key, where sandbox
traffic goes. Resolved once per invocation: option, then environment, then config file,
then default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from wrenn.cli import config
from wrenn.cli.client import ControlPlaneClient
from wrenn.core.errors import Unauthenticated

DEFAULT_API_URL = "http://127.0.0.1:3000"


@dataclass(frozen=True)
class CliContext:
    api_url: str
    api_key: str | None
    #: Base URL of SDK traffic to sandboxes (the control plane's sandbox proxy, or an envd
    #: when debugging); ``None``: as ``sdk.sandbox_url`` decides.
    sandbox_url: str | None
    config_path: Path

    @classmethod
    def resolve(
        cls,
        *,
        api_url: str | None,
        api_key: str | None,
        sandbox_url: str | None,
        config_path: Path | None = None,
    ) -> CliContext:
        path = config_path or config.default_path()
        saved = config.load(path)
        return cls(
            api_url=(api_url or saved.api_url or DEFAULT_API_URL).rstrip("/"),
            api_key=api_key or saved.api_key,
            sandbox_url=sandbox_url or saved.sandbox_url,
            config_path=path,
        )

    def require_key(self) -> str:
        if not self.api_key:
            raise Unauthenticated(
                "no API key: pass --api-key, set WRENN_API_KEY, or save one with "
                f"`wrenn login` (kept in {self.config_path})"
            )
        return self.api_key

    def client(self) -> ControlPlaneClient:
        return ControlPlaneClient(self.api_url, self.require_key())


def of(ctx: typer.Context) -> CliContext:
    """The ``CliContext`` the root command stored for this invocation."""
    obj = ctx.find_root().obj
    assert isinstance(obj, CliContext), "the root callback sets the context"
    return obj
