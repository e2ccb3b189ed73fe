"""``wrenn key`` and ``wrenn login`` against the real control plane: create, list, revoke,
the config file ``--save`` and ``login`` write, and what a revoked key gets."""

from __future__ import annotations

import json
import stat
import tomllib

from tests.cli.conftest import Cli, ControlPlaneProcess


def test_key_create_list_revoke(cli: Cli, team: tuple[str, str]) -> None:
    team_id, _ = team
    made = cli("key", "create", "--name", "ci", "--json")
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["teamID"] == team_id
    assert created["name"] == "ci"
    assert created["key"].startswith(created["prefix"])

    table = cli("key", "list")
    assert table.exit_code == 0, table.output
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert created["keyID"] in rows
    assert rows[created["keyID"]][1:3] == ["ci", created["prefix"]]
    listed = json.loads(cli("key", "list", "--json").stdout)
    assert {k["keyID"] for k in listed} == set(rows)
    assert all("key" not in k for k in listed)  # secrets are never listed

    # The new key works, and sees the same team.
    assert cli("key", "list", key=created["key"]).exit_code == 0

    revoked = cli("key", "revoke", created["keyID"])
    assert revoked.exit_code == 0, revoked.output
    after = {k["keyID"]: k for k in json.loads(cli("key", "list", "--json").stdout)}
    assert after[created["keyID"]]["revokedAt"] is not None

    refused = cli("sandbox", "list", key=created["key"])
    assert refused.exit_code == 1
    assert "invalid or revoked API key" in refused.stderr
    assert "Traceback" not in refused.output

    unknown = cli("key", "revoke", "key_doesnotexist")
    assert unknown.exit_code == 1
    assert "not found" in unknown.stderr


def test_admin_key_finds_its_own_team(admin_cli: Cli, cp: ControlPlaneProcess) -> None:
    cp.new_team("another")  # an admin sees several teams; its own is found by key prefix
    made = json.loads(admin_cli("key", "create", "--json").stdout)
    with cp.admin() as admin:
        teams = {t["teamID"]: t for t in admin.get("/v1/teams").json()}
    assert teams[made["teamID"]]["isAdmin"] is True
    assert admin_cli("key", "revoke", made["keyID"]).exit_code == 0


def test_key_create_save_then_used_from_config(cli: Cli) -> None:
    made = cli("key", "create", "--save")
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    saved = tomllib.loads(cli.config.read_text())
    assert saved == {"api_url": cli.api_url, "api_key": secret}
    # No key in the environment: the saved one is used.
    listed = cli("key", "list", "--json", key=None)
    assert listed.exit_code == 0, listed.output
    mine = [k for k in json.loads(listed.stdout) if secret.startswith(k["prefix"])]
    assert mine and mine[0]["lastUsedAt"] is not None


def test_login_checks_and_saves(cli: Cli, team: tuple[str, str]) -> None:
    bad = cli("login", key="wrn_wrong")
    assert bad.exit_code == 1
    assert "invalid or revoked API key" in bad.stderr
    assert not cli.config.exists()

    good = cli("login")
    assert good.exit_code == 0, good.output
    assert tomllib.loads(cli.config.read_text())["api_key"] == team[1]
    assert cli("sandbox", "list", key=None).exit_code == 0


def test_no_key_at_all(cli: Cli) -> None:
    result = cli("sandbox", "list", key=None)
    assert result.exit_code == 1
    assert "no API key" in result.stderr
