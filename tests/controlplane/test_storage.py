"""Storage on SQLite and PostgreSQL: the shipped migrations create exactly the tables the code
maps, run idempotently, take an extension's own version directory, and the first start (or
``wrenn-cp create-key``) provides a working API key."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

from tests.controlplane.conftest import Stack
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.migrate import current_heads
from wrenn.controlplane.db.tables import Base

#: The newest revision the control plane ships.
HEAD = "0008"

EXTENSION_REVISION = '''
"""An extension's table."""
import sqlalchemy as sa
from alembic import op

revision = "ext0001"
down_revision = None
branch_labels = ("myext",)
depends_on = "0001"


def upgrade() -> None:
    op.create_table("myext_things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("myext_things")
'''


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrations_match_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert {
            "teams",
            "api_keys",
            "hosts",
            "templates",
            "sandboxes",
            "snapshots",
            "audit_log",
            "channels",
            "deliveries",
        } <= tables
        assert await current_heads(db.engine) == {HEAD}
        await db.migrate()  # a second start changes nothing
        assert await current_heads(db.engine) == {HEAD}
        async with db.transaction() as tx:
            await tx.audit.record(action="test", target_type="t", target_id="1")
            assert await tx.audit.count() == 1
    finally:
        await db.aclose()


async def test_extension_migrations_run_after_ours(database_url: str) -> None:
    with tempfile.TemporaryDirectory(prefix="wrenn-ext-") as tmp:
        versions = Path(tmp) / "versions"
        versions.mkdir()
        (versions / "ext0001_things.py").write_text(EXTENSION_REVISION)
        db = Database(database_url)
        try:
            await db.migrate([versions])
            # ext0001 is a branch of its own that depends on 0001: both heads are recorded.
            assert await current_heads(db.engine) == {HEAD, "ext0001"}
            async with db.engine.connect() as conn:
                tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
                diff = await conn.run_sync(_diff)
            # Our tables are complete; the only difference is the extension's own table.
            assert [(d[0], d[1].name) for d in diff] == [("remove_table", "myext_things")]
            assert {"myext_things", "sandboxes"} <= tables
            await db.migrate([versions])
            assert await current_heads(db.engine) == {HEAD, "ext0001"}
        finally:
            await db.aclose()


def test_restart_keeps_keys_and_makes_no_new_admin(database_url: str) -> None:
    first = Stack(database_url)
    try:
        key = first.admin_key
        assert first.admin.get("/v1/teams").json()[0]["isAdmin"] is True
    finally:
        first.close()
    second = Stack(database_url, admin_key=key)
    try:
        assert second.cp.bootstrap_key is None
        teams = second.admin.get("/v1/teams")
        assert teams.status_code == 200 and len(teams.json()) == 1
    finally:
        second.close()


def _cli(database_url: str, *args: str) -> str:
    env = {**os.environ, "WRENN_CP_DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "wrenn.controlplane.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_cli_create_key_and_host_token(database_url: str) -> None:
    out = _cli(database_url, "create-key", "--team", "ops", "--admin")
    key = out.strip().splitlines()[-1].split()[-1]
    assert key.startswith("wrn_")
    token = _cli(database_url, "create-host-token").strip()
    assert token.startswith("wrnr_")
    stack = Stack(database_url, admin_key=key)
    try:
        assert stack.cp.bootstrap_key is None  # the database was not empty any more
        assert [t["name"] for t in stack.admin.get("/v1/teams").json()] == ["ops"]
        reg = httpx.post(
            f"{stack.url}/v1/hosts/register", json={"token": token, "address": "http://h:5007"}
        )
        assert reg.status_code == 201
    finally:
        stack.close()
