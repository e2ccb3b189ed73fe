"""HTTP/1.1 message heads: parsed by ``httptools`` (llhttp, the parser uvicorn runs), framing
decided as RFC 9112 §6 says, and written back out.

A head is parsed from the bytes up to and including its empty line; the body is never fed to
the parser (it is moved elsewhere, see ``body``). llhttp refuses what invites request smuggling
(Content-Length next to Transfer-Encoding, two different Content-Lengths, bad characters), and
so does this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import httptools

Headers = list[tuple[bytes, bytes]]

#: The most a head may take, request line and headers included (431 beyond it).
MAX_HEAD_BYTES = 64 * 1024
END = b"\r\n\r\n"

#: Headers that describe one hop, never passed on (RFC 9110 §7.6.1). Transfer-Encoding is
#: among them: a relay frames what it sends itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class HeadError(Exception):
    """A head that cannot be relayed; ``status`` is what a server answers (400 or 431)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Framing(enum.Enum):
    """How a message's body is delimited."""

    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    #: A response body that ends when the connection does.
    UNTIL_CLOSE = "until-close"


@dataclass
class _Collected:
    url: bytes = b""
    headers: Headers | None = None
    done: bool = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.headers is not None
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.done = True


def _framing(headers: Headers, *, response: bool) -> tuple[Framing, int]:
    length: int | None = None
    coding: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            length = int(value)  # llhttp has checked the digits and duplicates
        elif name == b"transfer-encoding":
            coding = value if coding is None else coding + b"," + value
    if coding is not None:
        if coding.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
            return Framing.CHUNKED, 0
        if not response:
            raise HeadError("a request's Transfer-Encoding must end with chunked")
        return Framing.UNTIL_CLOSE, 0
    if length is not None:
        return Framing.LENGTH, length
    return (Framing.UNTIL_CLOSE if response else Framing.NONE), 0


def _keep_alive(http_11: bool, headers: Headers) -> bool:
    """Whether the connection stays open after this message (RFC 9112 §9.3)."""
    tokens = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    if b"close" in tokens:
        return False
    return http_11 or b"keep-alive" in tokens


def head_end(buffer: bytearray) -> int:
    """Where the head at the start of ``buffer`` ends (past its empty line), or -1 while it is
    incomplete. Raises ``HeadError(431)`` once an incomplete head is too large."""
    end = buffer.find(END, 0, MAX_HEAD_BYTES + len(END))
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HeadError("request head too large", 431)
        return -1
    return end + len(END)


@dataclass
class RequestHead:
    method: bytes
    #: The request-target as sent (path and query, still percent-encoded).
    target: bytes
    #: Names lower-cased, in order, duplicates kept.
    headers: Headers
    http_11: bool
    keep_alive: bool
    upgrade: bool
    framing: Framing
    #: The body's length when ``framing`` is LENGTH.
    length: int

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def expects_continue(self) -> bool:
        value = self.header(b"expect")
        return value is not None and value.lower() == b"100-continue"


def parse_request(raw: bytes | bytearray) -> RequestHead:
    """The head in ``raw`` (exactly one head, ending with its empty line)."""
    collected = _Collected(headers=[])
    parser = httptools.HttpRequestParser(collected)
    upgrade = False
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError as err:
        raise HeadError(f"malformed request head: {err}") from err
    if not collected.done:
        raise HeadError("malformed request head: incomplete")
    assert collected.headers is not None
    framing, length = _framing(collected.headers, response=False)
    http_11 = parser.get_http_version() == "1.1"
    return RequestHead(
        method=parser.get_method(),
        target=collected.url,
        headers=collected.headers,
        http_11=http_11,
        keep_alive=_keep_alive(http_11, collected.headers),
        upgrade=upgrade or parser.should_upgrade(),
        framing=framing,
        length=length,
    )


@dataclass
class ResponseHead:
    status: int
    reason: bytes
    headers: Headers
    keep_alive: bool
    framing: Framing
    length: int

    @property
    def interim(self) -> bool:
        """An informational answer (100 Continue, 103 Early Hints): the final one follows."""
        return 100 <= self.status < 200


def parse_response(raw: bytes | bytearray, *, request_method: bytes) -> ResponseHead:
    """The head in ``raw``, answering a ``request_method`` request."""
    collected = _Collected(headers=[])
    parser = httptools.HttpResponseParser(collected)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # a 101: its framing does not matter, it is refused as a head
    except httptools.HttpParserError as err:
        raise HeadError(f"malformed response head: {err}") from err
    if not collected.done:
        raise HeadError("malformed response head: incomplete")
    assert collected.headers is not None
    status = parser.get_status_code()
    line = bytes(raw[: raw.find(b"\r\n")])
    reason = line.split(b" ", 2)[2] if line.count(b" ") >= 2 else b""
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        framing, length = Framing.NONE, 0
    else:
        framing, length = _framing(collected.headers, response=True)
    return ResponseHead(
        status=status,
        reason=reason,
        headers=collected.headers,
        keep_alive=_keep_alive(parser.get_http_version() == "1.1", collected.headers),
        framing=framing,
        length=length,
    )


def framing_headers(framing: Framing, length: int) -> bytes:
    """The header line that frames a body sent as ``framing``."""
    if framing is Framing.LENGTH:
        return b"content-length: %d\r\n" % length
    if framing is Framing.CHUNKED:
        return b"transfer-encoding: chunked\r\n"
    return b""


def render_request(method: bytes, target: bytes, headers: Headers, framing: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
    lines.append(framing)
    lines.append(b"\r\n")
    return b"".join(lines)


def render_response(status: int, reason: bytes, headers: Headers, extra: bytes = b"") -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
    lines.append(extra)
    lines.append(b"\r\n")
    return b"".join(lines)
