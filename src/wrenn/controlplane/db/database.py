"""The database handle: one async engine, transactions that expose repositories.

Callers see ``Database`` and ``Transaction`` and the records the repositories return; no
SQLAlchemy type crosses this package's border.

SQLite (the embedded default) runs every transaction as ``BEGIN IMMEDIATE`` with foreign keys
on and WAL journaling, so concurrent writers queue instead of failing on a lock upgrade. A
``read_only`` transaction begins deferred instead: under WAL it reads a snapshot without taking
the write lock, so reads neither queue behind writers nor make them wait.

``reads`` are the listings: one statement each, outside any transaction (``reads``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from wrenn.controlplane.db import migrate
from wrenn.controlplane.db.audit import AuditRepository
from wrenn.controlplane.db.channels import ChannelRepository
from wrenn.controlplane.db.deliveries import DeliveryRepository
from wrenn.controlplane.db.host_templates import HostTemplateRepository
from wrenn.controlplane.db.hosts import HostRepository
from wrenn.controlplane.db.idempotency import IdempotencyRepository
from wrenn.controlplane.db.metrics import MetricRepository
from wrenn.controlplane.db.reads import Reads
from wrenn.controlplane.db.sandboxes import SandboxRepository
from wrenn.controlplane.db.snapshots import SnapshotRepository
from wrenn.controlplane.db.teams import TeamRepository
from wrenn.controlplane.db.templates import TemplateRepository


class Transaction:
    """One unit of work; commits when its ``async with`` block ends without an error."""

    def __init__(self, session: AsyncSession) -> None:
        self.teams = TeamRepository(session)
        self.hosts = HostRepository(session)
        self.templates = TemplateRepository(session)
        self.sandboxes = SandboxRepository(session)
        self.snapshots = SnapshotRepository(session)
        self.audit = AuditRepository(session)
        self.channels = ChannelRepository(session)
        self.deliveries = DeliveryRepository(session)
        self.host_templates = HostTemplateRepository(session)
        self.metrics = MetricRepository(session)
        self.idempotency = IdempotencyRepository(session)
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this transaction has committed (not if it rolls back)."""
        self._after_commit.append(callback)


#: Execution option marking the engine of read-only transactions.
_READ_ONLY = "wrenn_read_only"
#: Execution option marking the engine of ``Reads``: SQLite begins no transaction for them.
_NO_BEGIN = "wrenn_no_begin"


def _sqlite_pragmas(engine: AsyncEngine, *, file_backed: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        if file_backed:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get(_NO_BEGIN, False):
            return  # pysqlite runs each statement in a transaction of its own
        conn.exec_driver_sql("BEGIN" if options.get(_READ_ONLY, False) else "BEGIN IMMEDIATE")


def _drop_closed_connections(engine: AsyncEngine) -> None:
    """A pooled connection the server closed (a restart, an idle timeout) is replaced as it is
    taken, without the round trips of a ping: asyncpg sees the server close it."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if driver is not None and driver.is_closed():
            raise DisconnectionError("the server closed this connection")


#: Connections each pool keeps open (beyond them, up to ``max_overflow`` more are opened and
#: closed as needed). Sized for the requests one process serves at once: a connection opened
#: per request costs a thread and a handshake on SQLite, a few round trips on PostgreSQL.
POOL_SIZE = 20


class Database:
    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"pool_size": POOL_SIZE}
        if self.dialect == "sqlite":
            database = parsed.database or ""
            file_backed = database not in ("", ":memory:")
            if file_backed:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            else:
                del kwargs["pool_size"]  # one connection, kept (SQLAlchemy's StaticPool)
            kwargs["connect_args"] = {"timeout": 30}
            # Every transaction ends in its own COMMIT or ROLLBACK and a reader's statement
            # runs in none, so the pool's rollback at check-in (one more trip to aiosqlite's
            # thread each time) would find nothing to undo.
            kwargs["pool_reset_on_return"] = None
        self.engine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _sqlite_pragmas(self.engine, file_backed=file_backed)
        else:
            _drop_closed_connections(self.engine)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Same pool; only how a transaction begins differs.
        self._read_sessions = async_sessionmaker(
            self.engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False
        )
        self.reads = Reads(
            self.engine.execution_options(
                **(
                    {_NO_BEGIN: True}
                    if self.dialect == "sqlite"
                    else {"isolation_level": "AUTOCOMMIT"}
                )
            )
        )

    async def migrate(self, extra_locations: Sequence[Traversable | Path] = ()) -> None:
        await migrate.upgrade(self.engine, extra_locations)

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[Transaction]:
        """A unit of work. ``read_only``: the block only reads (on SQLite it then takes no
        write lock; a write in it may fail with "database is locked" under contention)."""
        sessions = self._read_sessions if read_only else self._sessions
        async with sessions() as session:
            async with session.begin():
                tx = Transaction(session)
                yield tx
            for callback in tx._after_commit:
                callback()

    async def aclose(self) -> None:
        await self.reads.aclose()
        await self.engine.dispose()
