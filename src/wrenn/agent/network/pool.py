"""A pool of pre-built network slots, handed to sandboxes and recycled.

    SlotPool.start()  reap leftovers → check host → host table + ip_forward → build N slots
    acquire()         free → in use (egress set as asked); when none is free but
                      some are being reset in the background, waits for the first of them
    release()         in use → reset (egress off, conntrack forgotten) → free
    release_soon()    the same reset as a background task of the pool (the caller does not
                      wait for it: a stopped VM's slot costs its flow nothing)
    close()           pending resets awaited, every slot torn down, host table removed
                      (ip_forward left on)

Netlink and subprocess work runs on worker threads; the pool's bookkeeping stays on the loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, TypeVar

from pyroute2 import NetlinkError

from wrenn import log
from wrenn.agent.network import host, links, reaper
from wrenn.agent.network.addressing import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    TAP_NAME,
    NetworkPlan,
    SlotAddresses,
)
from wrenn.core.egress import Egress
from wrenn.core.errors import FailedPrecondition, ResourceExhausted, WrennError

_log = log.get(__name__)

P = ParamSpec("P")
T = TypeVar("T")


async def _in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn`` on a worker thread, awaited to its end even if the caller is cancelled, so
    the pool's bookkeeping never runs ahead of the kernel state."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


class Slot:
    """One sandbox's network: a namespace holding ``tap0`` for the VMM, reached from the host
    at ``sandbox_ip`` (every port NATed to the guest's 169.254.0.21)."""

    tap_name = TAP_NAME
    guest_mac = GUEST_MAC
    guest_ip = GUEST_IP
    gateway_ip = GATEWAY_IP

    def __init__(self, addresses: SlotAddresses) -> None:
        self.addresses = addresses
        self.in_use = False
        self.egress = Egress()

    @property
    def index(self) -> int:
        return self.addresses.index

    @property
    def netns(self) -> str:
        return self.addresses.netns

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.addresses.netns

    @property
    def sandbox_ip(self) -> str:
        return str(self.addresses.sandbox_ip)

    async def set_egress(self, egress: Egress) -> None:
        """Let the guest open connections out of the slot as ``egress`` says."""
        if not self.in_use:
            raise FailedPrecondition(f"slot {self.index} is not in use")
        await _in_thread(links.set_egress, self.addresses, egress)
        self.egress = egress

    def __repr__(self) -> str:
        return f"Slot({self.index}, {self.netns}, {self.sandbox_ip})"


class SlotPool:
    """``plan.slot_count`` slots built at start and reused. Use as an async context manager,
    or call ``start()`` and ``close()``."""

    def __init__(self, plan: NetworkPlan) -> None:
        self.plan = plan
        self._slots: list[Slot] = []
        self._free: deque[Slot] = deque()
        self._lock = asyncio.Lock()
        #: Resets started by ``release_soon`` and not finished yet.
        self._resets: set[asyncio.Task[None]] = set()
        self._started = False
        self._host_installed = False

    @property
    def slots(self) -> list[Slot]:
        return list(self._slots)

    @property
    def free_count(self) -> int:
        return len(self._free)

    async def start(self) -> None:
        if self._started:
            raise FailedPrecondition("slot pool already started")
        self._started = True
        try:
            await _in_thread(self._start_sync)
        except BaseException:
            await asyncio.shield(self.close())
            raise
        _log.info("network.pool_started", slots=len(self._slots), prefix=self.plan.prefix)

    def _start_sync(self) -> None:
        host.require()
        reaped = reaper.reap(self.plan)
        if not reaped.empty:
            _log.warning(
                "network.reaped",
                links=reaped.links,
                namespaces=reaped.namespaces,
                tables=reaped.tables,
                conntrack_entries=reaped.conntrack_entries,
            )
        host.check_pools(self.plan)
        host.enable_ip_forward()
        self._host_installed = True
        host.install(self.plan)
        for addresses in self.plan.slots():
            links.build(addresses)
            slot = Slot(addresses)
            self._slots.append(slot)
            self._free.append(slot)

    async def acquire(self, *, egress: Egress | None = None) -> Slot:
        """A free slot, its egress set (none by default); ``ResourceExhausted`` when none is
        free and none is being reset."""
        while True:
            async with self._lock:
                if self._free:
                    slot = self._free.popleft()
                    slot.in_use = True
                    break
                resetting = set(self._resets)
            if not resetting:
                raise ResourceExhausted(f"all {len(self._slots)} network slots are in use")
            await asyncio.wait(resetting, return_when=asyncio.FIRST_COMPLETED)
        try:
            if egress is not None and egress != Egress():
                await slot.set_egress(egress)
        except BaseException:
            await asyncio.shield(self.release(slot))
            raise
        return slot

    async def release(self, slot: Slot) -> None:
        """Reset ``slot`` and return it to the pool. A slot that cannot be reset is rebuilt;
        one that cannot be rebuilt leaves the pool and the error is raised."""
        if slot not in self._slots or not slot.in_use:
            raise FailedPrecondition(f"slot {slot.index} is not in use in this pool")
        try:
            await _in_thread(links.reset, slot.addresses)
        except (WrennError, NetlinkError, OSError):
            _log.warning("network.slot_reset_failed", slot=slot.index, exc_info=True)
            try:
                await _in_thread(self._rebuild, slot.addresses)
            except BaseException:
                self._slots.remove(slot)
                raise
        slot.in_use = False
        slot.egress = Egress()
        async with self._lock:
            self._free.append(slot)

    def release_soon(self, slot: Slot) -> None:
        """``release(slot)`` in the background; a failure is logged (the slot leaves the pool
        when it cannot be rebuilt). ``close`` waits for it."""
        if slot not in self._slots or not slot.in_use:
            raise FailedPrecondition(f"slot {slot.index} is not in use in this pool")
        task = asyncio.ensure_future(self._release_logged(slot))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    async def _release_logged(self, slot: Slot) -> None:
        try:
            await self.release(slot)
        except Exception:
            _log.exception("network.slot_lost", slot=slot.index)

    @staticmethod
    def _rebuild(addresses: SlotAddresses) -> None:
        links.teardown(addresses)
        links.build(addresses)

    async def close(self) -> None:
        """Tear down every slot (in use or not) and the host table, once the resets under way
        are done. Idempotent."""
        while self._resets:
            await asyncio.wait(set(self._resets))
        async with self._lock:
            slots, self._slots = self._slots, []
            self._free.clear()
        await _in_thread(self._close_sync, slots)

    def _close_sync(self, slots: list[Slot]) -> None:
        for slot in slots:
            links.teardown(slot.addresses)
            slot.in_use = False
        if self._host_installed:
            host.uninstall(self.plan)
            self._host_installed = False

    async def __aenter__(self) -> SlotPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.close())
