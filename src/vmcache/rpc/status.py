"""The one table between vmcache errors and gRPC status codes, read both ways.

The daemon answers a handler's error with the status of the first row that names its
class (:func:`status_for`); the client turns a status it receives into that row's
client error (:func:`error_for`), whose message starts the way the row says and whose
``detail`` is the daemon's own message. A new status is one new row here.
"""

from __future__ import annotations

import attrs

from ..errors import (
    BadRequestError,
    CacheError,
    CacheUnavailableError,
    DeadlineExceededError,
    FailedPreconditionError,
    HandOutAbortedError,
    InvalidRequestError,
    NoSuchVMError,
    NotAllowedError,
    NoVMAvailableError,
    PermissionDeniedError,
    QuotaExceededError,
    QuotaReachedError,
    SizeLimitError,
    UnknownVMError,
    VmcacheError,
    VMGoneError,
    WaitExpiredError,
)
from .transport import Code, RpcStatus


@attrs.frozen
class Row:
    """A status code, the daemon's errors answered with it, the client's error for it."""

    code: Code
    daemon: tuple[type[VmcacheError], ...]
    client: type[CacheError]
    #: The client error's message; ``{}`` is the daemon's.
    text: str


TABLE = (
    Row(Code.UNAVAILABLE, (NoVMAvailableError,), CacheUnavailableError,
        "the daemon cannot hand out a VM: {}; ask again once it can (`vmcache status` says why)"),
    Row(Code.DEADLINE_EXCEEDED, (WaitExpiredError,), DeadlineExceededError,
        "no VM ready before the deadline ({}); retry, raise --timeout or enlarge the cache"),
    Row(Code.INVALID_ARGUMENT, (BadRequestError, SizeLimitError), InvalidRequestError,
        "the daemon refused the request: {}"),
    Row(Code.PERMISSION_DENIED, (NotAllowedError,), PermissionDeniedError,
        "the daemon refused this client: {}"),
    Row(Code.RESOURCE_EXHAUSTED, (QuotaReachedError,), QuotaExceededError, "the daemon refused: {}"),
    Row(Code.NOT_FOUND, (NoSuchVMError,), UnknownVMError, "the daemon does not know: {}"),
    # The VM died on its way to the client: asking again helps.
    Row(Code.ABORTED, (VMGoneError,), HandOutAbortedError, "the hand-out was aborted: {}"),
    # Last: any other vmcache error (DaemonError itself, HardwareAccelRequiredError, HandleError...).
    Row(Code.FAILED_PRECONDITION, (VmcacheError,), FailedPreconditionError,
        "the daemon answered FAILED_PRECONDITION: {}"),
)
_BY_CODE = {row.code: row for row in TABLE}


def status_for(error: BaseException) -> RpcStatus:
    """The status a client sees for an error raised by a handler (INTERNAL: not ours, a bug)."""
    for row in TABLE:
        if isinstance(error, row.daemon):
            return RpcStatus(row.code, str(error))
    return RpcStatus(Code.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def error_for(status: RpcStatus) -> CacheError:
    """The client's error for a call that ended with ``status`` (not OK)."""
    message = status.message or status.code.name
    row = _BY_CODE.get(status.code)
    if row is None:
        return CacheError(f"the daemon answered {status.code.name}: {message}", message)
    return row.client(row.text.format(message), message)
