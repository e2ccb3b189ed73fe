"""Wrenn's error hierarchy. Every error carries a Connect code; servers map it once at the
edge (Connect RPC error, or HTTP status with body ``{"code", "message"}``).

    WrennError                      code            HTTP
    ├── InvalidArgument             invalid_argument      400
    ├── Unauthenticated             unauthenticated       401
    ├── PermissionDenied            permission_denied     403
    ├── NotFound                    not_found             404
    ├── AlreadyExists               already_exists        409
    ├── FailedPrecondition          failed_precondition   400
    ├── ResourceExhausted           resource_exhausted    429
    │   └── StorageExhausted        resource_exhausted    507
    ├── DeadlineExceeded            deadline_exceeded     504
    ├── Unavailable                 unavailable           503
    │   └── BadGateway              unavailable           502
    ├── Unimplemented               unimplemented         501
    ├── Corrupted                   data_loss             500
    └── Internal                    internal              500

``message`` is what a client sees; ``cause`` (chained as ``__cause__``) stays in the logs.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Connect error codes, spelled as on the wire."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"


#: One table from Connect code to HTTP status, as the Connect protocol specifies it.
HTTP_STATUS: dict[Code, int] = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


class WrennError(Exception):
    """Base of every error Wrenn raises on purpose."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_body(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class InvalidArgument(WrennError):
    code = Code.INVALID_ARGUMENT


class Unauthenticated(WrennError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(WrennError):
    code = Code.PERMISSION_DENIED


class NotFound(WrennError):
    code = Code.NOT_FOUND


class AlreadyExists(WrennError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(WrennError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(WrennError):
    code = Code.RESOURCE_EXHAUSTED


class StorageExhausted(ResourceExhausted):
    """No space left: HTTP 507, which the e2b SDK reports as NotEnoughSpaceException."""

    @property
    def http_status(self) -> int:
        return 507


class DeadlineExceeded(WrennError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(WrennError):
    code = Code.UNAVAILABLE


class BadGateway(Unavailable):
    """A proxy reached the sandbox but not the port behind it: HTTP 502, as E2B's proxy
    answers (the SDK reads "port is not open" in the message as SandboxUnreachable)."""

    @property
    def http_status(self) -> int:
        return 502


class Unimplemented(WrennError):
    code = Code.UNIMPLEMENTED


class Corrupted(WrennError):
    """Stored data failed its integrity check (checksum mismatch, truncated or missing file)."""

    code = Code.DATA_LOSS


class Internal(WrennError):
    code = Code.INTERNAL


_BY_CODE: dict[Code, type[WrennError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Unimplemented,
        Corrupted,
        Internal,
    )
}


def from_code(code: Code | str, message: str) -> WrennError:
    """The error class for a code received from a peer (clients map codes back to classes)."""
    try:
        cls = _BY_CODE[Code(code)]
    except (ValueError, KeyError):
        cls = Internal
    return cls(message)


def from_os_error(err: OSError, path: str) -> WrennError:
    """Map a filesystem error on ``path`` to the error a client should see."""
    import errno

    match err.errno:
        case errno.ENOENT:
            return NotFound(f"path not found: {path}")
        case errno.EEXIST:
            return AlreadyExists(f"path already exists: {path}")
        case errno.EACCES | errno.EPERM | errno.EROFS:
            return PermissionDenied(f"permission denied: {path}")
        case errno.ENOTDIR:
            return InvalidArgument(f"path is not a directory: {path}")
        case errno.EISDIR:
            return InvalidArgument(f"path is a directory: {path}")
        case errno.ENOTEMPTY:
            return FailedPrecondition(f"directory not empty: {path}")
        case errno.ENOSPC | errno.EDQUOT:
            return StorageExhausted(f"no space left on device: {path}")
        case errno.ENAMETOOLONG:
            return InvalidArgument(f"path name too long: {path}")
        case errno.ELOOP:
            return InvalidArgument(f"too many levels of symbolic links: {path}")
        case errno.EXDEV:
            return InvalidArgument(f"cannot move across devices: {path}")
        case _:
            return Internal(f"{err.strerror or 'I/O error'}: {path}")
