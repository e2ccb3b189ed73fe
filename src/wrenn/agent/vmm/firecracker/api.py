"""An async client for Firecracker's REST API on its unix socket (v1.12 request bodies).

Every call is one request; a non-2xx answer raises a ``wrenn.core.errors`` class whose
message is Firecracker's ``fault_message`` and whose ``__cause__`` is a ``FirecrackerFault``
naming the request and the status:

    400 (bad input, or an action outside the states it is allowed in)  → InvalidArgument
    any other error status                                               → Internal
    socket missing or connection refused (the process is gone)           → Unavailable

Which VM state each call is allowed in is the caller's business (``FirecrackerVmm`` checks it
before asking); Firecracker answers 400 when it is not. The client sets no timeout of its own:
callers bound each call with ``asyncio.timeout``. The transport is swappable for tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from wrenn.core.errors import Internal, InvalidArgument, Unavailable, WrennError

MemoryBackendType = Literal["File", "Uffd"]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]
MmdsVersion = Literal["V1", "V2"]


class FirecrackerFault(Exception):
    """What Firecracker answered, kept as the internal cause of the error a caller sees."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"{method} {path} → {status}: {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


@dataclass(frozen=True)
class InstanceInfo:
    """``GET /``: ``state`` is "Not started", "Running" or "Paused"."""

    id: str
    state: str
    vmm_version: str
    app_name: str


@dataclass(frozen=True)
class MemoryBackend:
    """Where a snapshot load takes guest memory from: the memory file itself (``File``), or
    the unix socket a page server listens on (``Uffd``), which Firecracker connects to and
    hands its userfaultfd."""

    backend_type: MemoryBackendType
    backend_path: Path

    def to_json(self) -> dict[str, str]:
        return {"backend_type": self.backend_type, "backend_path": str(self.backend_path)}


def _error(method: str, path: str, response: httpx.Response) -> WrennError:
    try:
        body = response.json()
        fault = body.get("fault_message") if isinstance(body, dict) else None
    except ValueError:
        fault = None
    message = str(fault) if fault else (response.text or response.reason_phrase)
    err: WrennError = InvalidArgument(message) if response.status_code == 400 else Internal(message)
    err.__cause__ = FirecrackerFault(method, path, response.status_code, message)
    return err


class FirecrackerClient:
    """One Firecracker process's API. ``aclose()`` releases the connection pool."""

    def __init__(
        self, socket_path: Path, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.socket_path = socket_path
        self._http = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=None,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            response = await self._http.request(method, path, json=body)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as err:
            raise Unavailable(f"firecracker API at {self.socket_path} unreachable") from err
        if response.is_error:
            raise _error(method, path, response)
        return response

    async def _put(self, path: str, body: Any) -> None:
        await self._request("PUT", path, body)

    async def _patch(self, path: str, body: Any) -> None:
        await self._request("PATCH", path, body)

    async def _get(self, path: str) -> Any:
        return (await self._request("GET", path)).json()

    # -- information -----------------------------------------------------------------------

    async def describe_instance(self) -> InstanceInfo:
        body = await self._get("/")
        return InstanceInfo(
            id=body["id"],
            state=body["state"],
            vmm_version=body["vmm_version"],
            app_name=body["app_name"],
        )

    async def version(self) -> str:
        body = await self._get("/version")
        return str(body["firecracker_version"])

    async def get_machine_config(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._get("/machine-config")
        return body

    async def get_vm_config(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._get("/vm/config")
        return body

    # -- pre-boot configuration --------------------------------------------------------------

    async def put_machine_config(
        self,
        *,
        vcpu_count: int,
        mem_size_mib: int,
        track_dirty_pages: bool = False,
        smt: bool = False,
    ) -> None:
        await self._put(
            "/machine-config",
            {
                "vcpu_count": vcpu_count,
                "mem_size_mib": mem_size_mib,
                "smt": smt,
                "track_dirty_pages": track_dirty_pages,
            },
        )

    async def put_boot_source(
        self,
        kernel_image_path: Path,
        *,
        boot_args: str | None = None,
        initrd_path: Path | None = None,
    ) -> None:
        body: dict[str, str] = {"kernel_image_path": str(kernel_image_path)}
        if boot_args is not None:
            body["boot_args"] = boot_args
        if initrd_path is not None:
            body["initrd_path"] = str(initrd_path)
        await self._put("/boot-source", body)

    async def put_drive(
        self,
        drive_id: str,
        path_on_host: Path,
        *,
        is_root_device: bool,
        is_read_only: bool = False,
        io_engine: Literal["Sync", "Async"] = "Sync",
        cache_type: Literal["Unsafe", "Writeback"] = "Unsafe",
    ) -> None:
        await self._put(
            f"/drives/{drive_id}",
            {
                "drive_id": drive_id,
                "path_on_host": str(path_on_host),
                "is_root_device": is_root_device,
                "is_read_only": is_read_only,
                "io_engine": io_engine,
                "cache_type": cache_type,
            },
        )

    async def put_network_interface(
        self, iface_id: str, host_dev_name: str, *, guest_mac: str | None = None
    ) -> None:
        body: dict[str, str] = {"iface_id": iface_id, "host_dev_name": host_dev_name}
        if guest_mac is not None:
            body["guest_mac"] = guest_mac
        await self._put(f"/network-interfaces/{iface_id}", body)

    async def put_mmds_config(
        self,
        network_interfaces: Sequence[str],
        *,
        version: MmdsVersion = "V2",
        ipv4_address: str | None = None,
    ) -> None:
        """Which interfaces answer at the MMDS address. The interfaces must exist already."""
        body: dict[str, Any] = {"version": version, "network_interfaces": list(network_interfaces)}
        if ipv4_address is not None:
            body["ipv4_address"] = ipv4_address
        await self._put("/mmds/config", body)

    async def put_logger(
        self,
        log_path: Path,
        *,
        level: LogLevel = "Info",
        show_level: bool = False,
        show_log_origin: bool = False,
    ) -> None:
        """The file or FIFO must exist: Firecracker opens it, it does not create it."""
        await self._put(
            "/logger",
            {
                "log_path": str(log_path),
                "level": level,
                "show_level": show_level,
                "show_log_origin": show_log_origin,
            },
        )

    async def put_metrics(self, metrics_path: Path) -> None:
        """Metrics are appended as JSON lines at each flush. The file must exist."""
        await self._put("/metrics", {"metrics_path": str(metrics_path)})

    # -- MMDS data (any time) ----------------------------------------------------------------

    async def put_mmds(self, data: Mapping[str, Any]) -> None:
        await self._put("/mmds", dict(data))

    async def patch_mmds(self, data: Mapping[str, Any]) -> None:
        await self._patch("/mmds", dict(data))

    async def get_mmds(self) -> Any:
        return await self._get("/mmds")

    # -- actions and VM state ----------------------------------------------------------------

    async def start_instance(self) -> None:
        await self._put("/actions", {"action_type": "InstanceStart"})

    async def flush_metrics(self) -> None:
        await self._put("/actions", {"action_type": "FlushMetrics"})

    async def pause(self) -> None:
        """Only after start; idempotent in Firecracker."""
        await self._patch("/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self._patch("/vm", {"state": "Resumed"})

    # -- snapshots ---------------------------------------------------------------------------

    async def create_snapshot(
        self, *, snapshot_path: Path, mem_file_path: Path, diff: bool = False
    ) -> None:
        """Must be called while paused. A diff needs dirty page tracking (``track_dirty_pages``
        at boot, ``enable_diff_snapshots`` at load) and writes only the pages dirtied since
        the previous snapshot, as a sparse file of the full memory size."""
        await self._put(
            "/snapshot/create",
            {
                "snapshot_type": "Diff" if diff else "Full",
                "snapshot_path": str(snapshot_path),
                "mem_file_path": str(mem_file_path),
            },
        )

    async def load_snapshot(
        self,
        *,
        snapshot_path: Path,
        mem_backend: MemoryBackend,
        resume_vm: bool = False,
        enable_diff_snapshots: bool = False,
        network_overrides: Mapping[str, str] | None = None,
    ) -> None:
        """Only on a fresh process (nothing configured but the logger and metrics). A failed
        load ends the Firecracker process. With the Uffd backend the call returns only once
        the page server has answered the faults the restore itself takes.
        ``network_overrides``: iface id → the tap to attach it to instead of the recorded one.
        """
        body: dict[str, Any] = {
            "snapshot_path": str(snapshot_path),
            "mem_backend": mem_backend.to_json(),
            "enable_diff_snapshots": enable_diff_snapshots,
            "resume_vm": resume_vm,
        }
        if network_overrides:
            body["network_overrides"] = [
                {"iface_id": iface, "host_dev_name": tap}
                for iface, tap in network_overrides.items()
            ]
        await self._put("/snapshot/load", body)
