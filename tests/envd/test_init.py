"""POST /init and GET /envs against a real envd."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import EnvdProcess
from tests.envd.conftest import connect


@pytest.fixture
def client(fresh_envd: EnvdProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fresh_envd.url, timeout=30) as c:
        yield c


def init(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post("/init", json=body)


def test_init_sets_env_vars_and_is_idempotent(client: httpx.Client) -> None:
    body = {"envVars": {"FOO": "bar", "EMPTY": ""}}
    assert init(client, body).status_code == 204
    assert init(client, body).status_code == 204
    response = client.get("/envs")
    assert response.status_code == 200
    assert response.json() == {"FOO": "bar", "EMPTY": ""}


def test_later_init_merges_env_vars(client: httpx.Client) -> None:
    assert init(client, {"envVars": {"A": "1", "B": "2"}}).status_code == 204
    assert init(client, {"envVars": {"B": "3", "C": "4"}}).status_code == 204
    assert init(client, {}).status_code == 204
    assert client.get("/envs").json() == {"A": "1", "B": "3", "C": "4"}


def test_unknown_fields_and_timestamp_are_tolerated(client: httpx.Client) -> None:
    body = {
        "envVars": {"X": "y"},
        "timestamp": "2001-02-03T04:05:06Z",
        "hyperloopIP": "10.0.0.1",
        "somethingNew": {"nested": [1, 2]},
    }
    assert init(client, body).status_code == 204
    assert client.get("/envs").json() == {"X": "y"}


def test_empty_body_is_accepted(client: httpx.Client) -> None:
    assert client.post("/init").status_code == 204


def assert_invalid(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_argument"
    for word in words:
        assert word in body["message"]


def test_unknown_default_user_is_named_and_changes_nothing(client: httpx.Client) -> None:
    response = init(client, {"envVars": {"NOPE": "1"}, "defaultUser": "no-such-user-here"})
    assert_invalid(response, "no-such-user-here")
    assert client.get("/envs").json() == {}


@pytest.mark.parametrize("workdir", ["relative/dir", "/no/such/dir/here"])
def test_bad_default_workdir_is_rejected(client: httpx.Client, workdir: str) -> None:
    assert_invalid(init(client, {"defaultWorkdir": workdir}), "defaultWorkdir", workdir)


def test_a_file_is_not_a_workdir(client: httpx.Client) -> None:
    assert_invalid(init(client, {"defaultWorkdir": "/etc/hostname"}), "not a directory")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", ("JSON",)),
        (b"[1, 2]", ("object",)),
        (b'{"envVars": {"A": 1}}', ("envVars.A",)),
        (b'{"envVars": ["A"]}', ("envVars",)),
        (b'{"defaultUser": 7}', ("defaultUser",)),
    ],
)
def test_malformed_bodies_are_invalid_arguments(
    client: httpx.Client, content: bytes, words: tuple[str, ...]
) -> None:
    response = client.post("/init", content=content, headers={"Content-Type": "application/json"})
    assert_invalid(response, *words)


def test_valid_user_and_workdir_are_accepted(client: httpx.Client) -> None:
    assert init(client, {"defaultUser": "nobody", "defaultWorkdir": "/tmp"}).status_code == 204
    assert init(client, {"defaultUser": "root", "defaultWorkdir": "/"}).status_code == 204


def test_init_env_vars_reach_processes(fresh_envd: EnvdProcess) -> None:
    with httpx.Client(base_url=fresh_envd.url, timeout=30) as client:
        assert init(client, {"envVars": {"WRENN_INIT_PROBE": "from-init"}}).status_code == 204
    sandbox = connect(fresh_envd)
    result = sandbox.commands.run("echo $WRENN_INIT_PROBE")
    assert result.stdout.strip() == "from-init"


def test_init_default_user_and_workdir_reach_processes(
    fresh_envd: EnvdProcess, tmp_path: os.PathLike[str]
) -> None:
    workdir = os.fspath(tmp_path)
    os.chmod(workdir, 0o755)
    with httpx.Client(base_url=fresh_envd.url, timeout=30) as client:
        body = {"defaultUser": "nobody", "defaultWorkdir": workdir}
        assert init(client, body).status_code == 204
    sandbox = connect(fresh_envd)
    result = sandbox.commands.run("id -un; pwd")
    assert result.stdout.split() == ["nobody", workdir]
