"""process.Process/SendSignal: SIGTERM or SIGKILL to a process's whole process group."""

from __future__ import annotations

import signal

from wrenn.core.errors import InvalidArgument
from wrenn.envd.process.registry import Registry
from wrenn.gen.process.process_pb import SendSignalRequest, SendSignalResponse, Signal

_SIGNALS = {Signal.SIGTERM: signal.SIGTERM, Signal.SIGKILL: signal.SIGKILL}


def send_signal(registry: Registry, request: SendSignalRequest) -> SendSignalResponse:
    handle = registry.find(request.process)
    sig = _SIGNALS.get(request.signal)
    if sig is None:
        raise InvalidArgument(f"unsupported signal: {request.signal!r}")
    handle.signal(sig)
    return SendSignalResponse()
