"""``wrenn up --quickstart``: once sandboxes can be created, a fresh API key and how to use it.

The key belongs to the team named ``default`` (``wrenn-cp create-key`` creates it on first use
and adds keys to it after), so sandboxes made with an earlier run's key stay visible. The key
is made once the control plane answers ``/health``, after its first start has made the admin
team. Sandboxes can be created once the host agent answers ``/health`` (it has registered and
heartbeats) and the control plane lists the ``base`` template (the agent has built it)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from wrenn.core.errors import FailedPrecondition

TEAM = "default"
TEMPLATE = "base"
POLL_S = 1.0
KEY_TIMEOUT_S = 120.0
#: The host agent's and the proxy's defaults (``WRENN_AGENT_HOST`` / ``WRENN_AGENT_PORT``,
#: ``WRENN_CP_PROXY_PORT``).
AGENT_HOST = "127.0.0.1"
AGENT_PORT = "5007"
PROXY_PORT = "3001"


def _loopback(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Endpoints:
    api_url: str
    #: Where the SDK sends sandbox traffic (``E2B_SANDBOX_URL``): the proxy port, or the API
    #: port when the proxy has none of its own.
    sandbox_url: str
    #: The host agent ``wrenn up`` starts; ``None`` when it starts none.
    agent_url: str | None

    @classmethod
    def of(cls, api_url: str, env: Mapping[str, str], *, with_agent: bool) -> Endpoints:
        host = _loopback(env.get("WRENN_CP_HOST") or "127.0.0.1")
        proxy_port = env.get("WRENN_CP_PROXY_PORT") or PROXY_PORT
        sandbox_url = api_url if proxy_port == "0" else f"http://{host}:{proxy_port}"
        agent_url = None
        if with_agent:
            agent_host = _loopback(env.get("WRENN_AGENT_HOST") or AGENT_HOST)
            agent_url = f"http://{agent_host}:{env.get('WRENN_AGENT_PORT') or AGENT_PORT}"
        return cls(api_url=api_url, sandbox_url=sandbox_url, agent_url=agent_url)


def create_key(cp_script: str, env: Mapping[str, str]) -> str:
    """A new API key of the team ``default``, from ``wrenn-cp create-key``."""
    try:
        done = subprocess.run(
            [cp_script, "create-key", "--team", TEAM],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=KEY_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FailedPrecondition(f"`wrenn-cp create-key` failed: {err}") from err
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise FailedPrecondition(f"`wrenn-cp create-key` failed: {why}")
    return lines[-1].split()[-1]


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 204
    except httpx.HTTPError:
        return False


def _lists_template(api_url: str, key: str) -> bool:
    try:
        response = httpx.get(f"{api_url}/templates", headers={"X-API-Key": key}, timeout=5)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    return any(t.get("templateID") == TEMPLATE for t in response.json())


def python_command() -> str:
    """This installation's Python (it has the e2b SDK), relative when under the working
    directory (``.venv/bin/python`` after ``make run``)."""
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable


def banner(endpoints: Endpoints, key: str, python: str) -> str:
    """What to paste into another terminal: the SDK's three variables and five lines of it."""
    return "\n".join(
        [
            "",
            "Wrenn is ready.",
            "",
            f"  API URL        {endpoints.api_url}",
            f"  sandbox proxy  {endpoints.sandbox_url}",
            f"  API key        {key}   (team {TEAM!r}, new; shown once)",
            "",
            "Try it from another terminal with the e2b SDK:",
            "",
            f"export E2B_API_URL={endpoints.api_url} E2B_SANDBOX_URL={endpoints.sandbox_url} "
            f"E2B_API_KEY={key}",
            f"{python} - <<'EOF'",
            "from e2b import Sandbox",
            "sbx = Sandbox.create()",
            'print(sbx.commands.run("uname -sr && id -un").stdout)',
            'sbx.files.write("/tmp/hello.txt", "hello")',
            'print(sbx.files.read("/tmp/hello.txt")); sbx.kill()',
            "EOF",
            "",
            "Ctrl-C stops Wrenn: running sandboxes are stopped, paused ones are kept.",
            "",
        ]
    )


class Announcer:
    """A thread that waits for the stack, makes the key and shows the banner; ``stop()`` ends
    its waiting (it never blocks the supervisor, which may stop everything first)."""

    def __init__(
        self,
        endpoints: Endpoints,
        make_key: Callable[[], str],
        say: Callable[[str, str], None],
        show: Callable[[str], None],
    ) -> None:
        self.endpoints = endpoints
        self._make_key = make_key
        self._say = say
        self._show = show
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quickstart", daemon=True)

    def start(self) -> Announcer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Whether ``ready()`` came to hold before a stop."""
        while not self._stopped.is_set():
            if ready():
                return True
            self._stopped.wait(POLL_S)
        return False

    def _run(self) -> None:
        if not self._wait(lambda: _answers(self.endpoints.api_url)):
            return
        try:
            key = self._make_key()
        except FailedPrecondition as err:
            self._say(f"no API key for the quick start: {err.message}", "bold red")
            return
        if self.endpoints.agent_url is not None:
            agent_url = self.endpoints.agent_url
            if not _lists_template(self.endpoints.api_url, key):
                self._say(
                    f"waiting for the host agent to build the {TEMPLATE!r} template "
                    "(a minute on its first start)",
                    "bold",
                )
            if not self._wait(
                lambda: _answers(agent_url) and _lists_template(self.endpoints.api_url, key)
            ):
                return
        if not self._stopped.is_set():
            self._show(banner(self.endpoints, key, python_command()))
