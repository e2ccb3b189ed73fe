"""Events and webhook channels on SQLite and PostgreSQL, delivered to a real HTTP receiver on
127.0.0.1 that checks every signature itself (HMAC-SHA256 over "<t>.<body>"): the sandbox and
host events, event filters, retries with backoff until a 2xx, giving up after the last
attempt, and the channel API."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from tests.controlplane.conftest import Stack, wait_for
from tests.controlplane.fake_agent import FakeHostAgent

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass
class Received:
    event: dict[str, Any]
    headers: dict[str, str]
    signature_ok: bool


@dataclass
class Receiver:
    """A webhook endpoint: answers with ``statuses`` in turn (then 200) and records what it
    got, checking each signature against ``secret``."""

    server: ThreadingHTTPServer
    secret: str = ""
    statuses: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def types(self) -> list[str]:
        with self.lock:
            return [r.event["type"] for r in self.got]


def _check(secret: str, header: str, body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(","))
    if abs(time.time() - int(parts["t"])) > 300:
        return False
    expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec = holder[0]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with rec.lock:
                rec.got.append(
                    Received(
                        json.loads(body),
                        dict(self.headers.items()),
                        _check(rec.secret, self.headers["Wrenn-Signature"], body),
                    )
                )
                status = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()
    thread.join(10)


def add_channel(stack: Stack, client: Any, receiver: Receiver, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/channels", json={"url": receiver.url, **body})
    assert resp.status_code == 201, resp.text
    channel: dict[str, Any] = resp.json()
    assert channel["secret"].startswith("whsec_")
    receiver.secret = channel["secret"]
    return channel


def test_sandbox_events_reach_the_team_signed(stack: Stack, receiver: Receiver) -> None:
    team_id, key = stack.new_team("hooks")
    me = stack.client(key)
    channel = add_channel(stack, me, receiver, events=["sandbox.*"], name="mine")

    sid = me.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"k": "v"}}).json()[
        "sandboxID"
    ]
    assert me.post(f"/sandboxes/{sid}/pause").status_code == 204
    assert me.post(f"/sandboxes/{sid}/connect", json={}).status_code == 201
    assert me.delete(f"/sandboxes/{sid}").status_code == 204
    expected = ["sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.killed"]
    wait_for(lambda: len(receiver.types()) >= 4, "four deliveries")
    assert sorted(receiver.types()) == sorted(expected)
    for got in receiver.got:
        assert got.signature_ok
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["Wrenn-Event"] == got.event["type"]
        assert got.event["teamID"] == team_id
        assert got.event["data"]["sandboxID"] == sid
        assert got.event["data"]["metadata"] == {"k": "v"}
        assert got.event["id"].startswith("evt_")

    # Committed in order, so recorded in order (each outcome is recorded once the receiver has
    # answered: a delivery just received may not be marked delivered yet).
    def recorded() -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = me.get(
            f"/v1/channels/{channel['channelID']}/deliveries"
        ).json()
        return listed

    wait_for(
        lambda: all(d["status"] == "delivered" for d in recorded()), "four deliveries recorded"
    )
    deliveries = recorded()
    assert [d["eventType"] for d in reversed(deliveries)] == expected
    assert {(d["status"], d["attempts"], d["lastStatus"]) for d in deliveries} == {
        ("delivered", 1, 200)
    }
    # Another team's sandboxes are not this channel's business.
    stack.admin.post("/v2/sandboxes", json={"templateID": "base"})
    time.sleep(0.3)  # let a wrong delivery, if any, arrive
    assert len(receiver.types()) == 4


def test_failed_create_is_an_event(stack: Stack, receiver: Receiver) -> None:
    add_channel(stack, stack.admin, receiver, events=["sandbox.failed"])
    stack.hosts[0].agent.fail_next["CreateSandbox"] = ConnectError(Code.INTERNAL, "disk full")
    resp = stack.admin.post("/v2/sandboxes", json={"templateID": "base"})
    assert resp.status_code == 500, resp.text
    wait_for(lambda: receiver.types() == ["sandbox.failed"], "the failed event")
    data = receiver.got[0].event["data"]
    assert data["reason"] == "create_failed" and "disk full" in data["error"]


def test_retries_with_backoff_until_delivered(stack: Stack, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    channel = add_channel(stack, stack.admin, receiver, events=["sandbox.created"])
    stack.admin.post("/v2/sandboxes", json={"templateID": "base"})
    path = f"/v1/channels/{channel['channelID']}/deliveries"

    def delivered() -> bool:
        return bool(stack.admin.get(path).json()[0]["status"] == "delivered")

    wait_for(delivered, "delivery after two failures")
    delivery = stack.admin.get(path).json()[0]
    assert (delivery["attempts"], delivery["lastStatus"], delivery["lastError"]) == (3, 200, None)
    assert len(receiver.got) == 3
    # The same delivery id on every attempt, signed each time.
    assert len({r.headers["Wrenn-Delivery"] for r in receiver.got}) == 1
    assert all(r.signature_ok for r in receiver.got)


def test_gives_up_after_the_last_attempt(make_stack: Any, receiver: Receiver) -> None:
    stack: Stack = make_stack(webhook_max_attempts=3)
    stack.add_host()
    receiver.statuses = [500] * 10
    channel = add_channel(stack, stack.admin, receiver)
    stack.admin.post("/v2/sandboxes", json={"templateID": "base"})
    path = f"/v1/channels/{channel['channelID']}/deliveries"

    def failed() -> bool:
        found = stack.admin.get(path).json()
        return bool(found) and all(d["status"] == "failed" for d in found)

    wait_for(failed, "the delivery to fail")
    delivery = stack.admin.get(path).json()[0]
    assert (delivery["attempts"], delivery["lastStatus"]) == (3, 500)
    assert delivery["lastError"] == "HTTP 500"
    time.sleep(0.5)  # past the capped backoff: no fourth attempt
    assert len(receiver.got) == 3


def test_host_events_go_to_admin_channels(make_stack: Any, receiver: Receiver) -> None:
    stack: Stack = make_stack()
    add_channel(stack, stack.admin, receiver, events=["host.*"])
    _, key = stack.new_team("plain")
    plain = stack.client(key)
    other = plain.post("/v1/channels", json={"url": receiver.url, "events": ["*"]})
    assert other.status_code == 201

    host = stack.add_host(FakeHostAgent())
    wait_for(lambda: receiver.types() == ["host.up"], "host.up")
    stack.heartbeat(host)  # a live host's heartbeat is no news
    event = receiver.got[0].event
    assert event["teamID"] is None and event["data"]["hostID"] == host.host_id

    stack.update_host(host.host_id, last_heartbeat_at=LONG_AGO)
    report = stack.run(stack.reconciler().tick())
    assert report.hosts_down == [host.host_id]
    stack.heartbeat(host)
    wait_for(lambda: receiver.types() == ["host.up", "host.down", "host.up"], "down and up")
    assert all(r.signature_ok for r in receiver.got)


def test_channel_api(stack: Stack, receiver: Receiver) -> None:
    _, key = stack.new_team("crud")
    me, other = stack.client(key), stack.client(stack.new_team("other")[1])
    created = add_channel(stack, me, receiver, events=["sandbox.created", "host.down"])
    cid = created["channelID"]
    listed = me.get("/v1/channels").json()
    assert [c["channelID"] for c in listed] == [cid]
    assert "secret" not in listed[0] and "secret" not in me.get(f"/v1/channels/{cid}").json()
    assert other.get(f"/v1/channels/{cid}").status_code == 404
    assert other.delete(f"/v1/channels/{cid}").status_code == 404

    updated = me.patch(f"/v1/channels/{cid}", json={"events": ["sandbox.killed"], "enabled": False})
    assert updated.status_code == 200
    assert (updated.json()["events"], updated.json()["enabled"]) == (["sandbox.killed"], False)
    sid = me.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    me.delete(f"/sandboxes/{sid}")
    time.sleep(0.3)
    assert receiver.got == []  # disabled
    me.patch(f"/v1/channels/{cid}", json={"enabled": True})
    sid = me.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    me.delete(f"/sandboxes/{sid}")
    wait_for(lambda: receiver.types() == ["sandbox.killed"], "the killed event only")

    for bad in (
        {"url": "ftp://example.test/x"},
        {"url": "not a url"},
        {"url": receiver.url, "events": ["sandbox.exploded"]},
        {"url": receiver.url, "events": "sandbox.created"},
    ):
        resp = me.post("/v1/channels", json=bad)
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["code"] == "invalid_argument"
    assert me.delete(f"/v1/channels/{cid}").status_code == 204
    assert me.get(f"/v1/channels/{cid}").status_code == 404
    assert me.get(f"/v1/channels/{cid}/deliveries").status_code == 404
