"""process.Process/CloseStdin: signal EOF on a process's stdin."""

from __future__ import annotations

from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import CloseStdinRequest, CloseStdinResponse


def close_stdin(registry: Registry, request: CloseStdinRequest) -> CloseStdinResponse:
    registry.find(request.process).close_stdin()
    return CloseStdinResponse()
