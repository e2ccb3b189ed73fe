"""One client TCP connection to envd speaking HTTP/1.1 through h11, for tests that watch a
connection's fate from the client side: a request answered on it, or the peer closing it (EOF
or reset). Socket timeouts are safety nets, never assertions about speed."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import h11

from tests.conftest import EnvdProcess

SAFETY_TIMEOUT_S = 20.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return "close" in self.headers.get("connection", "").lower()


class RawConn:
    """One client TCP connection to envd, speaking HTTP/1.1 through h11."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SAFETY_TIMEOUT_S)
        self.h11 = h11.Connection(h11.CLIENT)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> Reply:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        headers = [("Host", "envd"), ("Content-Length", str(len(body))), *headers]
        self.sock.sendall(self.h11.send(h11.Request(method=method, target=path, headers=headers)))
        if body:
            self.sock.sendall(self.h11.send(h11.Data(data=body)))
        self.sock.sendall(self.h11.send(h11.EndOfMessage()))
        return self.read_reply()

    def read_reply(self) -> Reply:
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, headers, bytes(body))
            else:
                raise AssertionError(f"unexpected {event!r}")

    def closed_by_peer(self) -> bool:
        """Block until envd closes the connection (True) or sends something (False)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def open_now(self) -> bool:
        """Whether no close from envd has arrived yet (non-blocking peek)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(SAFETY_TIMEOUT_S)

    def close(self) -> None:
        self.sock.close()


def open_conn(envd: EnvdProcess, made: list[RawConn]) -> RawConn:
    conn = RawConn(envd.port)
    made.append(conn)
    return conn
