"""Which hosts' guests the proxy dials itself: those whose agent runs in this process's network
namespace on this machine (``GetHostInfo``'s ``network_id`` is ours). There a sandbox's guest
address routes from here as it does from the agent, so the proxy connects to the guest and the
agent's forwarding path, a second relay carrying every byte, drops out. The agent still ends
those connections when it matters: before a pause and once the VM stops it aborts every host
connection to the guest's address, the proxy's too (``wrenn.agent.network.peers``).

What a host's agent said is kept for ``_KEEP_S`` (its address changing asks again); an agent
that fails to answer within ``_ASK_TIMEOUT_S`` counts as elsewhere until ``_RETRY_S``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from wrenn import log
from wrenn.controlplane.db.records import Host
from wrenn.controlplane.hostpool import HostPool
from wrenn.core.network_id import network_id

_log = log.get(__name__)

_KEEP_S = 60.0
_RETRY_S = 5.0
_ASK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Verdict:
    address: str
    local: bool
    expires: float


class GuestDialing:
    def __init__(self, hosts: HostPool, *, enabled: bool) -> None:
        self._hosts = hosts
        self._ours = network_id() if enabled else ""
        self._verdicts: dict[str, _Verdict] = {}
        self._asking: dict[str, asyncio.Task[_Verdict]] = {}

    async def reaches(self, host: Host) -> bool:
        """Whether guests on ``host`` are dialled from here."""
        if not self._ours:
            return False
        known = self._verdicts.get(host.id)
        if known is not None and known.address == host.address and known.expires > time.monotonic():
            return known.local
        task = self._asking.get(host.id)
        if task is None:
            task = asyncio.create_task(self._ask(host))
            self._asking[host.id] = task
            task.add_done_callback(lambda _: self._asking.pop(host.id, None))
        # Shielded: a request that goes away does not cancel the question for the others.
        verdict = await asyncio.shield(task)
        self._verdicts[host.id] = verdict
        return verdict.local

    async def _ask(self, host: Host) -> _Verdict:
        try:
            agent = await self._hosts.get(host)
            async with asyncio.timeout(_ASK_TIMEOUT_S):
                info = await agent.host_info()
        except Exception as err:
            # Whatever went wrong, only a shortcut is lost: requests go through the agent.
            _log.info("proxy.host_unasked", host_id=host.id, error=type(err).__name__)
            return _Verdict(host.address, False, time.monotonic() + _RETRY_S)
        local = info.network_id == self._ours
        previous = self._verdicts.get(host.id)
        if previous is None or previous.local != local:
            _log.info("proxy.guest_dialing", host_id=host.id, direct=local)
        return _Verdict(host.address, local, time.monotonic() + _KEEP_S)
