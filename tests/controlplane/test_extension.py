"""The extension interface on SQLite and PostgreSQL with the example extension under
tests/controlplane/example_extension: its migration runs after ours, its route is served and
audited, its worker runs in the server's TaskGroup, its middleware wraps the API; and
``run(extensions=...)`` is the whole process — API and proxy ports — as ``wrenn-cp`` is."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from tests.conftest import free_port
from tests.controlplane import example_extension
from tests.controlplane.conftest import Stack, wait_for
from tests.controlplane.test_storage import HEAD
from wrenn.controlplane import Extension
from wrenn.controlplane.db.migrate import current_heads

REPO = Path(__file__).resolve().parents[2]


def test_extension_route_worker_middleware_and_migration(make_stack: Any) -> None:
    assert isinstance(example_extension.EXTENSION, Extension)
    stack: Stack = make_stack(extensions=[example_extension.EXTENSION])
    stack.add_host()
    heads = stack.run(current_heads(stack.cp.db.engine))
    assert heads == {HEAD, "example0001"}

    _, key = stack.new_team("ext")
    me = stack.client(key)
    resp = me.post("/v1/example/notes", json={"note": "hello"})
    assert resp.status_code == 201, resp.text
    assert resp.headers["x-example"] == "1"
    note_id = resp.json()["id"]
    assert me.get("/v1/example/notes").json() == ["hello"]
    assert stack.admin.get("/v1/example/notes").json() == []  # notes are per team
    assert me.post("/v1/example/notes", json={"note": "x" * 500}).status_code == 400
    assert httpx.post(f"{stack.url}/v1/example/notes", json={"note": "x"}).status_code == 401

    audit = me.get("/v1/audit", params={"action": "example.*"}).json()
    assert [(e["action"], e["targetID"], e["result"]) for e in audit] == [
        ("example.add_note", "", "invalid_argument"),
        ("example.add_note", note_id, "ok"),
    ]
    # The extension's routes are in the OpenAPI document with ours.
    assert "/v1/example/notes" in httpx.get(f"{stack.url}/openapi.json").json()["paths"]

    # The worker recorded its start and sees events.
    async def worker_rows() -> list[str]:
        async with stack.cp.db.engine.connect() as conn:
            rows = await conn.execute(text("SELECT note FROM example_notes WHERE team_id = '-'"))
            return [str(r[0]) for r in rows]

    wait_for(lambda: bool(stack.run(worker_rows())), "the worker's start row")
    assert [n.split()[:2] for n in stack.run(worker_rows())] == [["worker", "started"]]
    before = len(example_extension.SEEN)
    me.post("/v2/sandboxes", json={"templateID": "base"})
    wait_for(lambda: "sandbox.created" in example_extension.SEEN[before:], "the worker's event")


def test_run_is_the_whole_process() -> None:
    state = tempfile.mkdtemp(prefix="wrenn-run-")
    api_port, proxy_port = free_port(), free_port()
    env = {
        **os.environ,
        "WRENN_CP_PORT": str(api_port),
        "WRENN_CP_PROXY_PORT": str(proxy_port),
        "WRENN_CP_STATE_DIR": state,
        "WRENN_CP_DATABASE_URL": f"sqlite+aiosqlite:///{state}/cp.db",
    }
    script = (
        "from tests.controlplane.example_extension import EXTENSION\n"
        "from wrenn.controlplane import run\n"
        "run(extensions=[EXTENSION])\n"
    )
    log = Path(state) / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        key = ""

        def up() -> bool:
            nonlocal key
            assert proc.poll() is None, log.read_text()
            text = log.read_text()
            if "shown once): " not in text:
                return False
            key = text.split("shown once): ", 1)[1].split()[0]
            try:
                return httpx.get(f"http://127.0.0.1:{api_port}/health").status_code == 204
            except httpx.HTTPError:
                return False

        wait_for(up, "the control plane to serve", timeout_s=60)
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": key})
        assert api.post("/v1/example/notes", json={"note": "n"}).status_code == 201
        # The proxy port answers sandbox traffic (here: a sandbox that does not exist).
        resp = httpx.get(
            f"http://127.0.0.1:{proxy_port}/health",
            headers={"E2b-Sandbox-Id": "inope", "E2b-Sandbox-Port": "49983"},
        )
        assert (resp.status_code, resp.json()["code"]) == (404, "not_found")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output = log.read_text()
        shutil.rmtree(state, ignore_errors=True)
    assert "controlplane.started" in output and "example" in output
