"""MMDS metadata (stub)."""

from __future__ import annotations

from typing import Any

from wrenn.envd.config import EnvdSettings
from wrenn.envd.defaults import Defaults


async def read(settings: EnvdSettings) -> dict[str, Any] | None:
    return None


def apply(metadata: dict[str, Any], defaults: Defaults) -> None:
    return None
