"""The sandbox manager: every sandbox on this host, the flows that move them between states,
and the host resources they draw from.

Start (``start``): the base image is found (or built), the runtime probed, what a crashed
agent left is reaped (VMM processes and run directories; network namespaces, veths and nft
tables by the slot pool; sandbox disks no paused sandbox owns; snapshot builds and template
disk images nothing refers to), then the disk store is mounted, the slot pool built and the
paused sandboxes loaded.

Flows (each holds the sandbox's lock; see ``sandbox`` for the states):

    create    source build (template or named snapshot) → CoW disk from its disk image →
              slot → restore → envd /health → /init (env vars, token, user) → running
    pause     envd /snapshot/prepare → close the agent's idle envd connections and relayed
              WebSockets → pause → device state held in the snapshot store, the VM's memory
              file kept as the build's memory image → the sandbox is recorded in the catalog
              → VM stopped, slot reset in the background; the disk stays. The pause answers
              here; the memory is diffed over the parent build and stored in the background
              (``pending``; Firecracker stores it before answering)
    resume    restore the pause build into any free slot (from its kept image and held state
              while it is still being stored) → /init → running
    snapshot  like pause, plus the disk image; then the VM resumes and /init undoes
              /snapshot/prepare. New sandboxes spawn from it with its vCPUs and memory.
    destroy   the sandbox's exit stack unwinds (VM, slot, run directory, disk), then builds
              nothing refers to any more are deleted, children before parents.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from ipaddress import IPv4Network
from pathlib import Path

import psutil

from wrenn import log
from wrenn.agent import instance, leftovers, runtime
from wrenn.agent.catalog import Catalog, SandboxRecord, SnapshotRecord, TemplateRecord
from wrenn.agent.cleanup import finish
from wrenn.agent.config import AgentSettings
from wrenn.agent.disks import DiskStore
from wrenn.agent.envdclient import EnvdClient
from wrenn.agent.guestlogs import GuestLogs, LogEntry, console_path
from wrenn.agent.images import GuestImage, build_base
from wrenn.agent.instance import FromBuild, Held, HostResources, Instance, Shape
from wrenn.agent.memory import MemoryImages
from wrenn.agent.network import Egress, NetworkPlan, SlotPool
from wrenn.agent.pending import PendingBuilds
from wrenn.agent.sandbox import Sandbox, SandboxState, SandboxView
from wrenn.agent.snapshots import LocalSnapshotStore
from wrenn.agent.steps import Steps
from wrenn.agent.templates import BASE_TEMPLATE, Templates, image_template_id
from wrenn.agent.vmm.base import VmState
from wrenn.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    WrennError,
)

_log = log.get(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_USER = "user"


def _check_id(kind: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidArgument(f"invalid {kind} id: {value!r}")
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class CreateParams:
    sandbox_id: str
    template_id: str
    snapshot_id: str | None = None
    #: 0: the source's.
    vcpus: int = 0
    memory_mib: int = 0
    env_vars: dict[str, str] = field(default_factory=dict)
    envd_access_token: str = ""
    egress: Egress = field(default_factory=Egress)
    metadata: dict[str, str] = field(default_factory=dict)
    default_user: str | None = None
    default_workdir: str | None = None


@dataclass(frozen=True)
class _Source:
    """The build a new sandbox is restored from."""

    build_id: uuid.UUID
    template_id: str
    snapshot_id: str | None
    vcpus: int
    memory_mib: int
    image_dir: str
    envd_version: str
    envd_access_token: str


@dataclass(frozen=True)
class Metrics:
    timestamp_ms: int
    cpu_count: int
    cpu_used_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    mem_cache_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    vmm_rss_bytes: int
    vmm_cpu_seconds: float


@dataclass(frozen=True)
class HostInfo:
    runtime: str
    runtime_reason: str
    vcpus: int
    memory_bytes: int
    memory_free_bytes: int
    disk_bytes: int
    disk_free_bytes: int
    sandboxes: int
    templates: list[TemplateRecord]
    snapshots: list[SnapshotRecord]
    version: str


def _version() -> str:
    try:
        return metadata.version("wrenn")
    except metadata.PackageNotFoundError:
        return ""


class Manager:
    """Use ``start()`` / ``close()`` (the server's lifespan does)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        state_dir = settings.state_dir
        self.run_root = state_dir / "run"
        self.store = LocalSnapshotStore(state_dir / "snapshots")
        self.catalog = Catalog(state_dir / "catalog")
        self.disks = DiskStore(state_dir / "disks")
        self.memory = MemoryImages(self.run_root / "memfiles", self.store, self.disks)
        #: Pause builds being stored after their pause answered.
        self.pending = PendingBuilds(self.store, self.memory)
        self.plan = NetworkPlan(
            slot_count=settings.slots,
            prefix=settings.network_prefix,
            transit_pool=IPv4Network(settings.transit_pool),
            sandbox_pool=IPv4Network(settings.sandbox_pool),
        )
        self.pool = SlotPool(self.plan)
        #: envd's log lines from every sandbox's console, kept across pauses.
        self.guest_logs = GuestLogs()
        self._sandboxes: dict[str, Sandbox] = {}
        self._stack = contextlib.AsyncExitStack()
        self._gc_lock = asyncio.Lock()
        self._snapshot_lock = asyncio.Lock()
        #: Builds being written and not yet recorded anywhere: never collected.
        self._pins: set[uuid.UUID] = set()
        self._host: HostResources | None = None
        self._templates: Templates | None = None
        self.runtime_choice: runtime.RuntimeChoice | None = None

    # -- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await finish(self._stack.aclose())
            raise

    async def _start(self) -> None:
        settings = self.settings
        image = await self._base_image()
        choice = await runtime.choose(settings, image)
        self.runtime_choice = choice
        _log.info("runtime.chosen", runtime=choice.label, reason=choice.reason)

        vm_root = self.run_root / "vms"
        reaped = await asyncio.to_thread(leftovers.reap, self.run_root, vm_root)
        if not reaped.empty:
            _log.warning("vms.reaped", pids=reaped.pids, run_dirs=reaped.run_dirs)
        await asyncio.to_thread(self.memory.clear)
        await self.store.sweep()
        await self.catalog.load()

        await self.disks.open()
        self._stack.push_async_callback(self.disks.close)
        # Stores under way end before the disk store (their memory images) goes.
        self._stack.push_async_callback(self.pending.close)
        await self.memory.forget_if_rebooted()
        await self.pool.start()
        self._stack.push_async_callback(self.pool.close)
        self._stack.push_async_callback(self._stop_sandboxes)
        self._stack.callback(self.guest_logs.close)

        self._host = HostResources(
            settings=settings,
            runtime=runtime.Runtime(choice, settings),
            pool=self.pool,
            store=self.store,
            memory=self.memory,
            vm_root=vm_root,
        )
        self._templates = Templates(self._host, self.disks, self.catalog, image, self._pins)
        await self._load_paused()
        await self._reap_disks()
        await self.collect_garbage()
        _log.info(
            "agent.started",
            runtime=choice.label,
            slots=settings.slots,
            paused=len(self._sandboxes),
            templates=len(self.catalog.templates.all()),
            snapshots=len(self.catalog.snapshots.all()),
        )

    async def _base_image(self) -> GuestImage:
        if self.settings.base_image_dir is not None:
            return await asyncio.to_thread(GuestImage.load, self.settings.base_image_dir)
        return await asyncio.to_thread(build_base, self.settings.state_dir)

    async def _load_paused(self) -> None:
        """Paused sandboxes from the catalog. A build that was still being stored when the
        agent stopped is held in the store: in the same boot, with its memory image and its
        parent recoverable, its store is redone now; otherwise the sandbox is lost."""
        stored = set(await self.store.builds())
        held = {h.build_id: h for h in await self.store.held()}
        usable: dict[uuid.UUID, bool] = {}

        async def recoverable(build_id: uuid.UUID) -> bool:
            if build_id in stored:
                return True
            if build_id not in usable:
                h = held.get(build_id)
                usable[build_id] = (
                    h is not None
                    and h.this_boot
                    and await self.memory.has_image(build_id)
                    and (h.parent_id is None or await recoverable(h.parent_id))
                )
            return usable[build_id]

        for record in self.catalog.sandboxes.all():
            disk = self.disks.disk_path(record.disk_id)
            if (
                record.build_id is None
                or not await asyncio.to_thread(disk.exists)
                or not await recoverable(record.build_id)
            ):
                _log.warning("sandbox.unrecoverable", sandbox_id=record.sandbox_id)
                await self.catalog.sandboxes.delete(record.sandbox_id)
                continue
            sandbox = Sandbox(record, SandboxState.PAUSED)
            sandbox.stack.push_async_callback(self._delete_disk, record.disk_id)
            # As for a created sandbox: closing the stack stops the VM a resume starts.
            sandbox.stack.push_async_callback(sandbox.stop_instance)
            self._sandboxes[record.sandbox_id] = sandbox
        redo = [b for b, ok in usable.items() if ok]
        for build_id in redo:
            self.pending.add(build_id, held[build_id].parent_id, extents_known=False)
        for build_id in redo:
            self.pending.start(build_id)
        if redo:
            _log.warning("snapshot.store_redone", builds=[str(b) for b in redo])

    async def _reap_disks(self) -> None:
        """Sandbox disks of sandboxes that did not survive (running when the agent died)."""
        owned = {s.record.disk_id for s in self._sandboxes.values()}
        stale = [d for d in self.disks.disks() if d not in owned]
        for disk_id in stale:
            await self.disks.delete(disk_id)
        if stale:
            _log.warning("disks.reaped", disks=stale)

    async def warm(self) -> None:
        """Build the base template now rather than on the first create (a background task of
        the server's lifespan; failures are logged and the next create tries again)."""
        try:
            await self._require_templates().base()
            await self.collect_garbage()
        except WrennError as err:
            _log.error("template.warm_failed", template_id=BASE_TEMPLATE, error=err.message)
        except Exception:
            _log.exception("template.warm_failed", template_id=BASE_TEMPLATE)

    async def close(self) -> None:
        """Stop every VM (running sandboxes are lost; paused ones stay recorded with their
        disks), tear down the slots, unmount the disk store."""
        await finish(self._stack.aclose())

    async def _stop_sandboxes(self) -> None:
        for sandbox in list(self._sandboxes.values()):
            async with sandbox.lock:
                if sandbox.state is SandboxState.PAUSED:
                    continue
                _log.warning("sandbox.lost_at_shutdown", sandbox_id=sandbox.sandbox_id)
                with contextlib.suppress(WrennError, OSError):
                    await finish(sandbox.stack.aclose())
                self._sandboxes.pop(sandbox.sandbox_id, None)

    def _require_host(self) -> HostResources:
        if self._host is None:
            raise FailedPrecondition("the agent has not started")
        return self._host

    def _require_templates(self) -> Templates:
        if self._templates is None:
            raise FailedPrecondition("the agent has not started")
        return self._templates

    async def _delete_disk(self, disk_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.disks.delete(disk_id)

    # -- lookups -----------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return sandbox

    def list(self) -> list[SandboxView]:
        return [s.view() for s in self._sandboxes.values()]

    def running_instance(self, sandbox_id: str) -> Instance:
        """The VM of a running sandbox (the forwarding path dials its address)."""
        return self.get(sandbox_id).running()

    # -- create ------------------------------------------------------------------------------

    async def _source(self, params: CreateParams) -> _Source:
        if params.snapshot_id:
            snap = self.catalog.snapshots.get(params.snapshot_id)
            if snap is None:
                raise NotFound(f"snapshot {params.snapshot_id} not found")
            if params.template_id and params.template_id != snap.template_id:
                raise InvalidArgument(
                    f"snapshot {snap.snapshot_id} belongs to template {snap.template_id}, "
                    f"not {params.template_id}"
                )
            if snap.runtime != self._require_host().runtime.label:
                raise FailedPrecondition(
                    f"snapshot {snap.snapshot_id} was taken by {snap.runtime}; this host runs "
                    f"{self._require_host().runtime.label}"
                )
            return _Source(
                snap.build_id,
                snap.template_id,
                snap.snapshot_id,
                snap.vcpus,
                snap.memory_mib,
                snap.image_dir,
                snap.envd_version,
                snap.envd_access_token,
            )
        templates = self._require_templates()
        if params.template_id == BASE_TEMPLATE:
            tpl = await templates.base()
        else:
            found = self.catalog.templates.get(params.template_id)
            if found is None or not await templates.usable(found):
                raise NotFound(f"template {params.template_id!r} not found")
            tpl = found
        return _Source(
            tpl.build_id,
            tpl.template_id,
            None,
            tpl.vcpus,
            tpl.memory_mib,
            tpl.image_dir,
            tpl.envd_version,
            "",
        )

    @staticmethod
    def _shape(params: CreateParams, source: _Source) -> tuple[int, int]:
        """vCPUs and memory: the source's (a snapshot restores with what it was taken with)."""
        host_cpus = os.cpu_count() or 1
        host_mib = psutil.virtual_memory().total >> 20
        if params.vcpus > host_cpus:
            raise InvalidArgument(f"{params.vcpus} vCPUs asked; this host has {host_cpus}")
        if params.memory_mib > host_mib:
            raise InvalidArgument(f"{params.memory_mib} MiB asked; this host has {host_mib} MiB")
        what = (
            f"snapshot {source.snapshot_id}"
            if source.snapshot_id
            else f"template {source.template_id}"
        )
        for asked, fixed, unit in (
            (params.vcpus, source.vcpus, "vCPUs"),
            (params.memory_mib, source.memory_mib, "MiB of memory"),
        ):
            if asked and asked != fixed:
                raise InvalidArgument(
                    f"{what} runs with {fixed} {unit}; a sandbox restored from it cannot have "
                    f"{asked}"
                )
        return source.vcpus, source.memory_mib

    @staticmethod
    def _check_memory(memory_mib: int) -> None:
        available_mib = psutil.virtual_memory().available >> 20
        if memory_mib > available_mib:
            raise ResourceExhausted(
                f"{memory_mib} MiB of memory asked; {available_mib} MiB available on this host"
            )

    async def create(self, params: CreateParams) -> SandboxView:
        _check_id("sandbox", params.sandbox_id)
        host = self._require_host()
        if params.sandbox_id in self._sandboxes:
            raise AlreadyExists(f"sandbox {params.sandbox_id} already exists")
        placeholder = SandboxRecord(
            sandbox_id=params.sandbox_id,
            template_id=params.template_id,
            snapshot_id=params.snapshot_id,
            vcpus=params.vcpus,
            memory_mib=params.memory_mib,
            runtime=host.runtime.label,
            image_dir="",
            envd_version="",
            started_at_ms=_now_ms(),
            disk_id=params.sandbox_id,
        )
        sandbox = Sandbox(placeholder, SandboxState.STARTING)
        self._sandboxes[params.sandbox_id] = sandbox
        log_ = _log.bind(sandbox_id=params.sandbox_id)
        steps = Steps()
        async with sandbox.lock:
            try:
                source = await self._source(params)
                steps.mark("source")
                # From here the source build counts as in use (collection, DeleteSnapshot).
                sandbox.parent_build = source.build_id
                vcpus, memory_mib = self._shape(params, source)
                self._check_memory(memory_mib)
                sandbox.record = placeholder.model_copy(
                    update={
                        "template_id": source.template_id,
                        "snapshot_id": source.snapshot_id,
                        "vcpus": vcpus,
                        "memory_mib": memory_mib,
                        "image_dir": source.image_dir,
                        "envd_version": source.envd_version,
                        "envd_access_token": params.envd_access_token or source.envd_access_token,
                        "env_vars": dict(params.env_vars),
                        "metadata": dict(params.metadata),
                        "default_user": params.default_user or DEFAULT_USER,
                        "default_workdir": params.default_workdir,
                        **_egress_fields(params.egress),
                    }
                )
                disk = await self.disks.clone(str(source.build_id), params.sandbox_id)
                sandbox.stack.push_async_callback(self._delete_disk, params.sandbox_id)
                sandbox.stack.push_async_callback(sandbox.stop_instance)
                steps.mark("disk")
                vm = await instance.start(
                    host,
                    name=params.sandbox_id,
                    shape=self._shape_of(sandbox.record, disk),
                    source=FromBuild(source.build_id),
                    envd_access_token=source.envd_access_token,
                    first_call=functools.partial(self._init, sandbox.record),
                    steps=steps,
                )
                sandbox.instance = vm
                sandbox.parent_build = source.build_id
                await self.guest_logs.attach(params.sandbox_id, console_path(vm.vmm), sandbox.stack)
                sandbox.state = SandboxState.RUNNING
            except BaseException:
                await finish(sandbox.stack.aclose())
                self._sandboxes.pop(params.sandbox_id, None)
                raise
        log_.info(
            "sandbox.created",
            template_id=sandbox.record.template_id,
            snapshot_id=sandbox.record.snapshot_id,
            build_id=str(sandbox.parent_build),
            slot=vm.slot.index,
            total_ms=steps.total_ms,
            steps_ms=steps.ms,
        )
        return sandbox.view()

    @staticmethod
    def _shape_of(record: SandboxRecord, disk: Path) -> Shape:
        try:
            image = GuestImage.load(Path(record.image_dir))
        except (OSError, ValueError, KeyError) as err:
            raise FailedPrecondition(
                f"the guest image of sandbox {record.sandbox_id} is gone: {record.image_dir}"
            ) from err
        return Shape(
            image=image,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            disk=disk,
            egress=_egress_of(record),
        )

    @staticmethod
    async def _init(record: SandboxRecord, envd: EnvdClient) -> None:
        """envd /init with the sandbox's settings (after a restore, it also closes the
        connections that were open when the snapshot was taken)."""
        await envd.init(
            env_vars=record.env_vars,
            access_token=record.envd_access_token or None,
            default_user=record.default_user,
            default_workdir=record.default_workdir,
        )

    # -- destroy -----------------------------------------------------------------------------

    async def destroy(self, sandbox_id: str) -> None:
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            if self._sandboxes.get(sandbox_id) is not sandbox:
                raise NotFound(f"sandbox {sandbox_id} not found")
            sandbox.state = SandboxState.STOPPING
            build_id = sandbox.record.build_id
            try:
                await finish(sandbox.stack.aclose())
            finally:
                self._sandboxes.pop(sandbox_id, None)
                await finish(self.catalog.sandboxes.delete(sandbox_id))
        _log.info("sandbox.destroyed", sandbox_id=sandbox_id)
        # A pause build still being stored: its store is skipped unless it has begun, and
        # the build is collected once that has ended.
        await self.pending.abandon(build_id)
        await finish(self.collect_garbage())

    # -- pause and resume --------------------------------------------------------------------

    async def pause(self, sandbox_id: str) -> uuid.UUID:
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            vm = sandbox.running()
            sandbox.state = SandboxState.PAUSING
            build_id = uuid.uuid4()
            self._pins.add(build_id)
            steps = Steps()
            try:
                try:
                    captured = await vm.hold(
                        self.store, build_id, parent=sandbox.parent_build, steps=steps
                    )
                    record = sandbox.record.model_copy(update={"build_id": build_id})
                    await finish(self.catalog.sandboxes.put(record))
                except BaseException:
                    await finish(self._carry_on(sandbox, vm, drop=build_id))
                    raise
                steps.mark("catalog")
                # The build is recoverable from here: its state held, its memory kept.
                sandbox.record = record
                sandbox.state = SandboxState.PAUSED
                if isinstance(captured, Held):
                    self.pending.add(
                        build_id, captured.parent, extents_known=captured.extents_known
                    )
                    self._require_host().working_sets.inherit(build_id, captured.parent)
                try:
                    await sandbox.stop_instance()
                    steps.mark("stop")
                finally:
                    if isinstance(captured, Held):
                        self.pending.start(build_id)
            finally:
                self._pins.discard(build_id)
        _log.info(
            "sandbox.paused",
            sandbox_id=sandbox_id,
            build_id=str(build_id),
            total_ms=steps.total_ms,
            steps_ms=steps.ms,
        )
        return build_id

    async def _carry_on(
        self, sandbox: Sandbox, vm: Instance, drop: uuid.UUID | None = None
    ) -> None:
        """After a capture (failed, or a named snapshot): resume the VM and undo
        /snapshot/prepare with /init. ``drop``: a build a failed pause may have held, whose
        memory image is the VM's own memory: the image goes before the VM runs again. A
        sandbox that cannot go on is marked failed."""
        try:
            if drop is not None:
                await self._drop_memory(drop)
                await self.store.release(drop)
            if vm.vmm.state is VmState.PAUSED:
                await vm.vmm.resume()
            await self._init(sandbox.record, vm.envd)
        except (WrennError, OSError) as err:
            _log.error("sandbox.failed", sandbox_id=sandbox.sandbox_id, error=str(err))
            sandbox.state = SandboxState.FAILED
            return
        sandbox.state = SandboxState.RUNNING

    async def resume(
        self, sandbox_id: str, *, envd_access_token: str = "", egress: Egress | None = None
    ) -> SandboxView:
        """Resume a paused sandbox; ``egress`` replaces the one it had when given."""
        host = self._require_host()
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            sandbox.require(SandboxState.PAUSED)
            record = sandbox.record
            assert record.build_id is not None
            if record.runtime != host.runtime.label:
                raise FailedPrecondition(
                    f"sandbox {sandbox_id} was paused under {record.runtime}; this host runs "
                    f"{host.runtime.label}"
                )
            build_id = record.build_id
            sandbox.state = SandboxState.STARTING
            steps = Steps()
            # A pause not stored yet: the VM takes its kept image back, still cached, instead
            # of waiting for it to be written back so that it can be copied. The build is
            # then lost once the VM runs: its record goes first, so that an agent restarted
            # meanwhile does not resume the sandbox from memory the VM has written.
            taken = None
            try:
                if host.runtime.flat_memory:
                    taken = self.pending.take_over(build_id)
                if taken is not None:
                    await finish(self.catalog.sandboxes.delete(sandbox_id))
                    _log.info(
                        "sandbox.memory_taken_back", sandbox_id=sandbox_id, build_id=str(build_id)
                    )
                resumed = record.model_copy(
                    update={
                        **(_egress_fields(egress) if egress is not None else {}),
                        "build_id": None,
                        "envd_access_token": envd_access_token or record.envd_access_token,
                    }
                )
                async with self.pending.restoring():
                    vm = await instance.start(
                        host,
                        name=sandbox_id,
                        shape=self._shape_of(resumed, self.disks.disk_path(record.disk_id)),
                        source=FromBuild(build_id, taken=taken),
                        envd_access_token=record.envd_access_token,
                        first_call=functools.partial(self._init, resumed),
                        steps=steps,
                    )
                    sandbox.instance = vm
                    sandbox.parent_build = taken.source if taken is not None else build_id
                    await self.guest_logs.attach(sandbox_id, console_path(vm.vmm), sandbox.stack)
                    sandbox.record = resumed
            except BaseException:
                await finish(sandbox.stop_instance())
                if taken is not None:
                    # The build's memory was given to the VM that failed: nothing to resume.
                    await finish(taken.release())
                    _log.error("sandbox.failed", sandbox_id=sandbox_id, build_id=str(build_id))
                    sandbox.state = SandboxState.FAILED
                    await finish(self.catalog.sandboxes.delete(sandbox_id))
                    raise
                sandbox.record = record
                sandbox.state = SandboxState.PAUSED
                raise
            sandbox.state = SandboxState.RUNNING
            await finish(self.catalog.sandboxes.delete(sandbox_id))
        _log.info(
            "sandbox.resumed",
            sandbox_id=sandbox_id,
            build_id=str(build_id),
            slot=vm.slot.index,
            total_ms=steps.total_ms,
            steps_ms=steps.ms,
        )
        return sandbox.view()

    async def update_network(self, sandbox_id: str, egress: Egress) -> None:
        """Replace a running sandbox's egress (its slot's rules, then its record)."""
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            vm = sandbox.running()
            await vm.slot.set_egress(egress)
            sandbox.record = sandbox.record.model_copy(update=_egress_fields(egress))
        _log.info(
            "sandbox.network_updated",
            sandbox_id=sandbox_id,
            internet=egress.internet,
            allow_out=len(egress.allow),
            deny_out=len(egress.deny),
        )

    # -- named snapshots ---------------------------------------------------------------------

    async def create_snapshot(self, sandbox_id: str, snapshot_id: str) -> SnapshotRecord:
        """Snapshot a running sandbox as ``snapshot_id``; the sandbox keeps running (its
        connections that were open end, as with a pause)."""
        _check_id("snapshot", snapshot_id)
        sandbox = self.get(sandbox_id)
        async with self._snapshot_lock:
            if self.catalog.snapshots.get(snapshot_id) is not None:
                raise AlreadyExists(f"snapshot {snapshot_id} already exists")
            async with sandbox.lock:
                vm = sandbox.running()
                # The snapshot is a diff over the build the sandbox was resumed from.
                await self.pending.stored(sandbox.parent_build)
                sandbox.state = SandboxState.PAUSING
                build_id = uuid.uuid4()
                self._pins.add(build_id)
                try:
                    async with contextlib.AsyncExitStack() as undo:
                        try:
                            manifest = await vm.capture(
                                self.store, build_id, parent=sandbox.parent_build
                            )
                            undo.push_async_callback(self._forget_build, build_id)
                            disk = self.disks.disk_path(sandbox.record.disk_id)
                            await self.disks.import_template(str(build_id), disk)
                            size = sum(f.size_bytes for f in manifest.files.values())
                            record = SnapshotRecord(
                                snapshot_id=snapshot_id,
                                build_id=build_id,
                                template_id=sandbox.record.template_id,
                                vcpus=sandbox.record.vcpus,
                                memory_mib=sandbox.record.memory_mib,
                                runtime=sandbox.record.runtime,
                                image_dir=sandbox.record.image_dir,
                                envd_version=sandbox.record.envd_version,
                                envd_access_token=sandbox.record.envd_access_token,
                                disk_size_bytes=(await asyncio.to_thread(disk.stat)).st_size,
                                size_bytes=size,
                                created_at_ms=_now_ms(),
                            )
                            await self.catalog.snapshots.put(record)
                            undo.pop_all()
                        finally:
                            await finish(self._carry_on(sandbox, vm))
                finally:
                    self._pins.discard(build_id)
        _log.info(
            "snapshot.created",
            sandbox_id=sandbox_id,
            snapshot_id=snapshot_id,
            build_id=str(build_id),
        )
        return record

    async def _forget_build(self, build_id: uuid.UUID) -> None:
        with contextlib.suppress(NotFound):
            await self.store.delete(build_id)
        with contextlib.suppress(NotFound):
            await self.disks.delete_template(str(build_id))

    async def delete_snapshot(self, snapshot_id: str) -> None:
        async with self._snapshot_lock:
            record = self.catalog.snapshots.get(snapshot_id)
            if record is None:
                raise NotFound(f"snapshot {snapshot_id} not found")
            dependents = set(await self.store.dependents(record.build_id))
            dependents |= {
                h.build_id for h in await self.store.held() if h.parent_id == record.build_id
            }
            users = sorted(
                s.sandbox_id for s in self._sandboxes.values() if s.parent_build == record.build_id
            )
            if dependents or users:
                what = [f"{len(dependents)} build(s)"] if dependents else []
                what += [f"sandbox(es) {', '.join(users)}"] if users else []
                raise FailedPrecondition(
                    f"snapshot {snapshot_id} is still used by {' and '.join(what)}"
                )
            await self.catalog.snapshots.delete(snapshot_id)
        _log.info("snapshot.deleted", snapshot_id=snapshot_id, build_id=str(record.build_id))
        await finish(self.collect_garbage())

    # -- garbage -----------------------------------------------------------------------------

    def _referenced(self) -> set[uuid.UUID]:
        builds = {t.build_id for t in self.catalog.templates.all()}
        builds |= {s.build_id for s in self.catalog.snapshots.all()}
        for sandbox in self._sandboxes.values():
            builds |= {b for b in (sandbox.record.build_id, sandbox.parent_build) if b}
        return builds | self._pins | self.pending.builds()

    async def _referenced_and_held(self) -> set[uuid.UUID]:
        """``_referenced``, and the parents of held builds among them (a held build's store
        reads its parent), recursively."""
        referenced = self._referenced()
        parents = {h.build_id: h.parent_id for h in await self.store.held()}
        todo = [b for b in referenced if b in parents]
        while todo:
            parent = parents[todo.pop()]
            if parent is not None and parent not in referenced:
                referenced.add(parent)
                if parent in parents:
                    todo.append(parent)
        return referenced

    async def _drop_memory(self, build_id: uuid.UUID) -> None:
        """Forget ``build_id``'s memory image and the working set recorded for it."""
        await self.memory.drop(build_id)
        if self._host is not None:
            self._host.working_sets.forget(build_id)

    async def collect_garbage(self) -> None:
        """Delete snapshot builds (stored or held) and template disk images nothing refers
        to: no template, named snapshot, sandbox or pending store, and no other build reading
        from them (children first)."""
        async with self._gc_lock:
            deleted: list[uuid.UUID] = []
            referenced = await self._referenced_and_held()
            for held in await self.store.held():
                if held.build_id not in referenced:
                    await self.store.release(held.build_id)
                    await self._drop_memory(held.build_id)
                    self.pending.forget(held.build_id)
                    deleted.append(held.build_id)
            while True:
                referenced = await self._referenced_and_held()
                candidates = [b for b in await self.store.builds() if b not in referenced]
                progress = False
                for build_id in candidates:
                    if await self.store.dependents(build_id):
                        continue
                    await self.store.delete(build_id)
                    await self._drop_memory(build_id)
                    self.pending.forget(build_id)
                    deleted.append(build_id)
                    progress = True
                if not progress:
                    break
            referenced = await self._referenced_and_held()
            keep = {str(b) for b in referenced} | {self.memory.image_id(b) for b in referenced}
            if self._templates is not None:
                keep.add(image_template_id(self._templates.base_image))
            images = [t for t in self.disks.templates() if t not in keep]
            for template_id in images:
                with contextlib.suppress(NotFound):
                    await self.disks.delete_template(template_id)
        if deleted or images:
            _log.info("garbage.collected", builds=[str(b) for b in deleted], disk_images=images)

    # -- reports -----------------------------------------------------------------------------

    async def metrics(self, sandbox_id: str) -> Metrics:
        sandbox = self.get(sandbox_id)
        async with sandbox.lock:
            vm = sandbox.running()
            guest = await vm.envd.metrics()
            vmm = await vm.vmm.metrics()
        return Metrics(
            timestamp_ms=_now_ms(),
            cpu_count=int(guest.get("cpu_count", sandbox.record.vcpus)),
            cpu_used_pct=float(guest.get("cpu_used_pct", 0.0)),
            mem_used_bytes=int(guest.get("mem_used", 0)),
            mem_total_bytes=int(guest.get("mem_total", 0)),
            mem_cache_bytes=int(guest.get("mem_cache", 0)),
            disk_used_bytes=int(guest.get("disk_used", 0)),
            disk_total_bytes=int(guest.get("disk_total", 0)),
            vmm_rss_bytes=vmm.rss_bytes,
            vmm_cpu_seconds=vmm.cpu_seconds,
        )

    async def logs(self, sandbox_id: str, start_ms: int = 0, limit: int = 0) -> Sequence[LogEntry]:
        """envd's log entries of a sandbox in any state (see ``guestlogs``); takes no lock, so
        it answers during a pause or resume too."""
        self.get(sandbox_id)
        return await self.guest_logs.read(sandbox_id, start_ms, limit)

    async def host_info(self) -> HostInfo:
        choice = self.runtime_choice
        if choice is None:
            raise FailedPrecondition("the agent has not started")
        memory = psutil.virtual_memory()
        disk = await self.disks.stats()
        return HostInfo(
            runtime=choice.label,
            runtime_reason=choice.reason,
            vcpus=os.cpu_count() or 1,
            memory_bytes=memory.total,
            memory_free_bytes=memory.available,
            disk_bytes=disk.total_bytes,
            disk_free_bytes=disk.free_bytes,
            sandboxes=sum(1 for s in self._sandboxes.values() if s.state != SandboxState.PAUSED),
            templates=self.catalog.templates.all(),
            snapshots=self.catalog.snapshots.all(),
            version=_version(),
        )


def _egress_fields(egress: Egress) -> dict[str, object]:
    """``egress`` as a sandbox record holds it."""
    return {
        "allow_internet_access": egress.internet,
        "allow_out": egress.allow_out,
        "deny_out": egress.deny_out,
    }


def _egress_of(record: SandboxRecord) -> Egress:
    return Egress.parse(
        internet=record.allow_internet_access, allow=record.allow_out, deny=record.deny_out
    )
