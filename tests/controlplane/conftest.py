"""Control plane fixtures: a throwaway PostgreSQL server for the session, a fresh database per
test on SQLite and on PostgreSQL, and ``Stack`` — the real control plane app and FakeHostAgent
test doubles, each served by uvicorn on a loopback port from one background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import uvicorn
from sqlalchemy import update

from tests.conftest import free_port
from tests.controlplane.fake_agent import FakeHostAgent
from wrenn.controlplane import ControlPlaneSettings, Extension, ServerContext, build
from wrenn.controlplane.db.tables import HostRow
from wrenn.controlplane.proxy import SandboxProxy
from wrenn.controlplane.reconciler import Reconciler
from wrenn.core import http1

T = TypeVar("T")


# --- PostgreSQL -------------------------------------------------------------------------


def _pg_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for path in reversed(candidates):
        if (Path(path) / "initdb").exists() and (Path(path) / "postgres").exists():
            return Path(path)
    raise RuntimeError(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
        "(the Makefile's system target installs the Debian postgresql package)"
    )


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory, run as the ``postgres`` OS user on a free
    loopback port with trust auth; ``stop()`` ends it by PID and removes the directory."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        pg_user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="wrenn-pg-"))
        os.chown(self.dir, pg_user.pw_uid, pg_user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                user="postgres",
                check=True,
                capture_output=True,
                cwd=self.dir,
            )
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(
                    [
                        str(bindir / "postgres"),
                        "-D",
                        str(self.data),
                        "-p",
                        str(self.port),
                        "-k",
                        str(self.dir),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                    ],
                    user="postgres",
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited early:\n{self.log.read_text()}")
            try:
                asyncio.run(self._execute("SELECT 1"))
                return
            except (OSError, asyncpg.PostgresError):
                time.sleep(0.1)
        raise RuntimeError(f"postgres never became ready:\n{self.log.read_text()}")

    async def _execute(self, sql: str) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="postgres", timeout=5
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def create_database(self) -> tuple[str, str]:
        name = f"wrenn_{uuid.uuid4().hex[:12]}"
        asyncio.run(self._execute(f'CREATE DATABASE "{name}"'))
        return name, f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, name: str) -> None:
        asyncio.run(self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory(prefix="wrenn-cp-") as tmp:
            yield f"sqlite+aiosqlite:///{tmp}/controlplane.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name, url = server.create_database()
    yield url
    server.drop_database(name)


# --- servers in a background loop -------------------------------------------------------


class LoopThread:
    """An event loop running in a thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stack", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return self.submit(coro).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


class Served:
    """An ASGI app served by uvicorn on a loopback socket inside ``LoopThread``."""

    def __init__(self, loop: LoopThread, app: Any, address: str = "127.0.0.1") -> None:
        self._loop = loop
        sock = socket.socket()
        sock.bind((address, 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://{address}:{self.port}"
        # An app with a fast path is served as wrenn-cp and wrenn-agent serve it.
        http = http1.FastPathProtocol if isinstance(app, http1.FastPathApp) else "auto"
        self.server = uvicorn.Server(
            uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, http=http)
        )
        self._done = loop.submit(self.server.serve(sockets=[sock]))
        self._sock = sock
        deadline = time.monotonic() + 60
        while not self.server.started:
            if self._done.done():
                self._done.result()  # raises what failed the start-up
                raise RuntimeError("server exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        try:
            self._done.result(30)
        finally:
            self._sock.close()


@dataclass
class FakeHost:
    agent: FakeHostAgent
    served: Served
    host_id: str
    secret: str


class Stack:
    """The control plane (real app, real database) with FakeHostAgent test doubles."""

    def __init__(
        self,
        database_url: str,
        *,
        admin_key: str | None = None,
        extensions: Sequence[Extension] = (),
        **overrides: Any,
    ) -> None:
        self._state = tempfile.TemporaryDirectory(prefix="wrenn-cp-state-")
        values: dict[str, Any] = {
            "database_url": database_url,
            "state_dir": self._state.name,
            "domain": "wrenn.test",
            "heartbeat_window_s": 3600,
            "lifecycle_interval_s": 0.05,
            "reserve_memory_mib": 0,
            "reserve_disk_mib": 0,
            "agent_timeout_s": 30,
            # Tests run reconciliation passes themselves (``Stack.reconciler``); the
            # background one only makes its first pass at start.
            "reconcile_interval_s": 3600,
            "webhook_poll_s": 0.05,
            "webhook_backoff_base_s": 0.05,
            "webhook_backoff_cap_s": 0.2,
            "proxy_port": 0,
            "proxy_cache_s": 0,
        }
        values.update(overrides)
        self.settings = ControlPlaneSettings(**values)
        self.loop = LoopThread()
        self.hosts: list[FakeHost] = []
        self._served: list[Served] = []
        try:
            self.app = build(self.settings, extensions, announce_bootstrap_key=False)
            self.cp: ServerContext = self.app.state.context
            self.proxy: SandboxProxy = self.app.state.proxy
            http1.redirect_in_kernel(self.settings.proxy_redirect_in_kernel)  # as serve() does
            self.api = self.serve(http1.FastPathApp(self.app, self.proxy.route_api))
            if admin_key is None:
                assert self.cp.bootstrap_key is not None, "database was not empty"
                admin_key = self.cp.bootstrap_key.api_key
            self.admin_key = admin_key
            self.admin = self.client(self.admin_key)
        except BaseException:
            self.close()
            raise

    def serve(self, app: Any, address: str = "127.0.0.1") -> Served:
        """Serve ``app`` on a port of ``address`` (a loopback one) in the stack's loop until
        the stack closes."""
        served = Served(self.loop, app, address)
        self._served.append(served)
        return served

    @property
    def url(self) -> str:
        return self.api.url

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def add_host(
        self,
        agent: FakeHostAgent | None = None,
        *,
        heartbeat: bool = True,
        asgi: Any | None = None,
    ) -> FakeHost:
        """A FakeHostAgent registered (and heartbeating once); ``asgi`` serves something in
        front of it (the forwarding path double) instead of its bare Connect service."""
        agent = agent or FakeHostAgent()
        served = self.serve(asgi if asgi is not None else agent.asgi())
        token = self.admin.post("/v1/hosts/tokens").json()["token"]
        reg = httpx.post(
            f"{self.url}/v1/hosts/register", json={"token": token, "address": served.url}
        )
        assert reg.status_code == 201, reg.text
        host = FakeHost(agent, served, reg.json()["hostID"], reg.json()["hostSecret"])
        self.hosts.append(host)
        if heartbeat:
            self.heartbeat(host)
        return host

    def heartbeat(self, host: FakeHost) -> httpx.Response:
        resp = httpx.post(
            f"{self.url}/v1/hosts/{host.host_id}/heartbeat",
            json=host.agent.heartbeat_body(),
            headers={"Authorization": f"Bearer {host.secret}"},
        )
        assert resp.status_code == 200, resp.text
        return resp

    def new_team(self, name: str = "team") -> tuple[str, str]:
        """A non-admin team and an API key for it."""
        team = self.admin.post("/v1/teams", json={"name": name}).json()
        key = self.admin.post(f"/v1/teams/{team['teamID']}/api-keys", json={"name": "k"}).json()
        return team["teamID"], key["key"]

    def serve_proxy(self, *, fast_path: bool = True) -> str:
        """Serve the sandbox proxy on a port of its own, as ``wrenn-cp`` does (without
        ``fast_path``: its ASGI app alone); its URL."""
        app = http1.FastPathApp(self.proxy, self.proxy.route) if fast_path else self.proxy
        return self.serve(app).url

    def reconciler(self) -> Reconciler:
        """A reconciler over this control plane; tests call ``tick`` through ``run``."""
        ctx = self.cp
        return Reconciler(
            ctx.db,
            ctx.hosts,
            ctx.sandboxes,
            ctx.scheduler,
            ctx.events,
            ctx.audit,
            interval_s=self.settings.reconcile_interval_s,
            lost_grace_s=self.settings.host_lost_grace_s,
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        """Run ``coro`` in the control plane's event loop."""
        return self.loop.run(coro, timeout_s)

    def update_host(self, host_id: str, **values: Any) -> None:
        """Change a host's row behind the control plane's back (silent hosts, new address)."""

        async def execute() -> None:
            async with self.cp.db.engine.begin() as conn:
                await conn.execute(update(HostRow).where(HostRow.id == host_id).values(**values))

        self.run(execute())

    def host_of(self, sandbox_id: str) -> FakeHost:
        for host in self.hosts:
            if sandbox_id in host.agent.sandboxes:
                return host
        raise AssertionError(f"{sandbox_id} is on no host")

    def close(self) -> None:
        for served in reversed(self._served):
            with contextlib.suppress(Exception):  # keep tearing down the rest
                served.stop()
        self.loop.close()
        self._state.cleanup()


@pytest.fixture
def make_stack(database_url: str) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(**overrides: Any) -> Stack:
        stack = Stack(database_url, **overrides)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """A control plane with one fake host serving template ``base``."""
    s = make_stack()
    s.add_host()
    return s


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll until ``predicate`` holds (a condition, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
