"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EnvdProcess:
    """A real envd subprocess on a free loopback port; ``stop()`` ends it by PID."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="envd-", suffix=".log")[1])
        # Port forwarding off unless a test asks for it: on a developer machine it would
        # expose the machine's loopback-only services on its external address.
        full_env = {
            **os.environ,
            "WRENN_ENVD_LOG_LEVEL": "debug",
            "WRENN_ENVD_PORT_FORWARD_ADDRESS": "",
            **(env or {}),
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "wrenn.envd.main",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        self._wait_healthy()

    def _wait_healthy(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envd exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 204:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envd never became healthy:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def envd() -> Iterator[EnvdProcess]:
    """One envd for the session, serving requests as root by default."""
    proc = EnvdProcess()
    yield proc
    proc.stop()
    proc.log.unlink(missing_ok=True)


@pytest.fixture
def fresh_envd(request: pytest.FixtureRequest) -> Iterator[EnvdProcess]:
    """An envd of its own for tests that change /init state; logs printed on failure."""
    proc = EnvdProcess()
    yield proc
    proc.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        sys.stderr.write(f"--- envd log ---\n{proc.logs()}\n")
    proc.log.unlink(missing_ok=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
