"""CLI fixtures: a real ``wrenn-cp`` process on a free loopback port with a temporary SQLite
database, one FakeHostAgent (the control plane tests' TEST DOUBLE of a host agent) registered
with it, whose forwarding path (the control plane tests' ``ForwardingHost``, also a TEST
DOUBLE) leads every sandbox's envd traffic to one real envd process, and ``Cli`` — the
``wrenn`` Typer app run in-process with Typer's CliRunner."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from tests.conftest import EnvdProcess, free_port
from tests.controlplane.conftest import LoopThread, Served
from tests.controlplane.fake_agent import FakeHostAgent
from tests.controlplane.forward_double import ForwardingHost
from wrenn.cli import app

_KEY_LINE = re.compile(r"its API key \(shown once\): (\S+)")


class ControlPlaneProcess:
    """``wrenn-cp`` as a subprocess; ``admin_key`` is the key it prints on its first start
    with an empty database. ``stop()`` ends it by PID and removes its directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wrenn-cli-cp-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "cp.log"
        self.env = {
            **os.environ,
            "WRENN_CP_HOST": "127.0.0.1",
            "WRENN_CP_PORT": str(self.port),
            "WRENN_CP_STATE_DIR": str(self.dir),
            "WRENN_CP_DATABASE_URL": f"sqlite+aiosqlite:///{self.dir}/controlplane.db",
            # One heartbeat keeps a test-double host live for the whole session.
            "WRENN_CP_HEARTBEAT_WINDOW_S": "3600",
            "WRENN_CP_RESERVE_MEMORY_MIB": "0",
            "WRENN_CP_RESERVE_DISK_MIB": "0",
            # No proxy port of its own: the API port routes sandbox traffic to it as well.
            "WRENN_CP_PROXY_PORT": "0",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            with self.log.open("wb") as out:
                self.proc = subprocess.Popen(
                    [str(Path(sys.executable).parent / "wrenn-cp")],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
            self.admin_key = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn-cp exited early:\n{self.logs()}")
            found = _KEY_LINE.search(self.logs())
            if found:
                try:
                    if httpx.get(f"{self.url}/health", timeout=1).status_code == 204:
                        return found.group(1)
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"wrenn-cp never became ready:\n{self.logs()}")

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.admin_key}, timeout=60)

    def new_team(self, name: str) -> tuple[str, str]:
        """A non-admin team and an API key for it."""
        with self.admin() as admin:
            team = admin.post("/v1/teams", json={"name": name}).json()
            key = admin.post(f"/v1/teams/{team['teamID']}/api-keys", json={"name": "k"})
        return team["teamID"], key.json()["key"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class FakeHosts:
    """FakeHostAgent TEST DOUBLES served on loopback and registered with the control plane."""

    cp: ControlPlaneProcess
    loop: LoopThread = field(default_factory=LoopThread)
    served: list[Served] = field(default_factory=list)

    def add(
        self, agent: FakeHostAgent | None = None, *, envd_url: str | None = None
    ) -> tuple[str, FakeHostAgent]:
        """A registered, heartbeating host; with ``envd_url``, its sandboxes' envd traffic
        (through the control plane's proxy) reaches that envd."""
        agent = agent or FakeHostAgent()
        app = agent.asgi() if envd_url is None else ForwardingHost(agent, envd_url)
        served = Served(self.loop, app)
        self.served.append(served)
        with self.cp.admin() as admin:
            token = admin.post("/v1/hosts/tokens").json()["token"]
            reg = admin.post("/v1/hosts/register", json={"token": token, "address": served.url})
            assert reg.status_code == 201, reg.text
            host_id, secret = reg.json()["hostID"], reg.json()["hostSecret"]
            beat = admin.post(
                f"/v1/hosts/{host_id}/heartbeat",
                json=agent.heartbeat_body(),
                headers={"Authorization": f"Bearer {secret}"},
            )
            assert beat.status_code == 200, beat.text
        return host_id, agent

    def close(self) -> None:
        for served in reversed(self.served):
            served.stop()
        self.loop.close()


@pytest.fixture(scope="session")
def cp() -> Iterator[ControlPlaneProcess]:
    proc = ControlPlaneProcess()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def sandbox_envd() -> Iterator[EnvdProcess]:
    """The envd behind every sandbox of ``fake_host`` — its own, as /init gives it an access
    token (the shared ``envd`` fixture is left as other tests expect it)."""
    proc = EnvdProcess()
    yield proc
    proc.stop()
    proc.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def fake_host(
    cp: ControlPlaneProcess, sandbox_envd: EnvdProcess
) -> Iterator[tuple[str, FakeHostAgent]]:
    """One host for the session, serving template ``base``; its sandboxes' envd is
    ``sandbox_envd``."""
    hosts = FakeHosts(cp)
    try:
        yield hosts.add(envd_url=sandbox_envd.url)
    finally:
        hosts.close()


@dataclass
class Cli:
    """``wrenn`` run in-process; the environment holds only what a test gives it."""

    api_url: str
    api_key: str | None
    config: Path

    def __call__(self, *args: str, key: str | None = "", api_url: str | None = None) -> Result:
        env: dict[str, str | None] = {
            "WRENN_API_URL": api_url or self.api_url,
            "WRENN_API_KEY": self.api_key if key == "" else key,
            "WRENN_SANDBOX_URL": None,
            "WRENN_CONFIG": str(self.config),
            "COLUMNS": "200",
        }
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def team(cp: ControlPlaneProcess, request: pytest.FixtureRequest) -> tuple[str, str]:
    """A team of this test's own, so listings hold only what the test made."""
    return cp.new_team(request.node.name[:100])


@pytest.fixture
def cli(
    cp: ControlPlaneProcess,
    fake_host: tuple[str, FakeHostAgent],
    team: tuple[str, str],
    tmp_path: Path,
) -> Cli:
    """The CLI with a non-admin team's key."""
    return Cli(cp.url, team[1], tmp_path / "config.toml")


@pytest.fixture
def admin_cli(cp: ControlPlaneProcess, fake_host: tuple[str, FakeHostAgent], tmp_path: Path) -> Cli:
    return Cli(cp.url, cp.admin_key, tmp_path / "admin-config.toml")


@pytest.fixture(autouse=True)
def _cp_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "cp" in request.fixturenames:
        proc: ControlPlaneProcess = request.getfixturevalue("cp")
        sys.stderr.write(f"--- wrenn-cp log (tail) ---\n{proc.logs()[-4000:]}\n")
