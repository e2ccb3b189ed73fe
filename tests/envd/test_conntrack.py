"""Snapshot safety of envd's client connections, with real sockets against a real envd.

A connection's fate is observed from the client side: a request answered on it, or the peer
closing it (EOF or reset). Socket timeouts are safety nets, never assertions about speed.
"""

from __future__ import annotations

import json

from tests.conftest import EnvdProcess
from tests.envd.rawhttp import RawConn, open_conn


def test_prepare_closes_idle_keep_alive_connections(
    fresh_envd: EnvdProcess, conns: list[RawConn]
) -> None:
    idle = open_conn(fresh_envd, conns)
    first = idle.request("GET", "/health")
    assert first.status == 204 and not first.closes

    caller = open_conn(fresh_envd, conns)
    prepared = caller.request("POST", "/snapshot/prepare")
    assert prepared.status == 204
    # keep-alive is off from prepare on: its own response ends its connection
    assert prepared.closes
    assert caller.closed_by_peer()
    assert idle.closed_by_peer()


def test_restore_keeps_new_connections_and_aborts_old_ones(
    fresh_envd: EnvdProcess, conns: list[RawConn]
) -> None:
    # A request answered, then the first bytes of a second one in the same segment: the
    # connection is busy (not idle) when prepare runs, so prepare leaves it open.
    busy = open_conn(fresh_envd, conns)
    busy.send_raw(b"GET /health HTTP/1.1\r\nHost: envd\r\n\r\nGET /health HTTP/1.1\r\n")
    assert busy.read_reply().status == 204

    assert open_conn(fresh_envd, conns).request("POST", "/snapshot/prepare").status == 204
    assert busy.open_now()

    # Opened after the snapshot: must survive the restore.
    after = open_conn(fresh_envd, conns)
    after.send_raw(b"GET /envs HTTP/1.1\r\nHost: envd\r\n")

    init = open_conn(fresh_envd, conns)
    reply = init.request("POST", "/init", b'{"envVars": {"RESTORED": "1"}}')
    assert reply.status == 204
    # keep-alive is back on, the /init's own connection stays usable
    assert not reply.closes
    assert init.request("GET", "/health").status == 204

    assert busy.closed_by_peer()

    after.send_raw(b"\r\n")
    envs = after.read_reply()
    assert envs.status == 200
    assert b"RESTORED" in envs.body
    assert not envs.closes


def test_keep_alive_off_after_prepare_and_on_after_init(
    fresh_envd: EnvdProcess, conns: list[RawConn]
) -> None:
    assert open_conn(fresh_envd, conns).request("POST", "/snapshot/prepare").status == 204

    during = open_conn(fresh_envd, conns)
    reply = during.request("GET", "/health")
    assert reply.status == 204 and reply.closes
    assert during.closed_by_peer()

    assert open_conn(fresh_envd, conns).request("POST", "/init", b"{}").status == 204

    after = open_conn(fresh_envd, conns)
    for _ in range(3):
        reply = after.request("GET", "/health")
        assert reply.status == 204 and not reply.closes


def test_prepare_is_idempotent(fresh_envd: EnvdProcess, conns: list[RawConn]) -> None:
    for _ in range(2):
        assert open_conn(fresh_envd, conns).request("POST", "/snapshot/prepare").status == 204
    # The heap is collected and frozen once, by the first prepare (a template's, for every
    # sandbox restored from it); later ones leave it alone.
    prepared = [
        json.loads(line) for line in fresh_envd.logs().splitlines() if '"snapshot.prepared"' in line
    ]
    assert [p["gc_collected"] is None for p in prepared] == [False, True]
    init = open_conn(fresh_envd, conns)
    assert init.request("POST", "/init", b"{}").status == 204
    assert init.request("GET", "/health").status == 204


def test_init_without_prepare_keeps_connections(
    fresh_envd: EnvdProcess, conns: list[RawConn]
) -> None:
    idle = open_conn(fresh_envd, conns)
    assert idle.request("GET", "/health").status == 204

    assert open_conn(fresh_envd, conns).request("POST", "/init", b"{}").status == 204

    reply = idle.request("GET", "/health")
    assert reply.status == 204 and not reply.closes
