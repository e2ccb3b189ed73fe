"""What a person sees when things go wrong: one line on stderr, no traceback, exit code 1
for errors and 2 for usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import Cli
from tests.conftest import free_port

COMMANDS = [
    ("sandbox", "list"),
    ("sandbox", "create"),
    ("template", "list"),
    ("snapshot", "list"),
    ("host", "list"),
    ("key", "list"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_unreachable_control_plane(tmp_path: Path, command: tuple[str, ...]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cli = Cli(url, "wrn_whatever", tmp_path / "config.toml")
    result = cli(*command)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: cannot reach the control plane at {url}")
    assert "Traceback" not in result.output


def test_wrong_key(cli: Cli) -> None:
    result = cli("sandbox", "list", key="wrn_notakey")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid or revoked API key")
    assert "--api-key" in result.stderr
    assert "Traceback" not in result.output


def test_admin_only_command_with_team_key(cli: Cli) -> None:
    result = cli("host", "list")
    assert result.exit_code == 1
    assert "admin" in result.stderr


def test_malformed_config_file(cli: Cli) -> None:
    cli.config.write_text("api_key = [unterminated\n")
    result = cli("sandbox", "list")
    assert result.exit_code == 1
    assert "not valid TOML" in result.stderr


def test_usage(cli: Cli) -> None:
    assert cli("nonsense").exit_code == 2
    assert cli("key", "revoke").exit_code == 2  # missing argument
    help_ = cli("--help")
    assert help_.exit_code == 0
    for group in ("up", "sandbox", "template", "snapshot", "host", "key"):
        assert group in help_.stdout


def test_cli_imports_nothing_of_the_servers() -> None:
    """Every CLI module loaded in a fresh interpreter pulls in no control plane, agent or
    envd module (the CLI talks to them over HTTP only)."""
    probe = (
        "import importlib, pkgutil, sys, wrenn.cli\n"
        "for m in pkgutil.iter_modules(wrenn.cli.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('wrenn.cli.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[:2] in "
        "(['wrenn', 'controlplane'], ['wrenn', 'agent'], ['wrenn', 'envd'])))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
