"""What ``wrenn up --quickstart`` relies on, against a real ``wrenn-cp``: where it says the
stack listens, ``create-key`` adding keys to one team across runs, and a control plane that
stops on Ctrl-C (SIGINT) cleanly. The whole quick start with a real host agent is covered by
``tests/e2e`` (its session fixture is ``wrenn up --quickstart``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from wrenn.cli.quickstart import Endpoints, banner, create_key

CP_SCRIPT = str(Path(sys.executable).parent / "wrenn-cp")


def test_endpoints_from_the_environment() -> None:
    api = "http://127.0.0.1:3000"
    default = Endpoints.of(api, {}, with_agent=True)
    assert default == Endpoints(api, "http://127.0.0.1:3001", "http://127.0.0.1:5007")
    custom = Endpoints.of(
        api,
        {"WRENN_CP_HOST": "0.0.0.0", "WRENN_CP_PROXY_PORT": "4001", "WRENN_AGENT_PORT": "6007"},
        with_agent=True,
    )
    assert custom == Endpoints(api, "http://127.0.0.1:4001", "http://127.0.0.1:6007")
    no_proxy_port = Endpoints.of(api, {"WRENN_CP_PROXY_PORT": "0"}, with_agent=False)
    assert no_proxy_port == Endpoints(api, api, None)


def test_banner_holds_the_three_variables_and_five_lines_of_sdk() -> None:
    text = banner(Endpoints("http://a:1", "http://a:2", None), "wrn_k", ".venv/bin/python")
    assert "export E2B_API_URL=http://a:1 E2B_SANDBOX_URL=http://a:2 E2B_API_KEY=wrn_k" in text
    example = re.search(r"^\.venv/bin/python - <<'EOF'\n(.*?)^EOF$", text, re.M | re.S)
    assert example is not None
    lines = example.group(1).splitlines()
    assert len(lines) == 5 and lines[0] == "from e2b import Sandbox"
    compile(example.group(1), "example", "exec")


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("WRENN_CP_")},
        "WRENN_CP_STATE_DIR": str(tmp_path),
        "WRENN_CP_HOST": "127.0.0.1",
        "WRENN_CP_PORT": str(free_port()),
        "WRENN_CP_PROXY_PORT": str(free_port()),
    }


def _team_of(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [CP_SCRIPT, "create-key", *args], env=env, capture_output=True, text=True, check=True
    )
    team, key = done.stdout.strip().splitlines()[-2:]
    assert key.split()[-1].startswith("wrn_")
    return team.split()[-1]


def test_create_key_adds_keys_to_one_team(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = _team_of(env, "--team", "default")
    assert _team_of(env, "--team", "default") == first
    assert _team_of(env, "--team", "default", "--admin") != first
    assert _team_of(env, "--team", "other") != first
    assert create_key(CP_SCRIPT, env) != create_key(CP_SCRIPT, env)


def test_control_plane_stops_on_sigint_without_a_traceback(tmp_path: Path) -> None:
    env = _env(tmp_path)
    log = tmp_path / "cp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [CP_SCRIPT], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{env['WRENN_CP_PORT']}/health"
        for _ in range(300):
            try:
                if httpx.get(url, timeout=1).status_code == 204:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
