"""The E2B-compatible sandbox API (what the e2b SDK's ``Sandbox`` calls)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote

import orjson
from fastapi import APIRouter, Query, Request, Response

from wrenn.controlplane.auth import CP, Team
from wrenn.controlplane.context import ServerContext
from wrenn.controlplane.db.records import Sandbox, SandboxState, SandboxSummary, Snapshot
from wrenn.controlplane.db.sandboxes import SandboxQuery
from wrenn.controlplane.idempotency import Idempotency, IdempotencyKey, Outcome, fingerprint
from wrenn.controlplane.routes.snapshots import snapshot_page
from wrenn.controlplane.sandboxes import CreateSpec, LogEntry
from wrenn.controlplane.schemas import e2b
from wrenn.core.egress import Egress
from wrenn.core.errors import InvalidArgument

router = APIRouter(tags=["sandboxes"])

#: E2B's create timeout on /sandboxes (the v2 default comes from the settings).
V1_DEFAULT_TIMEOUT_S = 15
#: E2B's default for /sandboxes/{id}/resume.
RESUME_DEFAULT_TIMEOUT_S = 15
REFRESH_DEFAULT_S = 60

_API_STATES: dict[e2b.SandboxState, frozenset[SandboxState]] = {
    e2b.SandboxState.RUNNING: frozenset(
        {SandboxState.STARTING, SandboxState.RUNNING, SandboxState.RESUMING}
    ),
    e2b.SandboxState.PAUSED: frozenset({SandboxState.PAUSING, SandboxState.PAUSED}),
}


_API_STATE_OF: dict[SandboxState, e2b.SandboxState] = {
    state: api for api, states in _API_STATES.items() for state in states
}

#: Each state's name in a listing.
_API_STATE_NAME: dict[SandboxState, str] = {
    state: _API_STATE_OF.get(state, e2b.SandboxState.RUNNING).value for state in SandboxState
}


def api_state(state: SandboxState) -> e2b.SandboxState:
    return _API_STATE_OF.get(state, e2b.SandboxState.RUNNING)


def _listing(items: Sequence[SandboxSummary], headers: dict[str, str] | None = None) -> Response:
    """``list[e2b.ListedSandbox]`` as its JSON (by alias, no ``None``), made from the listing's
    rows without a model per item; the list routes return it as a ready ``Response``
    (``response_model`` stays on them for the OpenAPI document). The metadata goes out as the
    JSON it is stored as; times are RFC 3339 in UTC with ``Z``, as pydantic writes them."""
    out: list[dict[str, object]] = []
    for s in items:
        # One dict display per item (the cheapest way to make a dict), alias left out when
        # the sandbox has none.
        if s.alias is None:
            out.append(
                {
                    "templateID": s.template_id,
                    "sandboxID": s.id,
                    "clientID": s.host_id or "",
                    "startedAt": s.started_at,
                    "endAt": s.end_at,
                    "cpuCount": s.vcpus,
                    "memoryMB": s.memory_mib,
                    "diskSizeMB": s.disk_mib,
                    "metadata": orjson.Fragment(s.metadata_json),
                    "state": _API_STATE_NAME[s.state],
                    "envdVersion": s.envd_version,
                }
            )
        else:
            out.append(
                {
                    "templateID": s.template_id,
                    "alias": s.alias,
                    "sandboxID": s.id,
                    "clientID": s.host_id or "",
                    "startedAt": s.started_at,
                    "endAt": s.end_at,
                    "cpuCount": s.vcpus,
                    "memoryMB": s.memory_mib,
                    "diskSizeMB": s.disk_mib,
                    "metadata": orjson.Fragment(s.metadata_json),
                    "state": _API_STATE_NAME[s.state],
                    "envdVersion": s.envd_version,
                }
            )
    return Response(
        orjson.dumps(out, option=orjson.OPT_UTC_Z), media_type="application/json", headers=headers
    )


def _domain(cp: ServerContext) -> str | None:
    return cp.config.domain or None


def created(cp: ServerContext, s: Sandbox) -> e2b.Sandbox:
    return e2b.Sandbox(
        template_id=s.template_id,
        sandbox_id=s.id,
        client_id=s.host_id or "",
        envd_version=s.envd_version,
        alias=s.alias,
        envd_access_token=s.envd_access_token,
        traffic_access_token=s.traffic_access_token,
        domain=_domain(cp),
    )


def listed(s: Sandbox) -> e2b.ListedSandbox:
    return e2b.ListedSandbox(
        template_id=s.template_id,
        alias=s.alias,
        sandbox_id=s.id,
        client_id=s.host_id or "",
        started_at=s.started_at,
        end_at=s.end_at,
        cpu_count=s.vcpus,
        memory_mb=s.memory_mib,
        disk_size_mb=s.disk_mib,
        metadata=s.metadata,
        state=api_state(s.state),
        envd_version=s.envd_version,
    )


def detail(cp: ServerContext, s: Sandbox) -> e2b.SandboxDetail:
    return e2b.SandboxDetail(
        **listed(s).model_dump(),
        envd_access_token=s.envd_access_token,
        allow_internet_access=s.allow_internet_access,
        domain=_domain(cp),
        lifecycle=e2b.Lifecycle(
            auto_resume=s.auto_resume,
            on_timeout=e2b.OnTimeout.PAUSE if s.auto_pause else e2b.OnTimeout.KILL,
        ),
        network={
            "allowPublicTraffic": s.traffic_access_token is None,
            "allowOut": list(s.allow_out),
            "denyOut": list(s.deny_out),
        },
    )


def snapshot_info(s: Snapshot) -> e2b.SnapshotInfo:
    return e2b.SnapshotInfo(snapshot_id=s.id, names=[s.name] if s.name else [])


#: What this server does of a create's ``network``; anything else in it is refused by name.
_NETWORK_KEYS = frozenset({"allowPublicTraffic", "allowOut", "denyOut", "dnsServers"})


def _strings(field: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{field}: must be a list of strings (got {value!r:.60})")
    return value


def _egress(
    internet: bool | None, allow: object, deny: object, dns_servers: object, where: str = ""
) -> Egress:
    """The egress a create or an update asks for. ``dnsServers`` only matter for domains in
    ``allowOut``, which are refused: they are checked (IPv4 addresses) and have no effect."""
    for server in _strings(f"{where}dnsServers", dns_servers):
        try:
            IPv4Address(server)
        except ValueError:
            raise InvalidArgument(
                f"{where}dnsServers: {server[:80]!r} is not an IPv4 address"
            ) from None
    return Egress.parse(
        internet=internet is not False,
        allow=_strings(f"{where}allowOut", allow),
        deny=_strings(f"{where}denyOut", deny),
    )


def _network(body: e2b.NewSandbox) -> tuple[bool, Egress]:
    """A create's public traffic (``network.allowPublicTraffic``, default true) and egress
    (``allow_internet_access`` with ``network.allowOut`` / ``denyOut``)."""
    network = body.network or {}
    for key, value in network.items():
        if key not in _NETWORK_KEYS and value not in (None, [], {}, ""):
            raise InvalidArgument(f"network.{key[:64]}: not supported by this server")
    public = network.get("allowPublicTraffic", True)
    if public is None:
        public = True
    if not isinstance(public, bool):
        raise InvalidArgument(f"network.allowPublicTraffic: must be a boolean (got {public!r:.40})")
    egress = _egress(
        body.allow_internet_access,
        network.get("allowOut"),
        network.get("denyOut"),
        network.get("dnsServers"),
        "network.",
    )
    return public, egress


def _refuse_unsupported(body: e2b.NewSandbox) -> None:
    for name, value in (
        ("mcp", body.mcp),
        ("iam", body.iam),
        ("volumeMounts", body.volume_mounts),
    ):
        if value:
            raise InvalidArgument(f"{name}: not supported by this server")
    if body.auto_pause_memory is False:
        raise InvalidArgument("autoPauseMemory: filesystem-only pauses are not supported")


async def _create(
    cp: ServerContext, who: Team, body: e2b.NewSandbox, default_timeout_s: int
) -> e2b.Sandbox:
    _refuse_unsupported(body)
    public_traffic, egress = _network(body)
    sandbox = await cp.sandboxes.create(
        who.team.id,
        CreateSpec(
            template_ref=body.template_id,
            timeout_s=body.timeout if body.timeout is not None else default_timeout_s,
            metadata=body.metadata or {},
            env_vars=body.env_vars or {},
            auto_pause=bool(body.auto_pause),
            auto_resume=bool(body.auto_resume and body.auto_resume.enabled),
            allow_internet_access=body.allow_internet_access,
            public_traffic=public_traffic,
            allow_out=tuple(egress.allow_out),
            deny_out=tuple(egress.deny_out),
        ),
    )
    return created(cp, sandbox)


async def _create_once(
    request: Request,
    cp: ServerContext,
    who: Team,
    body: e2b.NewSandbox,
    default_timeout_s: int,
    key: str | None,
) -> Response:
    async def work() -> Outcome:
        sandbox = await _create(cp, who, body, default_timeout_s)
        return Outcome(201, sandbox.model_dump(mode="json", by_alias=True, exclude_none=True))

    return await Idempotency.of(cp.db, cp.config).once(
        who.team.id, key, fingerprint(request.method, request.url.path, body), work
    )


@router.post(
    "/sandboxes", status_code=201, response_model=e2b.Sandbox, response_model_exclude_none=True
)
async def create_sandbox(
    request: Request,
    body: e2b.NewSandbox,
    cp: CP,
    who: Team,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await _create_once(request, cp, who, body, V1_DEFAULT_TIMEOUT_S, idempotency_key)


@router.post(
    "/v2/sandboxes", status_code=201, response_model=e2b.Sandbox, response_model_exclude_none=True
)
async def create_sandbox_v2(
    request: Request,
    body: e2b.NewSandbox,
    cp: CP,
    who: Team,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await _create_once(request, cp, who, body, cp.config.default_timeout_s, idempotency_key)


def parse_metadata_filter(raw: str | None) -> dict[str, str]:
    """``metadata`` as the SDK sends it: ``k=v&k2=v2``, each key and value percent-quoted."""
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError as err:
        raise InvalidArgument(f"metadata: not a k=v&k2=v2 query (got {raw[:120]!r})") from err
    out = {unquote(k): unquote(v) for k, v in pairs}
    for k, v in out.items():
        if not k or "\x00" in k or "\x00" in v or len(k) > 256:
            raise InvalidArgument(f"metadata: invalid key or value {k[:64]!r}")
    return out


def parse_states(raw: list[str] | None) -> frozenset[SandboxState]:
    if not raw:
        return _API_STATES[e2b.SandboxState.RUNNING] | _API_STATES[e2b.SandboxState.PAUSED]
    states: set[SandboxState] = set()
    for item in raw:
        for name in item.split(","):
            try:
                states |= _API_STATES[e2b.SandboxState(name.strip())]
            except ValueError as err:
                raise InvalidArgument(
                    f"state: must be running or paused (got {name[:64]!r})"
                ) from err
    return frozenset(states)


@router.get("/sandboxes", response_model=list[e2b.ListedSandbox], response_model_exclude_none=True)
async def list_sandboxes_v1(
    cp: CP, who: Team, metadata: Annotated[str | None, Query(max_length=8192)] = None
) -> Response:
    """Running sandboxes (E2B's first list endpoint; no pagination)."""
    page = await cp.sandboxes.page(
        SandboxQuery(
            team_id=who.team.id,
            states=_API_STATES[e2b.SandboxState.RUNNING],
            metadata=parse_metadata_filter(metadata),
            limit=10_000,
        )
    )
    return _listing(page.items)


@router.get(
    "/v2/sandboxes", response_model=list[e2b.ListedSandbox], response_model_exclude_none=True
)
async def list_sandboxes(
    cp: CP,
    who: Team,
    metadata: Annotated[str | None, Query(max_length=8192)] = None,
    state: Annotated[list[str] | None, Query(max_length=16)] = None,
    order: Literal["asc", "desc"] = "desc",
    started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
    template: Annotated[str | None, Query(max_length=128)] = None,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Running and paused sandboxes, newest first by default; ``x-next-token`` when more."""
    if started_after is not None and started_after.tzinfo is None:
        started_after = started_after.replace(tzinfo=UTC)
    page = await cp.sandboxes.page(
        SandboxQuery(
            team_id=who.team.id,
            states=parse_states(state),
            metadata=parse_metadata_filter(metadata),
            template_id=template,
            started_after=started_after,
            order=order,
            limit=limit,
            next_token=next_token,
        )
    )
    headers = {"x-next-token": page.next_token} if page.next_token else None
    return _listing(page.items, headers)


@router.get("/sandboxes/{sandbox_id}", response_model_exclude_none=True)
async def get_sandbox(sandbox_id: str, cp: CP, who: Team) -> e2b.SandboxDetail:
    return detail(cp, await cp.sandboxes.get(who.team.id, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, cp: CP, who: Team) -> Response:
    await cp.sandboxes.kill(who.team.id, sandbox_id)
    return Response(status_code=204)


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
async def update_network(sandbox_id: str, body: e2b.NetworkUpdate, cp: CP, who: Team) -> Response:
    """Replace a running sandbox's egress rules (allowOut, denyOut, allowInternetAccess)."""
    for name, value in (("egressProxy", body.egress_proxy), ("rules", body.rules)):
        if value:
            raise InvalidArgument(f"{name}: not supported by this server")
    egress = _egress(body.allow_internet_access, body.allow_out, body.deny_out, body.dns_servers)
    await cp.sandboxes.update_network(who.team.id, sandbox_id, egress)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, body: e2b.TimeoutRequest, cp: CP, who: Team) -> Response:
    await cp.sandboxes.set_timeout(who.team.id, sandbox_id, body.timeout)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204)
async def refresh(
    sandbox_id: str, cp: CP, who: Team, body: e2b.RefreshRequest | None = None
) -> Response:
    duration = body.duration if body and body.duration is not None else REFRESH_DEFAULT_S
    await cp.sandboxes.refresh(who.team.id, sandbox_id, duration)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause(
    sandbox_id: str, cp: CP, who: Team, body: e2b.PauseRequest | None = None
) -> Response:
    if body is not None and body.memory is False:
        raise InvalidArgument("memory: filesystem-only pauses are not supported")
    await cp.sandboxes.pause(who.team.id, sandbox_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201, response_model_exclude_none=True)
async def resume(
    sandbox_id: str, cp: CP, who: Team, body: e2b.ResumeRequest | None = None
) -> e2b.Sandbox:
    body = body or e2b.ResumeRequest()
    if body.memory is False:
        raise InvalidArgument("memory: resuming without memory is not supported")
    timeout = body.timeout if body.timeout is not None else RESUME_DEFAULT_TIMEOUT_S
    sandbox = await cp.sandboxes.resume(
        who.team.id, sandbox_id, timeout, auto_pause=body.auto_pause
    )
    return created(cp, sandbox)


async def _connect(
    cp: ServerContext, who: Team, sandbox_id: str, body: e2b.ConnectRequest | None
) -> Response:
    body = body or e2b.ConnectRequest()
    timeout = body.timeout if body.timeout is not None else cp.config.default_timeout_s
    if body.memory is False:
        current = await cp.sandboxes.get(who.team.id, sandbox_id)
        if current.state is SandboxState.PAUSED:
            raise InvalidArgument("memory: resuming without memory is not supported")
    sandbox, resumed = await cp.sandboxes.connect(who.team.id, sandbox_id, timeout)
    payload = created(cp, sandbox).model_dump_json(by_alias=True, exclude_none=True)
    return Response(payload, status_code=201 if resumed else 200, media_type="application/json")


_CONNECT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "already running; its end time extended", "model": e2b.Sandbox},
    201: {"description": "was paused and has been resumed", "model": e2b.Sandbox},
}


@router.post("/sandboxes/{sandbox_id}/connect", responses=_CONNECT_RESPONSES)
async def connect(
    sandbox_id: str, cp: CP, who: Team, body: e2b.ConnectRequest | None = None
) -> Response:
    return await _connect(cp, who, sandbox_id, body)


@router.post("/v2/sandboxes/{sandbox_id}/connect", responses=_CONNECT_RESPONSES)
async def connect_v2(
    sandbox_id: str, cp: CP, who: Team, body: e2b.ConnectRequest | None = None
) -> Response:
    return await _connect(cp, who, sandbox_id, body)


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def create_snapshot(
    sandbox_id: str, cp: CP, who: Team, body: e2b.SnapshotRequest | None = None
) -> e2b.SnapshotInfo:
    body = body or e2b.SnapshotRequest()
    if body.memory is False:
        raise InvalidArgument("memory: filesystem-only snapshots are not supported")
    snapshot = await cp.sandboxes.snapshot(who.team.id, sandbox_id, body.name)
    return e2b.SnapshotInfo(snapshot_id=snapshot.id, names=[snapshot.name] if snapshot.name else [])


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, response_model_exclude_none=True)
async def fork(
    sandbox_id: str, cp: CP, who: Team, body: e2b.ForkRequest | None = None
) -> list[e2b.ForkResult]:
    body = body or e2b.ForkRequest()
    results = await cp.sandboxes.fork(who.team.id, sandbox_id, body.timeout, body.count)
    return [
        e2b.ForkResult(sandbox=created(cp, r))
        if isinstance(r, Sandbox)
        else e2b.ForkResult(error=e2b.ForkError(code=r.http_status, message=r.message))
        for r in results
    ]


@router.get("/sandboxes/{sandbox_id}/logs")
async def logs(
    sandbox_id: str,
    cp: CP,
    who: Team,
    start: Annotated[int | None, Query(ge=0, le=2**53)] = None,
    limit: Annotated[int, Query(ge=0, le=10_000)] = 1000,
) -> e2b.SandboxLogs:
    """envd's log lines from inside the sandbox, oldest first: those logged at or after
    ``start`` (unix milliseconds), at most ``limit``. Its host keeps a bounded tail, across
    pauses; a sandbox whose host is gone has none."""
    entries = await cp.sandboxes.logs(who.team.id, sandbox_id, start or 0, limit)
    return e2b.SandboxLogs(
        logs=[e2b.SandboxLog(timestamp=e.timestamp, line=e.line) for e in entries],
        log_entries=[_log_entry(e) for e in entries],
    )


_LOG_LEVELS = frozenset(level.value for level in e2b.LogLevel)
_LEVEL_RANK = {level: rank for rank, level in enumerate(e2b.LogLevel)}
#: More than a host keeps of one sandbox (see docs/api.md, *Logs*): v2 filters all of them.
_KEPT_MAX = 10_000


@router.get("/v2/sandboxes/{sandbox_id}/logs")
async def logs_v2(
    sandbox_id: str,
    cp: CP,
    who: Team,
    cursor: Annotated[int | None, Query(ge=0, le=2**53)] = None,
    limit: Annotated[int, Query(ge=0, le=10_000)] = 1000,
    direction: e2b.LogsDirection = e2b.LogsDirection.FORWARD,
    level: e2b.LogLevel | None = None,
    search: Annotated[str | None, Query(max_length=1024)] = None,
) -> e2b.SandboxLogsV2:
    """The same entries as ``/sandboxes/{id}/logs``, filtered: ``forward`` from ``cursor``
    (unix ms, included; default the oldest) oldest first, ``backward`` up to ``cursor``
    (default the newest) newest first; at least ``level``; ``search`` a substring of the
    message or of a field's value (case-sensitive); at most ``limit``."""
    entries = [
        _log_entry(e) for e in await cp.sandboxes.logs(who.team.id, sandbox_id, 0, _KEPT_MAX)
    ]
    forward = direction is e2b.LogsDirection.FORWARD
    floor = _LEVEL_RANK[level] if level is not None else 0
    picked = [
        e
        for e in entries
        if (
            cursor is None
            or (_unix_ms(e.timestamp) >= cursor if forward else _unix_ms(e.timestamp) <= cursor)
        )
        and _LEVEL_RANK[e.level] >= floor
        and (not search or search in e.message or any(search in v for v in e.fields.values()))
    ]
    if not forward:
        picked.reverse()
    return e2b.SandboxLogsV2(logs=picked[:limit])


def _log_entry(e: LogEntry) -> e2b.SandboxLogEntry:
    return e2b.SandboxLogEntry(
        timestamp=e.timestamp,
        level=e2b.LogLevel(e.level) if e.level in _LOG_LEVELS else e2b.LogLevel.INFO,
        message=e.message,
        fields=e.fields,
    )


def _unix_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


@router.get("/snapshots")
async def list_snapshots(
    cp: CP,
    who: Team,
    response: Response,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID", max_length=64)] = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=512)] = None,
) -> list[e2b.SnapshotInfo]:
    page = await snapshot_page(cp, who, response, sandbox_id, name, limit, next_token)
    return [snapshot_info(s) for s in page]
