"""``wrenn up``: the real ``wrenn-cp`` under the supervisor, and the supervision itself with
scripted TEST DOUBLE children (one that stops on a signal, one that ignores SIGTERM, one
that exits on its own)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.conftest import Cli
from tests.conftest import free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Up:
    """``wrenn up`` as a child process; its output collected in a file."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="wrenn-up-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wrenn.cli", "up", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{self.output()}")

    def child_pids(self) -> dict[str, int]:
        return {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+\| started \(pid (\d+)\)", self.output(), re.M)
        }

    def close(self) -> None:
        pids = self.child_pids()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids.values():  # never leave a child behind, even when a test failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.unlink(missing_ok=True)


@pytest.fixture
def run_up() -> Iterator[type[Up]]:
    made: list[Up] = []

    class Tracked(Up):
        def __init__(self, args: list[str], env: dict[str, str]) -> None:
            super().__init__(args, env)
            made.append(self)

    yield Tracked
    for up in made:
        up.close()


def test_up_runs_the_control_plane_and_stops_on_ctrl_c(run_up: type[Up], tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "WRENN_CP_PORT": str(port),
        "WRENN_CP_STATE_DIR": str(tmp_path),
        "WRENN_CP_PROXY_PORT": "0",
        "WRENN_CONFIG": str(tmp_path / "config.toml"),
    }
    bin_dir = str(Path(sys.executable).parent)
    up = run_up(["--no-agent", "--bin-dir", bin_dir], env)
    up.wait_for(r"cp\s+\| .*controlplane\.started")
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 204
    cp_pid = up.child_pids()["cp"]

    up.proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
    assert up.proc.wait(60) == 0
    out = up.output()
    assert "up    | SIGINT: stopping" in out
    assert re.search(r"^cp\s+\| stopped \((exit code 0|signal SIGINT)\)$", out, re.M)
    # Structured log lines are rendered, not dumped as JSON.
    assert re.search(r"^cp\s+\| \d\d:\d\d:\d\d info\s+controlplane\.started port=", out, re.M)
    assert not _alive(cp_pid)


FAKE_CP = """\
#!{python}
import http.server, os, signal, sys, threading, time
if sys.argv[1:] == ["create-host-token"]:
    print("wrnr_faketoken")
    sys.exit(0)
def bye(signum, frame):
    print("cp got", signal.Signals(signum).name, flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
signal.signal(signal.SIGINT, bye)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(204 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["WRENN_CP_PORT"])), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("cp ready", flush=True)
while True:
    time.sleep(1)
"""

STUBBORN_AGENT = """\
#!{python}
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print('{{"event": "agent.started", "level": "info", "timestamp": "2026-01-02T03:04:05Z", '
      '"slots": 8}}', flush=True)
print("agent: control plane", os.environ.get("WRENN_AGENT_CONTROL_PLANE_URL"),
      "token", os.environ.get("WRENN_AGENT_REGISTRATION_TOKEN"), flush=True)
print("agent: not stopping for anyone", file=sys.stderr, flush=True)
while True:
    time.sleep(1)
"""

FAILING_CP = """\
#!{python}
import sys
if sys.argv[1:] == ["create-host-token"]:
    print("wrnr_faketoken")
    sys.exit(0)
print("cp cannot bind", flush=True)
sys.exit(3)
"""

QUIET_AGENT = """\
#!{python}
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("agent ready", flush=True)
while True:
    time.sleep(1)
"""


def _script(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body.format(python=sys.executable))
    path.chmod(0o755)


def test_up_forwards_the_signal_then_kills_after_the_grace_period(
    run_up: type[Up], tmp_path: Path
) -> None:
    _script(tmp_path, "wrenn-cp", FAKE_CP)
    _script(tmp_path, "wrenn-agent", STUBBORN_AGENT)
    port = free_port()
    env = {**os.environ, "WRENN_CP_PORT": str(port)}
    env.pop("WRENN_AGENT_CONTROL_PLANE_URL", None)
    env.pop("WRENN_AGENT_REGISTRATION_TOKEN", None)
    up = run_up(["--bin-dir", str(tmp_path), "--grace", "1"], env)
    up.wait_for(r"cp\s+\| cp ready")
    up.wait_for(r"agent \| agent: not stopping for anyone")
    # The agent is wired to this control plane, and started once it answered /health.
    up.wait_for(rf"agent \| agent: control plane http://127.0.0.1:{port} token wrnr_faketoken")
    out = up.output()
    assert out.index("cp ready") < out.index("agent | started")
    pids = up.child_pids()
    assert set(pids) == {"cp", "agent"}

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    out = up.output()
    assert "cp    | cp got SIGTERM" in out
    assert "agent | 03:04:05 info    agent.started slots=8" in out
    assert "agent | did not stop in time: SIGKILL" in out
    assert not _alive(pids["cp"]) and not _alive(pids["agent"])


def test_up_stops_everything_when_a_child_exits(run_up: type[Up], tmp_path: Path) -> None:
    _script(tmp_path, "wrenn-cp", FAKE_CP)
    _script(tmp_path, "wrenn-agent", QUIET_AGENT.replace("agent ready", "agent ready; bye"))
    env = {**os.environ, "WRENN_CP_PORT": str(free_port())}
    up = run_up(["--bin-dir", str(tmp_path), "--grace", "30"], env)
    up.wait_for(r"agent \| agent ready")
    os.kill(up.child_pids()["agent"], signal.SIGTERM)  # the agent ends on its own
    assert up.proc.wait(60) == 1
    out = up.output()
    assert "up    | agent ended (exit code 0); stopping" in out
    assert "cp    | cp got SIGTERM" in out
    assert not _alive(up.child_pids()["cp"])


def test_up_stops_when_the_control_plane_fails_to_start(run_up: type[Up], tmp_path: Path) -> None:
    _script(tmp_path, "wrenn-cp", FAILING_CP)
    _script(tmp_path, "wrenn-agent", QUIET_AGENT)
    env = {**os.environ, "WRENN_CP_PORT": str(free_port())}
    up = run_up(["--bin-dir", str(tmp_path)], env)
    assert up.proc.wait(60) == 1
    out = up.output()
    assert "cp    | cp cannot bind" in out
    assert "up    | cp ended (exit code 3); stopping" in out
    assert "agent | started" not in out  # never started: the control plane was not ready


def test_up_names_a_missing_script(tmp_path: Path) -> None:
    cli = Cli("http://127.0.0.1:9", None, tmp_path / "config.toml")
    result = cli("up", "--bin-dir", str(tmp_path))
    assert result.exit_code == 1
    assert f"wrenn-cp not found (looked in {tmp_path})" in result.stderr
    _script(tmp_path, "wrenn-cp", FAILING_CP)
    result = cli("up", "--bin-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "wrenn-agent not found" in result.stderr
