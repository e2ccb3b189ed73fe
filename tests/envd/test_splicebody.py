"""Raw uploads spliced into their file (``envd.splicebody``), over real sockets to a real envd:
the file gets exactly the body, the connection closes after the answer (a short body keeps
it), ``Expect: 100-continue`` is answered, and an upload whose client went away (or whose
connection a restore aborts as a pre-snapshot zombie) removes the file it created and holds
no descriptor. Socket timeouts are safety nets, never assertions about speed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import EnvdProcess
from tests.envd.rawhttp import SAFETY_TIMEOUT_S, RawConn, open_conn
from tests.envd.test_sendfile import fds, settled_fds
from wrenn.envd.files import SPLICE_MIN_BYTES

BIG = 8 << 20


@pytest.fixture
def where() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wrenn-splice-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def within_safety(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` holds, waiting for it up to the safety timeout."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def removed(path: Path) -> bool:
    """Whether ``path`` is gone, once the upload's abort has run (or the safety timeout)."""
    return within_safety(lambda: not path.exists())


def received(path: Path, size: int) -> bool:
    """Whether ``path`` has ``size`` bytes (waiting for them up to the safety timeout)."""
    return within_safety(lambda: path.exists() and path.stat().st_size == size)


def logged(envd: EnvdProcess, event: str) -> bool:
    """Whether envd logged ``event`` (waiting for it up to the safety timeout)."""
    return within_safety(lambda: event in envd.logs())


def head(path: Path, length: int, *extra: str) -> bytes:
    lines = [
        f"POST /files?path={quote(str(path))}&username=root HTTP/1.1",
        "Host: envd",
        "Content-Type: application/octet-stream",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_the_file_gets_the_body_and_the_connection_closes(
    fresh_envd: EnvdProcess, where: Path, conns: list[RawConn]
) -> None:
    body = os.urandom(BIG)
    conn = open_conn(fresh_envd, conns)
    conn.send_raw(head(where / "a" / "big", len(body), "X-Metadata-Origin: splice") + body)
    reply = conn.read_reply()
    assert reply.status == 200, reply.body
    assert json.loads(reply.body) == [
        {
            "name": "big",
            "type": "file",
            "path": str(where / "a" / "big"),
            "metadata": {"origin": "splice"},
        }
    ]
    assert reply.closes
    assert conn.closed_by_peer()
    assert (where / "a" / "big").read_bytes() == body
    assert os.getxattr(where / "a" / "big", "user.origin") == b"splice"


def test_a_short_body_keeps_the_connection(
    fresh_envd: EnvdProcess, where: Path, conns: list[RawConn]
) -> None:
    body = os.urandom(SPLICE_MIN_BYTES - 1)
    conn = open_conn(fresh_envd, conns)
    target = f"/files?path={quote(str(where / 'short'))}&username=root"
    octets = [("Content-Type", "application/octet-stream")]
    reply = conn.request("POST", target, body, octets)
    assert reply.status == 200 and not reply.closes
    assert (where / "short").read_bytes() == body
    assert conn.request("GET", "/health").status == 204


def test_expect_continue(fresh_envd: EnvdProcess, where: Path, conns: list[RawConn]) -> None:
    body = os.urandom(BIG)
    conn = open_conn(fresh_envd, conns)
    conn.send_raw(head(where / "expected", len(body), "Expect: 100-continue"))
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += conn.sock.recv(1024)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    conn.send_raw(body)
    assert conn.read_reply().status == 200
    assert (where / "expected").read_bytes() == body


def test_client_gone_mid_body(fresh_envd: EnvdProcess, where: Path, conns: list[RawConn]) -> None:
    probe = open_conn(fresh_envd, conns)
    assert probe.request("GET", "/health").status == 204
    baseline = fds(fresh_envd)

    conn = RawConn(fresh_envd.port)
    conn.send_raw(head(where / "cut", BIG) + os.urandom(BIG // 2))
    conn.close()
    assert settled_fds(fresh_envd, baseline) == baseline
    assert removed(where / "cut")
    assert logged(fresh_envd, "files.upload_aborted")
    assert probe.request("GET", "/health").status == 204
    assert "Traceback" not in fresh_envd.logs()


def test_stalled_upload_is_a_zombie_after_restore(
    fresh_envd: EnvdProcess, where: Path, conns: list[RawConn]
) -> None:
    """An upload whose client froze with the VM: after the restore its connection is aborted
    like any other pre-snapshot one, the file it created is gone."""
    probe = open_conn(fresh_envd, conns)
    assert probe.request("GET", "/health").status == 204
    baseline = fds(fresh_envd)

    stalled = open_conn(fresh_envd, conns)
    stalled.send_raw(head(where / "stalled", BIG) + os.urandom(2 * SPLICE_MIN_BYTES))
    assert open_conn(fresh_envd, conns).request("POST", "/snapshot/prepare").status == 204
    assert stalled.open_now()
    init = open_conn(fresh_envd, conns)
    assert init.request("POST", "/init", b"{}").status == 204

    assert stalled.closed_by_peer()
    # The probe (idle at the prepare) closed, the /init's connection open: one each way.
    assert settled_fds(fresh_envd, baseline) == baseline
    assert removed(where / "stalled")
    assert init.request("GET", "/health").status == 204
    assert "Traceback" not in fresh_envd.logs()


def test_stop_ends_a_stalled_upload(fresh_envd: EnvdProcess, where: Path) -> None:
    """envd asked to stop while an upload waits for the rest of its body: the graceful window
    runs out, the upload is cancelled (any splice in flight finished before its descriptors
    close), the file it created is removed, and envd exits."""
    stalled = RawConn(fresh_envd.port)
    try:
        stalled.send_raw(head(where / "stalled", BIG) + os.urandom(2 * SPLICE_MIN_BYTES))
        assert received(where / "stalled", 2 * SPLICE_MIN_BYTES)
        fresh_envd.proc.send_signal(signal.SIGTERM)
        # uvicorn ends by raising the signal it was stopped with again.
        assert fresh_envd.proc.wait(SAFETY_TIMEOUT_S) == -signal.SIGTERM
    finally:
        stalled.close()
    assert "timeout graceful shutdown exceeded" in fresh_envd.logs()
    assert not (where / "stalled").exists()
