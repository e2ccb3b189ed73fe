"""What ``make run`` prints is enough to use Wrenn: the example runs as printed, with the three
variables it shows and nothing else."""

from __future__ import annotations

import os
import subprocess

import pytest
from e2b import Sandbox

from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_printed_example_runs_as_printed(stack: Stack, sdk_env: dict[str, str]) -> None:
    quick = stack.quickstart
    assert set(quick.env) == {"E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"}
    assert quick.env["E2B_API_URL"] == f"http://127.0.0.1:{stack.api_port}"
    assert quick.env["E2B_SANDBOX_URL"] == f"http://127.0.0.1:{stack.proxy_port}"
    assert quick.env["E2B_API_KEY"].startswith("wrn_")
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    done = subprocess.run(
        [quick.python, "-"],
        input=quick.example,
        env={**env, **quick.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    system, *rest = [line for line in done.stdout.splitlines() if line]
    assert system.startswith("Linux ")
    assert rest == ["user", "hello"]
    # It killed its sandbox: none is left without this session's metadata.
    assert [s.sandbox_id for s in Sandbox.list().next_items() if "e2e" not in s.metadata] == []
