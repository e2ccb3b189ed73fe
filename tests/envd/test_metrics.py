"""GET /metrics against a real envd, in the shape E2B's envd reports."""

from __future__ import annotations

import dataclasses
import os
import time

import httpx
import psutil
from e2b.sandbox.sandbox_api import SandboxMetrics

from tests.conftest import EnvdProcess

MIB = 1024 * 1024
INT_FIELDS = (
    "ts",
    "cpu_count",
    "mem_total",
    "mem_used",
    "mem_cache",
    "mem_total_mib",
    "mem_used_mib",
    "disk_used",
    "disk_total",
)


def test_metrics_fields_and_types(envd: EnvdProcess) -> None:
    response = httpx.get(f"{envd.url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {*INT_FIELDS, "cpu_used_pct"}
    for name in INT_FIELDS:
        assert isinstance(body[name], int) and body[name] >= 0, name
    assert isinstance(body["cpu_used_pct"], float)


def test_metrics_describe_this_machine(envd: EnvdProcess) -> None:
    before = int(time.time())
    body = httpx.get(f"{envd.url}/metrics", timeout=30).json()
    after = int(time.time())

    assert before <= body["ts"] <= after
    assert body["cpu_count"] == psutil.cpu_count(logical=True)
    assert 0.0 <= body["cpu_used_pct"] <= 100.0
    assert body["mem_total"] == psutil.virtual_memory().total
    assert 0 < body["mem_used"] <= body["mem_total"]
    assert body["mem_total_mib"] == body["mem_total"] // MIB
    assert body["mem_used_mib"] == body["mem_used"] // MIB
    root = os.statvfs("/")
    assert body["disk_total"] == root.f_blocks * root.f_frsize
    assert 0 < body["disk_used"] <= body["disk_total"]


def test_metrics_cover_the_sdks_sandbox_metrics(envd: EnvdProcess) -> None:
    body = httpx.get(f"{envd.url}/metrics", timeout=30).json()
    sdk_fields = {f.name for f in dataclasses.fields(SandboxMetrics)}
    # The control plane turns ``ts`` into ``timestamp``; every other field passes through.
    assert sdk_fields - {"timestamp"} <= set(body)
