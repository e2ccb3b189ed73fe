"""Sandbox operations: the database, the scheduler and the host agents put together.

Invariants:
- every state change is a compare-and-set in the database (``transition``); whoever moves a
  sandbox out of a state owns the follow-up RPC, so a request and the lifecycle worker never
  both pause or kill one sandbox;
- a sandbox another team owns, or one that is killed, is ``NotFound`` (never 403: ids do not
  leak across teams);
- placement (choosing a host and recording the sandbox on it) is serialized in this process so
  two creates cannot both take a host's last room;
- every finished change emits its event (``events``) in the transaction that records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from wrenn import log
from wrenn.controlplane import ids, scheduler
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.database import Transaction
from wrenn.controlplane.db.records import (
    VISIBLE_STATES,
    Host,
    MetricSample,
    Page,
    Sandbox,
    SandboxState,
    SandboxSummary,
    Snapshot,
    Template,
)
from wrenn.controlplane.db.sandboxes import SandboxQuery, egress_json
from wrenn.controlplane.errors import Conflict
from wrenn.controlplane.events import Events, EventType, sandbox_event
from wrenn.controlplane.hostpool import AgentClient, HostPool
from wrenn.core.egress import Egress
from wrenn.core.errors import Internal, InvalidArgument, NotFound, Unavailable, WrennError
from wrenn.gen.hostagent import hostagent_pb as pb

_log = log.get(__name__)

#: Any visible sandbox can be killed; a second kill of a stopping one retries the RPC.
_KILLABLE = VISIBLE_STATES | {SandboxState.STOPPING}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CreateSpec:
    template_ref: str
    timeout_s: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    auto_pause: bool = False
    auto_resume: bool = False
    allow_internet_access: bool | None = None
    #: False: ports other than envd's need the sandbox's traffic access token.
    public_traffic: bool = True
    #: Destinations always / never reachable from the guest (``Egress.allow_out`` form).
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()


#: Most forks one request may ask for (the e2b SDK's own bound).
MAX_FORKS = 20
#: Fork snapshots looked at per sweep; one whose deletion its host refused waits this long.
FORK_SWEEP_BATCH = 50
FORK_SWEEP_RETRY_S = 60.0

#: Latest time a log entry may carry (a guest clock gone wild is clamped to it).
_MAX_TIMESTAMP_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z
#: Most samples one metrics request returns (the newest of a longer range).
MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class LogEntry:
    """One of envd's log lines from inside the sandbox."""

    timestamp: datetime
    #: debug, info, warn or error.
    level: str
    message: str
    fields: dict[str, str]
    #: The line as envd wrote it.
    line: str


def sample_of(sandbox_id: str, m: pb.SandboxMetrics, vcpus: int) -> MetricSample:
    """A host agent's metrics as a sample (its own time, or now when it gives none)."""
    return MetricSample(
        sandbox_id=sandbox_id,
        sampled_at=datetime.fromtimestamp(m.timestamp_ms / 1000, UTC)
        if m.timestamp_ms > 0
        else _now(),
        cpu_count=m.cpu_count or vcpus,
        cpu_used_pct=m.cpu_used_pct,
        mem_used_bytes=m.mem_used_bytes,
        mem_total_bytes=m.mem_total_bytes,
        disk_used_bytes=m.disk_used_bytes,
        disk_total_bytes=m.disk_total_bytes,
        mem_cache_bytes=m.mem_cache_bytes,
    )


def policy_of(settings: ControlPlaneSettings) -> scheduler.Policy:
    return scheduler.Policy(
        heartbeat_window=timedelta(seconds=settings.heartbeat_window_s),
        reserve_vcpus=settings.reserve_vcpus,
        reserve_memory_mib=settings.reserve_memory_mib,
        reserve_disk_mib=settings.reserve_disk_mib,
        cpu_overcommit=settings.cpu_overcommit,
        sandbox_disk_mib=settings.sandbox_disk_mib,
    )


class Sandboxes:
    def __init__(
        self,
        db: Database,
        pool: HostPool,
        settings: ControlPlaneSettings,
        placement: scheduler.Scheduler,
        events: Events,
    ) -> None:
        self._db = db
        self._pool = pool
        self._settings = settings
        self._scheduler = placement
        self._events = events
        #: Fork snapshots whose host refused their deletion: when to try again.
        self._fork_retry_at: dict[str, float] = {}

    # --- lookups --------------------------------------------------------------------------

    def check_timeout(self, timeout_s: int, what: str = "timeout") -> int:
        if timeout_s > self._settings.max_timeout_s:
            raise InvalidArgument(
                f"{what} {timeout_s} s exceeds the maximum of {self._settings.max_timeout_s} s"
            )
        return timeout_s

    async def get(
        self, team_id: str, sandbox_id: str, states: frozenset[SandboxState] = VISIBLE_STATES
    ) -> Sandbox:
        """``team_id``'s sandbox ``sandbox_id`` if it is in one of ``states``, else
        ``NotFound``."""
        if not ids.is_sandbox_id(sandbox_id):
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        async with self._db.transaction(read_only=True) as tx:
            sandbox = await tx.sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.team_id != team_id or sandbox.state not in states:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return sandbox

    async def page(self, query: SandboxQuery) -> Page[SandboxSummary]:
        return await self._db.reads.sandboxes(query)

    async def _agent(self, host_id: str | None, what: str) -> tuple[Host, AgentClient]:
        host = None
        if host_id is not None:
            async with self._db.transaction(read_only=True) as tx:
                host = await tx.hosts.get(host_id)
        if host is None:
            raise Unavailable(f"the host of {what} is gone")
        return host, await self._pool.get(host)

    # --- create ---------------------------------------------------------------------------

    async def _resolve(self, team_id: str, ref: str) -> tuple[Template | None, Snapshot | None]:
        async with self._db.transaction() as tx:
            template = await tx.templates.get(ref, team_id)
            if template is not None:
                return template, None
            snapshot = await tx.snapshots.find(team_id, ref)
            if snapshot is not None:
                return await tx.templates.get(snapshot.template_id, team_id), snapshot
        raise NotFound(f"template {ref!r} not found")

    async def create(self, team_id: str, spec: CreateSpec) -> Sandbox:
        timeout_s = self.check_timeout(spec.timeout_s)
        template, snapshot = await self._resolve(team_id, spec.template_ref)
        return await self._create(team_id, spec, timeout_s, template, snapshot)

    async def _create(
        self,
        team_id: str,
        spec: CreateSpec,
        timeout_s: int,
        template: Template | None,
        snapshot: Snapshot | None,
    ) -> Sandbox:
        async with self._scheduler.placing(), self._db.transaction() as tx:
            sandbox, host = await self._place(tx, team_id, spec, timeout_s, template, snapshot)
        return await self._start(sandbox, host, spec, timeout_s)

    async def _place(
        self,
        tx: Transaction,
        team_id: str,
        spec: CreateSpec,
        timeout_s: int,
        template: Template | None,
        snapshot: Snapshot | None,
    ) -> tuple[Sandbox, Host]:
        """Choose the new sandbox's host and record it, starting (inside ``placing``)."""
        if snapshot is not None:
            vcpus, memory_mib = snapshot.vcpus, snapshot.memory_mib
            template_id = snapshot.template_id
            disk_mib = template.disk_mib if template else 0
        else:
            assert template is not None
            vcpus, memory_mib, disk_mib = template.vcpus, template.memory_mib, template.disk_mib
            template_id = template.id
        demand = scheduler.Demand(vcpus, memory_mib, self._settings.sandbox_disk_mib)
        now = _now()
        host = self._scheduler.place(
            await tx.hosts.all(),
            await tx.hosts.loads(),
            demand,
            pinned_host_id=snapshot.host_id if snapshot else None,
            pinned_reason=f"snapshot {snapshot.id}" if snapshot else "",
            template=None
            if snapshot
            else scheduler.TemplateOnHosts(
                template_id, await tx.host_templates.hosts_with(template_id)
            ),
        )
        sandbox = Sandbox(
            id=ids.sandbox_id(),
            team_id=team_id,
            host_id=host.id,
            template_id=template_id,
            alias=spec.template_ref if spec.template_ref != template_id else None,
            snapshot_id=snapshot.id if snapshot else None,
            state=SandboxState.STARTING,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            envd_version=template.envd_version if template else "",
            envd_access_token=ids.envd_access_token(),
            allow_internet_access=spec.allow_internet_access,
            auto_pause=spec.auto_pause,
            auto_resume=spec.auto_resume,
            build_id=None,
            started_at=now,
            end_at=now + timedelta(seconds=timeout_s),
            created_at=now,
            metadata=dict(spec.metadata),
            traffic_access_token=None if spec.public_traffic else ids.traffic_access_token(),
            allow_out=spec.allow_out,
            deny_out=spec.deny_out,
        )
        await tx.sandboxes.insert(sandbox)
        return sandbox, host

    async def _start(
        self, sandbox: Sandbox, host: Host, spec: CreateSpec, timeout_s: int
    ) -> Sandbox:
        """Start a placed sandbox on its host; marked failed if that fails."""
        log_ = _log.bind(sandbox_id=sandbox.id, host_id=host.id)
        agent = await self._pool.get(host)
        try:
            info = await agent.create_sandbox(
                pb.CreateSandboxRequest(
                    sandbox_id=sandbox.id,
                    template_id=sandbox.template_id,
                    snapshot_id=sandbox.snapshot_id,
                    vcpus=sandbox.vcpus,
                    memory_mib=sandbox.memory_mib,
                    env_vars=dict(spec.env_vars),
                    envd_access_token=sandbox.envd_access_token,
                    allow_internet_access=spec.allow_internet_access is not False,
                    allow_out=list(spec.allow_out),
                    deny_out=list(spec.deny_out),
                    metadata=dict(spec.metadata),
                )
            )
        except BaseException as err:
            await asyncio.shield(
                self._mark(
                    sandbox.id,
                    SandboxState.STARTING,
                    SandboxState.FAILED,
                    EventType.SANDBOX_FAILED,
                    reason="create_failed",
                    error=getattr(err, "message", type(err).__name__),
                )
            )
            raise
        started = _now()
        async with self._db.transaction() as tx:
            running = await tx.sandboxes.transition(
                sandbox.id,
                {SandboxState.STARTING},
                SandboxState.RUNNING,
                envd_version=info.envd_version or sandbox.envd_version,
                guest_address=info.address,
                started_at=started,
                end_at=started + timedelta(seconds=timeout_s),
            )
            await tx.templates.record_spawn(sandbox.template_id)
            if running is not None:
                await self._events.emit(
                    tx,
                    sandbox_event(
                        EventType.SANDBOX_CREATED, running, snapshotID=running.snapshot_id
                    ),
                )
        if running is None:
            # Killed while it was starting: the kill found nothing on the host yet.
            log_.info("sandbox.killed_while_starting")
            await self._destroy_quietly(agent, sandbox.id)
            raise NotFound(f"sandbox {sandbox.id!r} was killed while starting")
        return running

    async def _mark(
        self,
        sandbox_id: str,
        from_state: SandboxState | frozenset[SandboxState],
        to: SandboxState,
        event: EventType | None = None,
        **extra: object,
    ) -> Sandbox | None:
        """Compare-and-set the state; emits ``event`` when this call moved the sandbox."""
        from_states = {from_state} if isinstance(from_state, SandboxState) else from_state
        ended = to in (SandboxState.FAILED, SandboxState.KILLED)
        async with self._db.transaction() as tx:
            if ended:
                moved = await tx.sandboxes.transition(sandbox_id, from_states, to, ended_at=_now())
            else:
                moved = await tx.sandboxes.transition(sandbox_id, from_states, to)
            if moved is not None and event is not None:
                await self._events.emit(tx, sandbox_event(event, moved, **extra))
        return moved

    async def mark_failed(
        self, sandbox: Sandbox, from_states: frozenset[SandboxState], reason: str
    ) -> Sandbox | None:
        """Mark a sandbox failed (``sandbox.failed``) if it is still in ``from_states``."""
        return await self._mark(
            sandbox.id, from_states, SandboxState.FAILED, EventType.SANDBOX_FAILED, reason=reason
        )

    async def _destroy_quietly(self, agent: AgentClient, sandbox_id: str) -> None:
        with contextlib.suppress(NotFound):
            await agent.destroy_sandbox(sandbox_id)

    # --- kill -----------------------------------------------------------------------------

    async def kill(self, team_id: str, sandbox_id: str) -> None:
        await self.kill_sandbox(await self.get(team_id, sandbox_id, _KILLABLE))

    async def kill_sandbox(self, sandbox: Sandbox) -> None:
        async with self._db.transaction() as tx:
            moved = await tx.sandboxes.transition(sandbox.id, _KILLABLE, SandboxState.STOPPING)
            host = await tx.hosts.get(sandbox.host_id) if sandbox.host_id else None
        if moved is None:
            raise NotFound(f"sandbox {sandbox.id!r} not found")
        if host is not None and self._scheduler.is_live(host):
            await self._destroy_quietly(await self._pool.get(host), sandbox.id)
        else:
            # Nothing to ask: the host is gone or silent. What it still runs is reconciled
            # when it comes back.
            _log.warning(
                "sandbox.killed_without_host", sandbox_id=sandbox.id, host_id=sandbox.host_id
            )
        await self._mark(
            sandbox.id, SandboxState.STOPPING, SandboxState.KILLED, EventType.SANDBOX_KILLED
        )

    # --- timeouts -------------------------------------------------------------------------

    async def set_timeout(self, team_id: str, sandbox_id: str, timeout_s: int) -> Sandbox:
        """The sandbox ends ``timeout_s`` from now (sooner or later than before)."""
        self.check_timeout(timeout_s)
        sandbox = await self.get(team_id, sandbox_id)
        async with self._db.transaction() as tx:
            updated = await tx.sandboxes.update(
                sandbox.id, end_at=_now() + timedelta(seconds=timeout_s)
            )
        assert updated is not None
        return updated

    async def refresh(self, team_id: str, sandbox_id: str, duration_s: int) -> Sandbox:
        """Keep the sandbox alive at least ``duration_s`` from now (never shortens)."""
        self.check_timeout(duration_s, "duration")
        sandbox = await self.get(team_id, sandbox_id)
        end_at = max(sandbox.end_at, _now() + timedelta(seconds=duration_s))
        async with self._db.transaction() as tx:
            updated = await tx.sandboxes.update(sandbox.id, end_at=end_at)
        assert updated is not None
        return updated

    async def update_network(self, team_id: str, sandbox_id: str, egress: Egress) -> Sandbox:
        """Replace a running sandbox's egress: on its host first, then in its record."""
        sandbox = await self.get(team_id, sandbox_id)
        if sandbox.state is not SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox.id!r} is {sandbox.state.value}, not running")
        _, agent = await self._agent(sandbox.host_id, f"sandbox {sandbox.id!r}")
        await agent.update_sandbox_network(
            pb.UpdateSandboxNetworkRequest(
                sandbox_id=sandbox.id,
                allow_internet_access=egress.internet,
                allow_out=egress.allow_out,
                deny_out=egress.deny_out,
            )
        )
        async with self._db.transaction() as tx:
            updated = await tx.sandboxes.update(
                sandbox.id,
                allow_internet_access=egress.internet,
                egress_json=egress_json(egress.allow_out, egress.deny_out),
            )
        if updated is None:
            raise NotFound(f"sandbox {sandbox.id!r} not found")
        return updated

    # --- pause and resume -----------------------------------------------------------------

    async def pause(self, team_id: str, sandbox_id: str) -> Sandbox:
        return await self.pause_sandbox(await self.get(team_id, sandbox_id))

    async def pause_sandbox(self, sandbox: Sandbox) -> Sandbox:
        if sandbox.state in (SandboxState.PAUSED, SandboxState.PAUSING):
            raise Conflict(f"sandbox {sandbox.id!r} is already paused")
        async with self._db.transaction() as tx:
            moved = await tx.sandboxes.transition(
                sandbox.id, {SandboxState.RUNNING}, SandboxState.PAUSING
            )
        if moved is None:
            raise Conflict(f"sandbox {sandbox.id!r} is not running")
        try:
            _, agent = await self._agent(sandbox.host_id, f"sandbox {sandbox.id!r}")
            build_id = await agent.pause_sandbox(sandbox.id)
        except BaseException:
            await asyncio.shield(self._mark(sandbox.id, SandboxState.PAUSING, SandboxState.RUNNING))
            raise
        async with self._db.transaction() as tx:
            paused = await tx.sandboxes.transition(
                sandbox.id, {SandboxState.PAUSING}, SandboxState.PAUSED, build_id=build_id or None
            )
            if paused is not None:
                await self._events.emit(tx, sandbox_event(EventType.SANDBOX_PAUSED, paused))
        if paused is None:
            raise NotFound(f"sandbox {sandbox.id!r} not found")
        return paused

    async def resume(
        self, team_id: str, sandbox_id: str, timeout_s: int, *, auto_pause: bool | None = None
    ) -> Sandbox:
        sandbox = await self.get(team_id, sandbox_id)
        if sandbox.state is SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox.id!r} is already running")
        return await self.resume_sandbox(sandbox, timeout_s, auto_pause)

    async def resume_sandbox(
        self, sandbox: Sandbox, timeout_s: int, auto_pause: bool | None = None
    ) -> Sandbox:
        """Resume a paused sandbox on its host; ``Conflict`` when it is not paused (or another
        caller resumes it first)."""
        self.check_timeout(timeout_s)
        if sandbox.state is not SandboxState.PAUSED:
            raise Conflict(f"sandbox {sandbox.id!r} is {sandbox.state.value}, not paused")
        demand = scheduler.Demand(
            sandbox.vcpus, sandbox.memory_mib, self._settings.sandbox_disk_mib
        )
        async with self._scheduler.placing(), self._db.transaction() as tx:
            host = self._scheduler.place(
                await tx.hosts.all(),
                await tx.hosts.loads(),
                demand,
                pinned_host_id=sandbox.host_id or "",
                pinned_reason=f"paused sandbox {sandbox.id}",
            )
            moved = await tx.sandboxes.transition(
                sandbox.id, {SandboxState.PAUSED}, SandboxState.RESUMING
            )
        if moved is None:
            raise Conflict(f"sandbox {sandbox.id!r} is no longer paused")
        try:
            agent = await self._pool.get(host)
            info = await agent.resume_sandbox(
                pb.ResumeSandboxRequest(
                    sandbox_id=sandbox.id,
                    envd_access_token=sandbox.envd_access_token,
                    allow_internet_access=sandbox.allow_internet_access is not False,
                    allow_out=list(sandbox.allow_out),
                    deny_out=list(sandbox.deny_out),
                )
            )
        except BaseException:
            await asyncio.shield(self._mark(sandbox.id, SandboxState.RESUMING, SandboxState.PAUSED))
            raise
        now = _now()
        values: dict[str, object] = {
            "end_at": now + timedelta(seconds=timeout_s),
            "build_id": None,
            "envd_version": info.envd_version or sandbox.envd_version,
            "guest_address": info.address,
        }
        if auto_pause is not None:
            values["auto_pause"] = auto_pause
        async with self._db.transaction() as tx:
            running = await tx.sandboxes.transition(
                sandbox.id, {SandboxState.RESUMING}, SandboxState.RUNNING, **values
            )
            if running is not None:
                await self._events.emit(tx, sandbox_event(EventType.SANDBOX_RESUMED, running))
        if running is None:
            await self._destroy_quietly(agent, sandbox.id)
            raise NotFound(f"sandbox {sandbox.id!r} was killed while resuming")
        return running

    async def connect(self, team_id: str, sandbox_id: str, timeout_s: int) -> tuple[Sandbox, bool]:
        """A running sandbox gets at least ``timeout_s`` more; a paused one is resumed.
        Returns the sandbox and whether it was resumed."""
        self.check_timeout(timeout_s)
        sandbox = await self.get(team_id, sandbox_id)
        if sandbox.state is SandboxState.PAUSED:
            return await self.resume_sandbox(sandbox, timeout_s, None), True
        if sandbox.state is not SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox.id!r} is {sandbox.state.value}; retry shortly")
        end_at = max(sandbox.end_at, _now() + timedelta(seconds=timeout_s))
        async with self._db.transaction() as tx:
            updated = await tx.sandboxes.update(sandbox.id, end_at=end_at)
        assert updated is not None
        return updated, False

    # --- snapshots ------------------------------------------------------------------------

    async def snapshot(self, team_id: str, sandbox_id: str, name: str | None) -> Snapshot:
        sandbox = await self.get(team_id, sandbox_id)
        if name is not None:
            if not ids.is_resource_ref(name):
                raise InvalidArgument(f"invalid snapshot name: {name!r}")
            async with self._db.transaction() as tx:
                if await tx.snapshots.name_taken(team_id, name):
                    raise Conflict(f"a snapshot named {name!r} already exists")
        async with self._taken(sandbox, name, for_fork=False) as (snapshot, tx):
            await tx.snapshots.insert(snapshot)
        _log.info("snapshot.created", sandbox_id=sandbox.id, snapshot_id=snapshot.id)
        return snapshot

    @contextlib.asynccontextmanager
    async def _taken(
        self, sandbox: Sandbox, name: str | None, *, for_fork: bool
    ) -> AsyncIterator[tuple[Snapshot, Transaction]]:
        """Snapshot running ``sandbox`` on its host; the caller records it in the
        transaction given. If that fails, the snapshot is deleted on the host again."""
        if sandbox.state is not SandboxState.RUNNING:
            raise Conflict(f"sandbox {sandbox.id!r} is {sandbox.state.value}, not running")
        _, agent = await self._agent(sandbox.host_id, f"sandbox {sandbox.id!r}")
        snapshot_id = ids.snapshot_id()
        info = await agent.create_snapshot(sandbox.id, snapshot_id)
        snapshot = Snapshot(
            id=snapshot_id,
            team_id=sandbox.team_id,
            name=name,
            sandbox_id=sandbox.id,
            template_id=sandbox.template_id,
            host_id=sandbox.host_id,
            vcpus=info.vcpus or sandbox.vcpus,
            memory_mib=info.memory_mib or sandbox.memory_mib,
            size_bytes=info.size_bytes,
            created_at=_now(),
            for_fork=for_fork,
        )
        try:
            async with self._db.transaction() as tx:
                yield snapshot, tx
        except BaseException:
            await asyncio.shield(self._delete_on_agent(agent, snapshot_id))
            raise

    # --- forks ----------------------------------------------------------------------------

    async def fork(
        self, team_id: str, sandbox_id: str, timeout_s: int, count: int
    ) -> list[Sandbox | WrennError]:
        """``count`` new sandboxes started from one snapshot of running sandbox
        ``sandbox_id``, each with the source's template, metadata and settings and an end
        ``timeout_s`` from now. The snapshot is taken once; each fork succeeds or fails on its
        own (its entry is then the error). The snapshot is hidden and is recorded in one
        transaction with every fork placed, so from its first moment a fork that has not
        ended holds it; ``sweep_forks`` deletes it once none is left."""
        timeout_s = self.check_timeout(timeout_s)
        if not 1 <= count <= MAX_FORKS:
            raise InvalidArgument(f"count: {count} is not between 1 and {MAX_FORKS}")
        source = await self.get(team_id, sandbox_id)
        spec = CreateSpec(
            template_ref=source.alias or source.template_id,
            timeout_s=timeout_s,
            metadata=dict(source.metadata),
            auto_pause=source.auto_pause,
            auto_resume=source.auto_resume,
            allow_internet_access=source.allow_internet_access,
            public_traffic=source.traffic_access_token is None,
            allow_out=source.allow_out,
            deny_out=source.deny_out,
        )
        placed: list[tuple[Sandbox, Host] | WrennError] = []
        async with (
            self._taken(source, None, for_fork=True) as (snapshot, tx),
            self._scheduler.placing(),
        ):
            await tx.snapshots.insert(snapshot)
            template = await tx.templates.get(snapshot.template_id, team_id)
            for _ in range(count):
                try:
                    placed.append(
                        await self._place(tx, team_id, spec, timeout_s, template, snapshot)
                    )
                except WrennError as err:  # no room for this one
                    placed.append(err)

        async def start(p: tuple[Sandbox, Host] | WrennError) -> Sandbox | WrennError:
            return p if isinstance(p, WrennError) else await self._start(*p, spec, timeout_s)

        out: list[Sandbox | WrennError] = []
        for result in await asyncio.gather(*map(start, placed), return_exceptions=True):
            if isinstance(result, WrennError | Sandbox):
                out.append(result)
            elif isinstance(result, Exception):
                _log.error("sandbox.fork_failed", sandbox_id=sandbox_id, error=repr(result))
                out.append(Internal("the fork could not be started"))
            else:
                raise result
        _log.info(
            "sandbox.forked",
            sandbox_id=sandbox_id,
            snapshot_id=snapshot.id,
            forks=[r.id for r in out if isinstance(r, Sandbox)],
        )
        return out

    async def sweep_forks(self) -> int:
        """Delete the snapshots taken for forks that no sandbox started from them needs any
        more; how many went. One its host refuses (a later snapshot builds on it, or the host
        is silent) is tried again at a later sweep."""
        now = time.monotonic()
        async with self._db.transaction(read_only=True) as tx:
            unused = await tx.snapshots.unused_forks(limit=FORK_SWEEP_BATCH)
        deleted = 0
        for snapshot in unused:
            if self._fork_retry_at.get(snapshot.id, 0.0) > now:
                continue
            try:
                await self._delete_snapshot(snapshot)
            except WrennError as err:
                self._fork_retry_at[snapshot.id] = now + FORK_SWEEP_RETRY_S
                _log.info("snapshot.fork_kept", snapshot_id=snapshot.id, reason=err.message)
                continue
            self._fork_retry_at.pop(snapshot.id, None)
            deleted += 1
        return deleted

    async def _delete_on_agent(self, agent: AgentClient, snapshot_id: str) -> None:
        with contextlib.suppress(NotFound):
            await agent.delete_snapshot(snapshot_id)

    async def get_snapshot(self, team_id: str, ref: str) -> Snapshot:
        if not ids.is_resource_ref(ref):
            raise NotFound(f"snapshot {ref[:128]!r} not found")
        async with self._db.transaction() as tx:
            snapshot = await tx.snapshots.find(team_id, ref)
        if snapshot is None:
            raise NotFound(f"snapshot {ref!r} not found")
        return snapshot

    async def delete_snapshot(self, team_id: str, ref: str) -> None:
        await self._delete_snapshot(await self.get_snapshot(team_id, ref))

    async def _delete_snapshot(self, snapshot: Snapshot) -> None:
        async with self._db.transaction() as tx:
            host = await tx.hosts.get(snapshot.host_id) if snapshot.host_id else None
        if host is not None and self._scheduler.is_live(host):
            await self._delete_on_agent(await self._pool.get(host), snapshot.id)
        async with self._db.transaction() as tx:
            await tx.snapshots.delete(snapshot.id)
        _log.info("snapshot.deleted", snapshot_id=snapshot.id)

    # --- metrics and logs ----------------------------------------------------------------

    async def metrics(
        self, team_id: str, sandbox_id: str, start: datetime | None, end: datetime | None
    ) -> list[MetricSample]:
        """The samples kept of the sandbox in [start, end] (the metrics sampler takes them);
        while none is kept yet, a running sandbox's current sample if it falls in the range."""
        sandbox = await self.get(team_id, sandbox_id)
        async with self._db.transaction(read_only=True) as tx:
            series = await tx.metrics.series(sandbox.id, start, end, MAX_SAMPLES)
        if series or sandbox.state is not SandboxState.RUNNING:
            return series
        _, agent = await self._agent(sandbox.host_id, f"sandbox {sandbox.id!r}")
        m = await agent.sandbox_metrics(sandbox.id)
        if m is None:
            return []
        sample = sample_of(sandbox.id, m, sandbox.vcpus)
        at = int(sample.sampled_at.timestamp())
        if (start is not None and at < int(start.timestamp())) or (
            end is not None and at > int(end.timestamp())
        ):
            return []
        return [sample]

    async def latest_metrics(self, team_id: str, sandbox_ids: list[str]) -> dict[str, MetricSample]:
        """The newest kept sample of each of the team's ``sandbox_ids`` that has one."""
        known = [s for s in sandbox_ids if ids.is_sandbox_id(s)]
        async with self._db.transaction(read_only=True) as tx:
            return await tx.metrics.latest(team_id, known)

    async def logs(
        self, team_id: str, sandbox_id: str, start_ms: int, limit: int
    ) -> list[LogEntry]:
        """envd's log entries the sandbox's host keeps (logged at or after ``start_ms``, unix
        milliseconds; oldest first; at most ``limit``). A sandbox whose host is gone or silent,
        or that is not running and whose host cannot answer, has none; a running one whose
        host fails to answer is an error."""
        sandbox = await self.get(team_id, sandbox_id)
        if limit <= 0:
            return []
        async with self._db.transaction(read_only=True) as tx:
            host = await tx.hosts.get(sandbox.host_id) if sandbox.host_id else None
        if host is None or not self._scheduler.is_live(host):
            return []
        try:
            agent = await self._pool.get(host)
            entries = await agent.sandbox_logs(sandbox.id, max(0, start_ms), limit)
        except NotFound:
            return []  # the host no longer holds it (killed meanwhile, or the agent restarted)
        except WrennError as err:
            if sandbox.state is SandboxState.RUNNING:
                raise
            _log.info("sandbox.logs_unavailable", sandbox_id=sandbox.id, code=err.code.value)
            return []
        return [
            LogEntry(
                timestamp=datetime.fromtimestamp(
                    min(max(e.timestamp_ms, 0), _MAX_TIMESTAMP_MS) / 1000, UTC
                ),
                level=e.level or "info",
                message=e.message,
                fields=dict(e.fields),
                line=e.line,
            )
            for e in entries
        ]
