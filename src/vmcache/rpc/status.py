"""The one table between vmcache errors and gRPC status codes, read both ways.

The daemon answers a handler's error with the status of the first row that names its
class (:func:`status_for`); the client turns a status it receives into that row's
client error (:func:`error_for`), whose message starts the way the row says and whose
``detail`` is the daemon's own message. A new status is one new row here.
"""

from __future__ import annotations

import attrs

from .. import errors as e
from .transport import Code, RpcStatus


@attrs.frozen
class Row:
    """A status code, the daemon's errors answered with it, the client's error for it."""

    code: Code
    daemon: tuple[type[e.VmcacheError], ...]
    client: type[e.CacheError]
    #: The client error's message; ``{}`` is the daemon's.
    text: str


TABLE = (
    Row(Code.UNAVAILABLE, (e.NoVMAvailableError,), e.CacheUnavailableError,
        "the daemon cannot hand out a VM: {}; ask again once it can (`vmcache status` says why)"),
    Row(Code.DEADLINE_EXCEEDED, (e.WaitExpiredError,), e.DeadlineExceededError,
        "no VM ready before the deadline ({}); retry, raise --timeout or enlarge the cache"),
    Row(Code.INVALID_ARGUMENT, (e.BadRequestError, e.SizeLimitError), e.InvalidRequestError,
        "the daemon refused the request: {}"),
    Row(Code.PERMISSION_DENIED, (e.NotAllowedError,), e.PermissionDeniedError,
        "the daemon refused this client: {}"),
    Row(Code.RESOURCE_EXHAUSTED, (e.QuotaReachedError,), e.QuotaExceededError, "the daemon refused: {}"),
    Row(Code.NOT_FOUND, (e.NoSuchVMError,), e.UnknownVMError, "the daemon does not know: {}"),
    # The VM died on its way to the client: asking again helps.
    Row(Code.ABORTED, (e.VMGoneError,), e.HandOutAbortedError, "the hand-out was aborted: {}"),
    # Last: any other vmcache error (DaemonError itself, HardwareAccelRequiredError, HandleError...).
    Row(Code.FAILED_PRECONDITION, (e.VmcacheError,), e.FailedPreconditionError,
        "the daemon answered FAILED_PRECONDITION: {}"),
)
_BY_CODE = {row.code: row for row in TABLE}


def status_for(error: BaseException) -> RpcStatus:
    """The status a client sees for an error raised by a handler (INTERNAL: not ours, a bug)."""
    for row in TABLE:
        if isinstance(error, row.daemon):
            return RpcStatus(row.code, str(error))
    return RpcStatus(Code.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def error_for(status: RpcStatus) -> e.CacheError:
    """The client's error for a call that ended with ``status`` (not OK)."""
    message = status.message or status.code.name
    row = _BY_CODE.get(status.code)
    if row is None:
        return e.CacheError(f"the daemon answered {status.code.name}: {message}", message)
    return row.client(row.text.format(message), message)
