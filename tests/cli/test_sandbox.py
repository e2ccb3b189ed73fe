"""``wrenn sandbox`` against the real control plane and a FakeHostAgent TEST DOUBLE: create,
list (table and --json, filters), pause, resume, kill, logs."""

from __future__ import annotations

import json

from tests.cli.conftest import Cli
from tests.controlplane.fake_agent import FakeHostAgent


def test_create_list_table_and_json(cli: Cli, fake_host: tuple[str, FakeHostAgent]) -> None:
    made = cli("sandbox", "create", "base", "-m", "suite=cli", "-e", "A=b", "--timeout", "600")
    assert made.exit_code == 0, made.output
    sandbox_id = made.stdout.strip()
    other = cli("sandbox", "create", "--json", "-m", "suite=other")
    assert other.exit_code == 0, other.output
    other_id = json.loads(other.stdout)["sandboxID"]
    _, agent = fake_host
    assert agent.sandboxes[sandbox_id].env_vars == {"A": "b"}
    assert agent.sandboxes[sandbox_id].metadata == {"suite": "cli"}

    table = cli("sandbox", "list")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["SANDBOX", "TEMPLATE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {sandbox_id, other_id}
    assert rows[sandbox_id][1:3] == ["base", "running"]
    assert "suite=cli" in rows[sandbox_id]

    listed = cli("sandbox", "list", "--json")
    assert listed.exit_code == 0, listed.output
    items = json.loads(listed.stdout)
    assert {i["sandboxID"] for i in items} == {sandbox_id, other_id}
    mine = next(i for i in items if i["sandboxID"] == sandbox_id)
    assert mine["templateID"] == "base"
    assert mine["state"] == "running"
    assert mine["metadata"] == {"suite": "cli"}

    filtered = cli("sandbox", "list", "--json", "-m", "suite=cli")
    assert [i["sandboxID"] for i in json.loads(filtered.stdout)] == [sandbox_id]
    limited = cli("sandbox", "list", "--json", "--limit", "1")
    assert len(json.loads(limited.stdout)) == 1

    killed = cli("sandbox", "kill", sandbox_id, other_id)
    assert killed.exit_code == 0, killed.output
    assert sandbox_id not in agent.sandboxes
    empty = cli("sandbox", "list")
    assert empty.exit_code == 0
    assert empty.stdout == ""
    assert "no sandboxes" in empty.stderr
    assert json.loads(cli("sandbox", "list", "--json").stdout) == []


def test_pause_resume_and_state_filter(cli: Cli, fake_host: tuple[str, FakeHostAgent]) -> None:
    sandbox_id = cli("sandbox", "create").stdout.strip()
    try:
        paused = cli("sandbox", "pause", sandbox_id)
        assert paused.exit_code == 0, paused.output
        assert f"paused {sandbox_id}" in paused.stderr
        rows = json.loads(cli("sandbox", "list", "--json", "--state", "paused").stdout)
        assert [(r["sandboxID"], r["state"]) for r in rows] == [(sandbox_id, "paused")]
        assert json.loads(cli("sandbox", "list", "--json", "--state", "running").stdout) == []

        again = cli("sandbox", "pause", sandbox_id)
        assert again.exit_code == 1
        assert again.stderr.startswith("error: ")

        resumed = cli("sandbox", "resume", sandbox_id, "--timeout", "300")
        assert resumed.exit_code == 0, resumed.output
        rows = json.loads(cli("sandbox", "list", "--json").stdout)
        assert [(r["sandboxID"], r["state"]) for r in rows] == [(sandbox_id, "running")]
    finally:
        cli("sandbox", "kill", sandbox_id)


def test_logs_and_unknown_sandbox(cli: Cli) -> None:
    sandbox_id = cli("sandbox", "create").stdout.strip()
    try:
        logs = cli("sandbox", "logs", sandbox_id)
        assert logs.exit_code == 0, logs.output
        assert json.loads(cli("sandbox", "logs", sandbox_id, "--json").stdout) == []
    finally:
        cli("sandbox", "kill", sandbox_id)
    gone = cli("sandbox", "logs", sandbox_id)
    assert gone.exit_code == 1
    assert "not found" in gone.stderr
    assert "Traceback" not in gone.output


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert cli("sandbox", "frobnicate").exit_code == 2
    assert cli("sandbox", "create", "--timeout", "-1").exit_code == 2
    bad = cli("sandbox", "create", "--metadata", "novalue")
    assert bad.exit_code == 2
    assert "KEY=VALUE" in bad.output
