"""Parsing of /init's timestamp (the clock fallback where no PTP clock exists). Stepping the
clock itself is exercised inside guests, never on the test host."""

from __future__ import annotations

import pytest

from wrenn.core.errors import InvalidArgument
from wrenn.envd.clock import parse_timestamp


def test_rfc3339_with_nanoseconds_and_zulu() -> None:
    assert parse_timestamp("2026-01-02T03:04:05.123456789Z") == 1767323045_123456000


def test_rfc3339_with_offset() -> None:
    assert parse_timestamp("2026-01-02T04:04:05+01:00") == 1767323045_000000000


def test_seconds_as_number() -> None:
    assert parse_timestamp(1767323045.5) == 1767323045_500000000


@pytest.mark.parametrize("bad", ["yesterday", "2026-01-02T03:04:05", True, [], {}])
def test_invalid(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_timestamp(bad)
