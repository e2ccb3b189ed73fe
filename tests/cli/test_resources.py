"""``wrenn host``, ``template`` and ``snapshot`` against the real control plane with
FakeHostAgent TEST DOUBLES as hosts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import Cli, ControlPlaneProcess, FakeHosts
from tests.controlplane.fake_agent import FakeHostAgent


@pytest.fixture
def lone_host(tmp_path: Path) -> Iterator[tuple[Cli, str, FakeHostAgent]]:
    """A control plane of this test's own with one host, so draining it leaves no other."""
    cp = ControlPlaneProcess()
    hosts = FakeHosts(cp)
    try:
        host_id, agent = hosts.add()
        yield Cli(cp.url, cp.admin_key, tmp_path / "config.toml"), host_id, agent
    finally:
        hosts.close()
        cp.stop()


def test_host_list_and_drain(lone_host: tuple[Cli, str, FakeHostAgent]) -> None:
    admin_cli, host_id, agent = lone_host
    table = admin_cli("host", "list")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["HOST", "ADDRESS", "STATUS", "LIVE"]
    assert lines[1].split()[0] == host_id
    assert lines[1].split()[2:5] == ["active", "yes", "fake"]

    hosts = json.loads(admin_cli("host", "list", "--json").stdout)
    assert [(h["hostID"], h["status"], h["live"]) for h in hosts] == [(host_id, "active", True)]
    assert hosts[0]["memoryMB"] == 16 * 1024

    sandbox_id = admin_cli("sandbox", "create").stdout.strip()
    assert sandbox_id in agent.sandboxes

    drained = admin_cli("host", "drain", host_id)
    assert drained.exit_code == 0, drained.output
    assert f"host {host_id} is draining (1 sandboxes on it)" in drained.stderr
    hosts = json.loads(admin_cli("host", "list", "--json").stdout)
    assert [(h["status"], h["sandboxes"]) for h in hosts] == [("draining", 1)]
    # No new sandboxes go there; the one on it keeps running.
    refused = admin_cli("sandbox", "create")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: ")
    assert len(agent.sandboxes) == 1
    listed = json.loads(admin_cli("sandbox", "list", "--json").stdout)
    assert [(s["sandboxID"], s["state"]) for s in listed] == [(sandbox_id, "running")]

    assert admin_cli("host", "activate", host_id).exit_code == 0
    assert json.loads(admin_cli("host", "list", "--json").stdout)[0]["status"] == "active"
    again = admin_cli("sandbox", "create")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() in agent.sandboxes

    unknown = admin_cli("host", "drain", "host_nope")
    assert unknown.exit_code == 1
    assert "not found" in unknown.stderr


def test_template_list(cli: Cli, fake_host: tuple[str, FakeHostAgent]) -> None:
    table = cli("template", "list")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0].split()[:2] == ["TEMPLATE", "BUILD"]
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["base"][1:4] == ["build-base", "2", "512"]
    templates = {t["templateID"]: t for t in json.loads(cli("template", "list", "--json").stdout)}
    assert templates["base"]["cpuCount"] == 2
    assert templates["base"]["memoryMB"] == 512


def test_template_delete_refused_for_a_public_template(cli: Cli) -> None:
    result = cli("template", "delete", "base")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output


def test_template_build_rejects_unknown_names(cli: Cli) -> None:
    result = cli("template", "build", "ubuntu")
    assert result.exit_code == 2
    assert "only base can be built" in result.output


def test_template_build_runs_the_image_builder_as_a_process(tmp_path: Path) -> None:
    """The builder runs as ``python -m wrenn.agent.images``; a failing build (here: an envd
    wheel that does not exist) is exit code 1. A full build is covered by the image tests."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wrenn.cli",
            "template",
            "build",
            "base",
            "--state-dir",
            str(tmp_path / "state"),
            "--envd-wheel",
            str(tmp_path / "missing.whl"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "WRENN_CONFIG": str(tmp_path / "c.toml")},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "missing.whl" in done.stdout + done.stderr


def test_snapshot_create_list_delete(cli: Cli, fake_host: tuple[str, FakeHostAgent]) -> None:
    sandbox_id = cli("sandbox", "create").stdout.strip()
    try:
        made = cli("snapshot", "create", sandbox_id, "--name", "warm")
        assert made.exit_code == 0, made.output
        snapshot_id = made.stdout.strip()
        _, agent = fake_host
        assert snapshot_id in agent.snapshots

        table = cli("snapshot", "list")
        assert table.exit_code == 0, table.output
        assert table.stdout.splitlines()[0].split()[:3] == ["SNAPSHOT", "NAME", "SANDBOX"]
        row = table.stdout.splitlines()[1].split()
        assert row[:4] == [snapshot_id, "warm", sandbox_id, "base"]

        listed = json.loads(cli("snapshot", "list", "--json").stdout)
        assert [(s["snapshotID"], s["name"]) for s in listed] == [(snapshot_id, "warm")]
        other = json.loads(cli("snapshot", "list", "--json", "--sandbox", "nosuchbox").stdout)
        assert other == []

        second = json.loads(cli("snapshot", "create", sandbox_id, "--json").stdout)
        deleted = cli("snapshot", "delete", "warm", second["snapshotID"])
        assert deleted.exit_code == 0, deleted.output
        assert json.loads(cli("snapshot", "list", "--json").stdout) == []
        assert snapshot_id not in agent.snapshots
        empty = cli("snapshot", "list")
        assert empty.stdout == "" and "no snapshots" in empty.stderr
    finally:
        cli("sandbox", "kill", sandbox_id)
