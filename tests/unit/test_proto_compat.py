"""Our envd contracts must be wire-identical to E2B's: same package, services, methods,
messages, field names, numbers, types and enums as the descriptors the e2b SDK ships."""

from __future__ import annotations

from types import ModuleType

import pytest
from e2b.envd.filesystem import filesystem_pb as e2b_filesystem
from e2b.envd.process import process_pb as e2b_process

from wrenn.gen.filesystem import filesystem_pb
from wrenn.gen.process import process_pb


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(process_pb, e2b_process), (filesystem_pb, e2b_filesystem)],
    ids=["process", "filesystem"],
)
def test_descriptor_matches_e2b(ours: ModuleType, theirs: ModuleType) -> None:
    a, b = ours.desc().proto, theirs.desc().proto
    assert a.name == b.name
    assert a.package == b.package
    assert list(a.dependency) == list(b.dependency)
    assert a.message_type == b.message_type
    assert a.enum_type == b.enum_type
    assert a.service == b.service
