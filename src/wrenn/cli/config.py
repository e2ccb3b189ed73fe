"""The CLI's config file, ``$XDG_CONFIG_HOME/wrenn/config.toml`` (``~/.config/wrenn`` by
default; ``WRENN_CONFIG`` names another file). It holds ``api_url``, ``api_key`` and
``sandbox_url``, each a string; it is written with mode 0600 as it holds a secret."""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from wrenn.core.errors import InvalidArgument


@dataclass(frozen=True)
class FileConfig:
    api_url: str | None = None
    api_key: str | None = None
    sandbox_url: str | None = None


def default_path() -> Path:
    explicit = os.environ.get("WRENN_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wrenn" / "config.toml"


def load(path: Path) -> FileConfig:
    """The file's settings; an absent file is an empty config, a malformed one an error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return FileConfig()
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8", errors="replace"))
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgument(f"{path} is not valid TOML: {err}") from err
    values: dict[str, str] = {}
    for f in fields(FileConfig):
        value = data.get(f.name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidArgument(f"{path}: {f.name} must be a string")
        values[f.name] = value
    return FileConfig(**values)


def _toml_string(value: str) -> str:
    # A JSON string with ASCII escapes only is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def render(config: FileConfig) -> str:
    lines = ["# Written by `wrenn`; read by every wrenn command.\n"]
    for f in fields(FileConfig):
        value = getattr(config, f.name)
        if value is not None:
            lines.append(f"{f.name} = {_toml_string(value)}\n")
    return "".join(lines)


def save(path: Path, config: FileConfig) -> None:
    """Replace the file atomically, readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(render(config))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update(path: Path, **values: str | None) -> FileConfig:
    """Merge ``values`` (those not None) into the file and return what it now holds."""
    merged = replace(load(path), **{k: v for k, v in values.items() if v is not None})
    save(path, merged)
    return merged
