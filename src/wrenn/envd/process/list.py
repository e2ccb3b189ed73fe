"""process.Process/List: the processes that are still running."""

from __future__ import annotations

from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import ListRequest, ListResponse


def list_processes(registry: Registry, request: ListRequest) -> ListResponse:
    return ListResponse(processes=[handle.info() for handle in registry.running()])
