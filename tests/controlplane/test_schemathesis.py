"""A bounded schemathesis run against the served /openapi.json, on SQLite and PostgreSQL: for
every operation, inputs generated from the schema (positive) and against it (negative), sent
with an admin key; no input may yield a 500 ("no host has room" is a 503, not a crash)."""

from __future__ import annotations

import itertools
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from tests.controlplane.conftest import Stack

EXAMPLES_PER_OPERATION = 12
#: Answers that are not crashes: no room, or an agent unavailable (a fake host per test).
NOT_CRASHES = {503}


def test_no_input_yields_a_500(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    auth = {"X-API-Key": stack.admin_key}
    tried: list[str] = []
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation, mode in itertools.product(operations, list(GenerationMode)):
        tried.append(f"{operation.label} ({mode.value})")

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,  # leave no example files behind
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Case) -> None:
            headers: dict[str, Any] = {**(case.headers or {}), **auth}
            response = case.call(base_url=stack.url, headers=headers, timeout=60)
            status = response.status_code
            if status >= 500 and status not in NOT_CRASHES:
                failures.append(f"{case.method} {case.formatted_path}: {status} {response.text}")

        try:
            check()
        except Unsatisfiable:
            # No invalid input exists for an operation without parameters or body.
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert len(operations) >= 40, tried
    assert failures == [], "\n".join(failures[:20])
