"""A second start on the same state, as a second ``make run``: the stack stops cleanly with a
paused sandbox on its disk, comes back without rebuilding anything, keeps earlier keys
working, resumes the paused sandbox where it was, and a kill then stops its VM."""

from __future__ import annotations

import time

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState

from tests.e2e.conftest import Sandboxes, Stack
from tests.integration.agent.agent_harness import Leftovers

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def _vmm_processes(stack: Stack) -> int:
    return Leftovers.count(stack.home).vmm_processes


def test_paused_sandbox_survives_a_restart(
    stack: Stack, sdk_env: dict[str, str], sandboxes: Sandboxes, run_id: str
) -> None:
    sbx = sandboxes.create(metadata={"role": "across-restart"})
    sbx.files.write("/home/user/kept.txt", "kept")
    sbx.files.write("/tmp/in-memory.txt", "in memory")
    assert sbx.pause() is True
    assert _vmm_processes(stack) == 0

    first_key = sdk_env["E2B_API_KEY"]
    assert stack.restart() == 0
    shutdown = stack.output().rsplit("SIGINT: stopping", 1)[-1].split("Wrenn is ready.")[0]
    assert "Traceback" not in shutdown
    assert "image.built" not in stack.run_output()  # image and template came from the cache
    assert "template.built" not in stack.run_output()
    assert stack.quickstart.env["E2B_API_KEY"] != first_key  # a new key each start ...

    # ... and the earlier one (the SDK's) still works, on the same team.
    query = SandboxQuery(metadata={"e2e": run_id, "role": "across-restart"})
    [listed] = Sandbox.list(query=query).next_items()
    assert (listed.sandbox_id, listed.state) == (sbx.sandbox_id, SandboxState.PAUSED)

    sbx.connect()
    assert sbx.files.read("/home/user/kept.txt") == "kept"
    assert sbx.files.read("/tmp/in-memory.txt") == "in memory"
    assert _vmm_processes(stack) == 1

    assert sbx.kill() is True
    for _ in range(50):  # the agent has stopped the VM when kill returns; its exit is reaped
        if _vmm_processes(stack) == 0:
            break
        time.sleep(0.1)
    assert _vmm_processes(stack) == 0
