"""The official e2b SDK pointed at a real envd process (SDK debug mode)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b import Sandbox

from tests.conftest import EnvdProcess
from tests.envd.rawhttp import RawConn


def connect(envd: EnvdProcess) -> Sandbox:
    """An SDK sandbox handle talking straight to ``envd``: debug mode skips the REST API and
    the sandbox URL points it at this envd's port."""
    return Sandbox.create(debug=True, sandbox_url=envd.url)


@pytest.fixture
def sandbox(envd: EnvdProcess) -> Iterator[Sandbox]:
    yield connect(envd)


@pytest.fixture
def conns() -> Iterator[list[RawConn]]:
    """Connections a test opens (``rawhttp.open_conn``), closed after it."""
    made: list[RawConn] = []
    yield made
    for conn in made:
        conn.close()
