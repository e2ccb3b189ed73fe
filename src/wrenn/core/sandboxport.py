"""What a proxy answers when a sandbox's port does not: the same words whichever proxy dialled
it (the host agent's forwarding path, or the control plane's proxy dialling the guest itself),
and the ones E2B's proxy gives, which the SDK recognises ("port is not open" on a 502)."""

from __future__ import annotations

from wrenn.core.errors import BadGateway, DeadlineExceeded, Unavailable, WrennError
from wrenn.core.http1 import ConnectError


def not_open(sandbox_id: str, port: int) -> BadGateway:
    """Nothing listens on the port."""
    return BadGateway(f"sandbox {sandbox_id} is running but port is not open: {port}")


def timed_out(sandbox_id: str, port: int) -> DeadlineExceeded:
    return DeadlineExceeded(f"port {port} of sandbox {sandbox_id} timed out")


def unreachable(sandbox_id: str, port: int, why: str) -> Unavailable:
    return Unavailable(f"cannot reach port {port} of sandbox {sandbox_id}: {why}")


def dial_failed(err: Exception, sandbox_id: str, port: int) -> WrennError:
    """The answer for a ``core.http1`` relay that could not reach the port."""
    if isinstance(err, ConnectError) and err.refused:
        return not_open(sandbox_id, port)
    if isinstance(err, ConnectError) and err.timed_out:
        return timed_out(sandbox_id, port)
    return unreachable(sandbox_id, port, str(err))
