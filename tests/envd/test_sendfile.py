"""Downloads sent with sendfile(2) (``envd.sendfile``), over real sockets to a real envd: the
bytes arrive whole, the connection serves its next request, and a download whose reader went
away (or whose connection a restore aborts as a pre-snapshot zombie) ends without holding the
connection or a descriptor. Socket timeouts are safety nets, never assertions about speed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import EnvdProcess
from tests.envd.rawhttp import SAFETY_TIMEOUT_S, RawConn, open_conn

BIG = 64 << 20


@pytest.fixture(scope="module")
def files() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wrenn-sendfile-"))
    with (path / "big").open("wb") as f:
        for _ in range(BIG >> 20):
            f.write(os.urandom(1 << 20))
    (path / "empty").write_bytes(b"")
    (path / "one").write_bytes(b"x")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def target(path: Path) -> str:
    return f"/files?path={quote(str(path))}&username=root"


def fds(envd: EnvdProcess) -> int:
    return len(os.listdir(f"/proc/{envd.proc.pid}/fd"))


def settled_fds(envd: EnvdProcess, baseline: int) -> int:
    """envd's descriptor count once it is back to ``baseline`` (or the safety timeout)."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while (count := fds(envd)) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def start_download(conn: RawConn, path: Path) -> bytes:
    """Send the request and read until the head is in; what of the body came with it."""
    conn.send_raw(f"GET {target(path)} HTTP/1.1\r\nHost: envd\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        piece = conn.sock.recv(65536)
        assert piece, "closed before the head"
        got += piece
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def drain(conn: RawConn) -> int:
    """Read until envd closes the connection; the bytes read."""
    total = 0
    try:
        while piece := conn.sock.recv(1 << 20):
            total += len(piece)
    except ConnectionResetError:
        pass
    return total


def test_download_arrives_whole_and_the_connection_goes_on(
    fresh_envd: EnvdProcess, files: Path, conns: list[RawConn]
) -> None:
    conn = open_conn(fresh_envd, conns)
    for name in ("big", "empty", "one", "big"):
        reply = conn.request("GET", target(files / name))
        assert reply.status == 200
        assert not reply.closes
        data = (files / name).read_bytes()
        assert int(reply.headers["content-length"]) == len(data)
        assert hashlib.sha256(reply.body).digest() == hashlib.sha256(data).digest()
    assert conn.request("GET", "/health").status == 204
    assert "Traceback" not in fresh_envd.logs()


def test_head_sends_no_body(fresh_envd: EnvdProcess, files: Path, conns: list[RawConn]) -> None:
    conn = open_conn(fresh_envd, conns)
    reply = conn.request("HEAD", target(files / "big"))
    assert reply.status == 200
    assert reply.headers["content-length"] == str(BIG)
    assert reply.body == b""
    assert conn.request("GET", "/health").status == 204


def test_reader_gone_mid_download(
    fresh_envd: EnvdProcess, files: Path, conns: list[RawConn]
) -> None:
    probe = open_conn(fresh_envd, conns)
    assert probe.request("GET", "/health").status == 204
    baseline = fds(fresh_envd)

    for linger in (False, True):  # an orderly close, then a reset
        conn = RawConn(fresh_envd.port)
        start_download(conn, files / "big")
        conn.sock.recv(1 << 20)
        if linger:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        assert settled_fds(fresh_envd, baseline) == baseline

    assert probe.request("GET", "/health").status == 204
    assert "files.download_cut" in fresh_envd.logs()
    assert "Traceback" not in fresh_envd.logs()


def test_stalled_download_is_a_zombie_after_restore(
    fresh_envd: EnvdProcess, files: Path, conns: list[RawConn]
) -> None:
    """A download whose reader stopped reading when the VM froze: after the restore its
    connection is aborted like any other pre-snapshot one, the send in progress ends."""
    probe = open_conn(fresh_envd, conns)
    assert probe.request("GET", "/health").status == 204
    baseline = fds(fresh_envd)

    stalled = open_conn(fresh_envd, conns)
    early = len(start_download(stalled, files / "big"))
    # envd fills the socket's buffers, then waits for room that never comes.
    assert open_conn(fresh_envd, conns).request("POST", "/snapshot/prepare").status == 204
    assert stalled.open_now()
    init = open_conn(fresh_envd, conns)
    assert init.request("POST", "/init", b"{}").status == 204

    assert early + drain(stalled) < BIG
    # The probe (idle at the prepare) closed, the /init's connection open: one each way.
    assert settled_fds(fresh_envd, baseline) == baseline
    assert init.request("GET", "/health").status == 204
    assert "Traceback" not in fresh_envd.logs()


def test_stop_ends_a_stalled_download(fresh_envd: EnvdProcess, files: Path) -> None:
    """envd asked to stop while a download waits for a reader that never reads: the graceful
    window runs out, the response is cancelled, its sending thread ends with it, and envd
    exits (a thread left waiting for room would hold the interpreter's exit for good)."""
    stalled = RawConn(fresh_envd.port)
    try:
        start_download(stalled, files / "big")
        fresh_envd.proc.send_signal(signal.SIGTERM)
        # uvicorn ends by raising the signal it was stopped with again.
        assert fresh_envd.proc.wait(SAFETY_TIMEOUT_S) == -signal.SIGTERM
    finally:
        stalled.close()
    assert "timeout graceful shutdown exceeded" in fresh_envd.logs()
