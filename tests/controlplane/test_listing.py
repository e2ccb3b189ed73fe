"""The sandbox listings, made straight from the rows: every item is the JSON the
``ListedSandbox`` model writes (the same fields, names, order and time format as the detail
endpoint's model gives), listings see every committed change at once (SQLite's shared reader
connection included), the migration fills in the metadata of sandboxes made before it, and
pooled PostgreSQL connections the server closed are replaced without a failed request."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
import httpx
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from e2b.api.client.models import ListedSandbox

from tests.controlplane.conftest import PostgresServer, Stack
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.migrate import MIGRATIONS
from wrenn.controlplane.db.records import SandboxState
from wrenn.controlplane.db.sandboxes import SandboxQuery
from wrenn.controlplane.schemas import e2b

#: ListedSandbox's JSON names, in its fields' order.
LISTED = [f.serialization_alias or name for name, f in e2b.ListedSandbox.model_fields.items()]

ODD_METADATA = {
    'quote"back\\slash': "tab\tnew\nline",
    "ünïcödé ✓": "😀 \u2028 </script>",
    "ctl\x01": "\x1f\x7f",
    "empty": "",
}


def _create(c: httpx.Client, **body: Any) -> str:
    resp = c.post("/v2/sandboxes", json={"templateID": "base", **body})
    assert resp.status_code == 201, resp.text
    sandbox_id: str = resp.json()["sandboxID"]
    return sandbox_id


def test_items_are_the_models_json(stack: Stack) -> None:
    c = stack.admin
    odd = _create(c, metadata=ODD_METADATA)
    plain = _create(c)
    snap = c.post(f"/sandboxes/{plain}/snapshots", json={"name": "warm"})
    assert snap.status_code == 201, snap.text
    aliased = _create(c, templateID="warm")  # made from a snapshot: it has an alias
    assert c.post(f"/sandboxes/{plain}/pause").status_code == 204

    for resp in (c.get("/v2/sandboxes"), c.get("/sandboxes")):
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "application/json"
        for item in resp.json():
            ListedSandbox.from_dict(item)  # what the SDK reads
            # The detail endpoint writes its fields with the pydantic model.
            detail = c.get(f"/sandboxes/{item['sandboxID']}").json()
            assert list(item) == [k for k in LISTED if k in detail]
            assert item == {k: detail[k] for k in LISTED if k in detail}

    items = {x["sandboxID"]: x for x in c.get("/v2/sandboxes").json()}
    assert set(items) == {odd, plain, aliased}
    assert items[odd]["metadata"] == ODD_METADATA
    assert items[plain]["metadata"] == {} and items[plain]["state"] == "paused"
    assert "alias" not in items[odd] and items[aliased]["alias"] == "warm"
    started = datetime.fromisoformat(items[odd]["startedAt"].replace("Z", "+00:00"))
    assert items[odd]["startedAt"].endswith("Z") and started.tzinfo is not None
    assert abs(datetime.now(UTC) - started) < timedelta(hours=1)


def test_listings_see_every_commit(stack: Stack) -> None:
    c = stack.admin

    def listed() -> set[str]:
        return {x["sandboxID"] for x in c.get("/v2/sandboxes").json()}

    assert listed() == set()
    first = _create(c)
    assert listed() == {first}
    second = _create(c, metadata={"k": "v"})
    assert listed() == {first, second}
    assert c.delete(f"/sandboxes/{first}").status_code == 204
    assert listed() == {second}

    async def many() -> list[list[str]]:
        async with httpx.AsyncClient(
            base_url=stack.url, headers={"X-API-Key": stack.admin_key}
        ) as client:
            answers = await asyncio.gather(*(client.get("/v2/sandboxes") for _ in range(40)))
        assert {a.status_code for a in answers} == {200}
        return [[x["sandboxID"] for x in a.json()] for a in answers]

    assert all(ids == [second] for ids in asyncio.run(many()))


def test_snapshot_listings_page_alike(stack: Stack) -> None:
    c = stack.admin
    sid = _create(c)
    made = [c.post("/v1/snapshots", json={"sandboxID": sid}).json()["snapshotID"] for _ in range(3)]
    for path, key in (("/snapshots", "snapshotID"), ("/v1/snapshots", "snapshotID")):
        seen: list[str] = []
        params: dict[str, Any] = {"limit": 2}
        while True:
            page = c.get(path, params=params)
            assert page.status_code == 200, page.text
            seen += [x[key] for x in page.json()]
            token = page.headers.get("x-next-token")
            if not token:
                break
            params["nextToken"] = token
        assert seen == made  # oldest first, each once
    assert c.get("/v1/snapshots", params={"sandboxID": "sbx_none"}).json() == []


# --- storage ----------------------------------------------------------------------------


def _upgrade(connection: sa.Connection, revision: str) -> None:
    with resources.as_file(MIGRATIONS) as script_dir:
        cfg = Config()
        cfg.set_main_option("script_location", str(script_dir))
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("version_locations", str(script_dir / "versions"))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def _stored(db: Database, at: datetime) -> object:
    """``at`` as the sandboxes table keeps it (naive UTC text on SQLite)."""
    return at.strftime("%Y-%m-%d %H:%M:%S.%f") if db.dialect == "sqlite" else at


async def test_migration_fills_in_metadata(database_url: str) -> None:
    """Sandboxes made before ``metadata_json`` existed get theirs from their metadata rows."""
    db = Database(database_url)
    now = datetime.now(UTC)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_upgrade, "0003")
            await conn.execute(
                sa.text(
                    "INSERT INTO teams (id, name, is_admin, created_at) VALUES ('t1', 't', :f, :at)"
                ),
                {"f": False, "at": _stored(db, now)},
            )
            for n, sandbox_id in enumerate(("sbx_old1", "sbx_old2")):
                stored = _stored(db, now - timedelta(seconds=n))
                await conn.execute(
                    sa.text(
                        "INSERT INTO sandboxes (id, team_id, template_id, state, vcpus,"
                        " memory_mib, disk_mib, envd_version, envd_access_token, auto_pause,"
                        " auto_resume, started_at, end_at, created_at) VALUES (:id, 't1',"
                        " 'base', 'running', 2, 512, 1024, '0.3.0', 'tok', :f, :f, :at, :at,"
                        " :at)"
                    ),
                    {"id": sandbox_id, "f": False, "at": stored},
                )
            await conn.execute(
                sa.text(
                    "INSERT INTO sandbox_metadata (sandbox_id, key, value)"
                    " VALUES ('sbx_old1', 'a', '1'), ('sbx_old1', 'ü\"', 'x\ny')"
                )
            )
        await db.migrate()
        async with db.transaction() as tx:
            old1, old2 = await tx.sandboxes.get("sbx_old1"), await tx.sandboxes.get("sbx_old2")
        assert old1 is not None and old1.metadata == {"a": "1", 'ü"': "x\ny"}
        assert old2 is not None and old2.metadata == {}
        page = await db.reads.sandboxes(
            SandboxQuery(team_id="t1", states=[SandboxState.RUNNING], order="asc")
        )
        assert [s.id for s in page.items] == ["sbx_old2", "sbx_old1"]
        assert page.items[0].metadata_json == "{}"
        assert all(s.started_at.tzinfo is UTC for s in page.items)
    finally:
        await db.aclose()


def test_connections_the_server_closed_are_replaced(postgres: PostgresServer) -> None:
    """A PostgreSQL restart closes every pooled connection; the next requests get new ones
    (asyncpg saw the old ones close) instead of failing on them."""
    name, url = postgres.create_database()
    try:
        asyncio.run(_closed_connections_are_replaced(postgres, name, url))
    finally:
        postgres.drop_database(name)


async def _closed_connections_are_replaced(postgres: PostgresServer, name: str, url: str) -> None:
    db = Database(url)
    try:
        await db.migrate()
        query = SandboxQuery(team_id="nobody", states=list(SandboxState))

        async def use(n: int) -> None:  # several at once: several pooled connections
            async def one() -> None:
                assert (await db.reads.sandboxes(query)).items == []
                async with db.transaction() as tx:
                    assert await tx.sandboxes.get("sbx_none") is None

            await asyncio.gather(*(one() for _ in range(n)))

        await use(4)
        admin = await asyncpg.connect(
            host="127.0.0.1", port=postgres.port, user="postgres", database="postgres"
        )
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            for _ in range(1000):  # until the server has ended them all
                left = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                if not await admin.fetchval(left, name):
                    break
                await asyncio.sleep(0.01)
        finally:
            await admin.close()
        await asyncio.sleep(0.1)  # the loop reads the closed sockets' end
        await use(4)
    finally:
        await db.aclose()
