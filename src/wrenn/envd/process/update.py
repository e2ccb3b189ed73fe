"""process.Process/Update: resize a process's PTY."""

from __future__ import annotations

from wrenn.core.errors import InvalidArgument
from wrenn.envd.process.launch import PtySize
from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import UpdateRequest, UpdateResponse


def update(registry: Registry, request: UpdateRequest) -> UpdateResponse:
    handle = registry.find(request.process)
    if request.pty is None or request.pty.size is None:
        raise InvalidArgument("update needs a pty size")
    size = request.pty.size
    handle.resize(PtySize(cols=size.cols, rows=size.rows))
    return UpdateResponse()
