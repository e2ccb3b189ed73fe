"""``GET /files`` (download) and ``POST /files`` (upload), as E2B's envd serves them.

Both act as the user named by the ``username`` query parameter, else the default user, and
resolve ``path`` like the filesystem RPCs do (``~`` and relative paths against the user's
home). Bodies are streamed: nothing holds a whole file in memory.

Download: the file's bytes with its ``Content-Type`` (by extension) and ``Content-Length``;
gzip-compressed (no length) when ``Accept-Encoding`` prefers gzip. A missing file is 404, a
directory 400.

Upload: ``application/octet-stream`` writes the body to ``path``; ``multipart/form-data``
writes every part named ``file`` to ``path`` when given, else to the part's filename (the SDK
sends the destination path there). ``Content-Encoding: gzip`` bodies are decompressed.
``X-Metadata-<key>`` headers are stored on each file as ``user.<key>`` extended attributes.
Missing parent directories are created as the user. The response lists the written files as
``[{"name", "type": "file", "path"}]``.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from wrenn import log
from wrenn.core.errors import InvalidArgument
from wrenn.envd import users
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import paths
from wrenn.envd.filesystem.transfer import FileReader, FileWriter
from wrenn.envd.sendfile import FILE_BODY, SendFailed
from wrenn.envd.splicebody import UPLOAD_BODY, UploadCut, content_length

_log = log.get(__name__)

METADATA_HEADER_PREFIX = "x-metadata-"
#: Raw bodies at least this long are spliced into their file (and end their connection).
SPLICE_MIN_BYTES = 1 << 20
SUPPORTED_ENCODINGS = ("gzip",)


def _defaults(request: Request) -> Defaults:
    defaults: Defaults = request.app.state.envd.defaults
    return defaults


def _user(request: Request, defaults: Defaults) -> users.User:
    return users.lookup(request.query_params.get("username") or defaults.user)


def content_type(path: str) -> str:
    """The media type of ``path`` by its extension; text types carry ``charset=utf-8``."""
    guessed, _ = mimetypes.guess_type(path, strict=False)
    if guessed is None:
        return "application/octet-stream"
    if guessed.startswith("text/"):
        return f"{guessed}; charset=utf-8"
    return guessed


def _coding(value: str) -> tuple[str, float]:
    name, _, params = value.partition(";")
    quality = 1.0
    for param in params.split(";"):
        key, _, number = param.strip().partition("=")
        if key.lower() == "q":
            with contextlib.suppress(ValueError):
                quality = float(number)
    return name.strip().lower(), quality


def response_encoding(accept_encoding: str | None) -> str | None:
    """The content coding to answer with (``"gzip"`` or None for identity).

    Compression costs the sandbox's CPU far more than it saves on the links envd is reached
    through, so gzip is used when the client asks for it specifically: gzip is the only
    coding it accepts besides identity (the SDK's ``gzip=True`` sends ``gzip``), or it
    refuses identity. The lists HTTP libraries send by default (``gzip, deflate``, ``gzip,
    deflate, br, zstd``) get identity, which every client must accept (RFC 9110, 12.5.3).
    Otherwise negotiated like E2B's envd: the highest-quality supported coding wins."""
    if not accept_encoding:
        return None
    codings = sorted(
        (_coding(part) for part in accept_encoding.split(",") if part.strip()),
        key=lambda item: item[1],
        reverse=True,
    )
    identity_refused = any(name == "identity" and q == 0 for name, q in codings)
    offered = {name for name, q in codings if q > 0 and name != "identity"}
    if not identity_refused and len(offered) > 1:
        return None
    for name, quality in codings:
        if quality == 0:
            continue
        if name == "identity":
            return None
        if name == "*":
            return SUPPORTED_ENCODINGS[0] if identity_refused else None
        if name in SUPPORTED_ENCODINGS:
            return name
    if identity_refused:
        raise InvalidArgument(
            f"no acceptable encoding in Accept-Encoding: {accept_encoding}; "
            f"supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    return None


def request_encoding(content_encoding: str | None) -> str | None:
    """The coding of a request body: None for none or identity, else a supported one."""
    if not content_encoding:
        return None
    name, _ = _coding(content_encoding)
    if name == "identity":
        return None
    if name not in SUPPORTED_ENCODINGS:
        raise InvalidArgument(
            f"unsupported Content-Encoding: {content_encoding}; "
            f"supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    return name


async def download(request: Request) -> Response:
    defaults = _defaults(request)
    user = _user(request, defaults)
    path = paths.resolve(request.query_params.get("path", ""), user, defaults.workdir)
    encoding = response_encoding(request.headers.get("accept-encoding"))
    reader = await FileReader.open(user, path)
    headers = {
        "Vary": "Accept-Encoding",
        "Last-Modified": formatdate(reader.mtime_s, usegmt=True),
    }
    if encoding is None:
        headers["Content-Length"] = str(reader.size_bytes)
    else:
        headers["Content-Encoding"] = encoding
    if encoding is not None:
        return StreamingResponse(
            reader.chunks(gzip=True), headers=headers, media_type=content_type(path)
        )
    return _FileResponse(reader, headers, content_type(path))


class _FileResponse(Response):
    """A whole file: sent by the kernel when envd's protocol offers it (``sendfile``), else
    streamed in chunks."""

    def __init__(self, reader: FileReader, headers: dict[str, str], media_type: str) -> None:
        super().__init__(headers=headers, media_type=media_type)
        self.reader = reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        file_body = scope.get("extensions", {}).get(FILE_BODY)
        if file_body is None:
            streamed = StreamingResponse(
                self.reader.chunks(gzip=False), self.status_code, media_type=self.media_type
            )
            streamed.raw_headers = self.raw_headers
            await streamed(scope, receive, send)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if scope["method"] != "HEAD":
                await file_body["send"](self.reader.fd, 0, self.reader.size_bytes)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except SendFailed as err:
            _log.info("files.download_cut", path=self.reader.path, reason=str(err))
        finally:
            self.reader.close()


async def _gunzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Decompress a gzip body (several concatenated members allowed)."""
    decompressor = zlib.decompressobj(31)
    started = False
    try:
        async for chunk in body:
            while chunk:
                started = True
                out = decompressor.decompress(chunk)
                if out:
                    yield out
                if not decompressor.eof:
                    break
                chunk = decompressor.unused_data
                decompressor = zlib.decompressobj(31)
                started = False
        tail = decompressor.flush()
        if tail:
            yield tail
    except zlib.error as err:
        raise InvalidArgument(f"invalid gzip request body: {err}") from err
    if started and not decompressor.eof:
        raise InvalidArgument("gzip request body ends before its end marker")


def _metadata(request: Request) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for name, value in request.headers.items():
        if name.startswith(METADATA_HEADER_PREFIX):
            key = name.removeprefix(METADATA_HEADER_PREFIX)
            if not key:
                raise InvalidArgument("empty metadata key in an X-Metadata- header")
            metadata[key.lower()] = value
    return metadata


def _written(path: str, metadata: dict[str, str]) -> dict[str, Any]:
    info: dict[str, Any] = {"name": os.path.basename(path), "type": "file", "path": path}
    if metadata:
        info["metadata"] = metadata
    return info


async def upload(request: Request) -> Response:
    defaults = _defaults(request)
    user = _user(request, defaults)
    query_path = request.query_params.get("path")
    metadata = _metadata(request)
    body: AsyncIterator[bytes] = request.stream()
    gzipped = request_encoding(request.headers.get("content-encoding")) == "gzip"
    if gzipped:
        body = _gunzip(body)
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    try:
        if media_type == b"application/octet-stream":
            if not query_path:
                raise InvalidArgument("path query parameter is required for raw body upload")
            path = paths.resolve(query_path, user, defaults.workdir)
            spliced = None if gzipped else _spliced(request)
            await _write_one(user, path, spliced or body, metadata)
            written = [_written(path, metadata)]
        elif media_type.startswith(b"multipart/"):
            boundary = options.get(b"boundary")
            if not boundary:
                raise InvalidArgument("multipart Content-Type without a boundary")
            upload = _MultipartUpload(boundary, user, defaults, query_path, metadata)
            written = await upload.run(body)
        else:
            raise InvalidArgument(
                f"unsupported content type: {request.headers.get('content-type', '')}, "
                "expected multipart/form-data or application/octet-stream"
            )
    except (ClientDisconnect, UploadCut) as err:
        _log.info("files.upload_aborted", reason=str(err) or "client disconnected")
        return Response(status_code=400)
    return JSONResponse(written)


def _spliced(request: Request) -> Callable[[int], Awaitable[None]] | None:
    """The kernel's way in for this body, when envd's protocol offers it and the body is
    long enough to be worth its connection (``splicebody``)."""
    offered = request.scope.get("extensions", {}).get(UPLOAD_BODY)
    length = content_length(request.scope)
    if offered is None or length is None or length < SPLICE_MIN_BYTES:
        return None
    receive: Callable[[int], Awaitable[None]] = offered["receive"]
    return receive


async def _write_one(
    user: users.User,
    path: str,
    body: AsyncIterator[bytes] | Callable[[int], Awaitable[None]],
    metadata: dict[str, str],
) -> None:
    writer = await FileWriter.open(user, path)
    try:
        if callable(body):
            await writer.receive(body)
        else:
            async for chunk in body:
                await writer.write(chunk)
        await writer.set_metadata(metadata)
        await writer.close()
    except BaseException:
        await writer.abort()
        raise


class _MultipartUpload:
    """Streams the ``file`` parts of one multipart body to their destinations. The parser
    runs synchronously over each received chunk and records what it saw; the records are
    then acted on asynchronously (open, write, close), in order."""

    def __init__(
        self,
        boundary: bytes,
        user: users.User,
        defaults: Defaults,
        query_path: str | None,
        metadata: dict[str, str],
    ) -> None:
        self.user = user
        self.defaults = defaults
        self.query_path = query_path
        self.metadata = metadata
        self.records: list[tuple[str, bytes]] = []
        self.ended = False
        self.written: list[dict[str, Any]] = []
        self.writer: FileWriter | None = None
        self.headers: dict[bytes, bytes] = {}
        self.field = bytearray()
        self.value = bytearray()
        self.parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": lambda: self.records.append(("begin", b"")),
                "on_header_field": lambda d, s, e: self.records.append(("field", d[s:e])),
                "on_header_value": lambda d, s, e: self.records.append(("value", d[s:e])),
                "on_header_end": lambda: self.records.append(("header_end", b"")),
                "on_headers_finished": lambda: self.records.append(("headers_done", b"")),
                "on_part_data": lambda d, s, e: self.records.append(("data", d[s:e])),
                "on_part_end": lambda: self.records.append(("part_end", b"")),
                "on_end": lambda: self.records.append(("end", b"")),
            },
        )

    async def run(self, body: AsyncIterator[bytes]) -> list[dict[str, Any]]:
        try:
            async for chunk in body:
                try:
                    self.parser.write(chunk)
                except MultipartParseError as err:
                    raise InvalidArgument(f"malformed multipart body: {err}") from err
                await self._act()
            if not self.ended:
                raise InvalidArgument("multipart body ends before its closing boundary")
        except BaseException:
            if self.writer is not None:
                await self.writer.abort()
            raise
        return self.written

    async def _act(self) -> None:
        records, self.records = self.records, []
        for kind, data in records:
            match kind:
                case "begin":
                    self.headers = {}
                case "field":
                    self.field += data
                case "value":
                    self.value += data
                case "header_end":
                    self.headers[bytes(self.field).strip().lower()] = bytes(self.value).strip()
                    self.field, self.value = bytearray(), bytearray()
                case "headers_done":
                    await self._open_part()
                case "data":
                    if self.writer is not None:
                        await self.writer.write(data)
                case "part_end":
                    await self._close_part()
                case "end":
                    self.ended = True

    async def _open_part(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file":
            return
        target = self.query_path or options.get(b"filename", b"").decode("utf-8", "replace")
        if not target:
            raise InvalidArgument(
                "file part without a destination: give the path query parameter or a filename"
            )
        path = paths.resolve(target, self.user, self.defaults.workdir)
        if any(entry["path"] == path for entry in self.written):
            raise InvalidArgument(
                f"you cannot upload multiple files to the same path '{path}' in one upload request"
            )
        self.writer = await FileWriter.open(self.user, path)

    async def _close_part(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            await writer.set_metadata(self.metadata)
            await writer.close()
        except BaseException:
            await writer.abort()
            raise
        self.written.append(_written(writer.path, self.metadata))
