"""The one error tree of vmcache.

Every error the package raises on purpose is a :class:`VmcacheError`. Each one
carries a message that says what went wrong *and what to do about it*, and an
``exit_status`` the CLI uses, so that the command line can print one line on
stderr and exit without a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import trio


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with every character that is not printable escaped (``\\x1b``, ``\\x9b``,
    ``\\u202e``...): ESC, CR, BEL, C1 controls, bidirectional overrides, and newlines
    unless ``newlines``.

    For guest-supplied text (console lines, the agent's error messages, a command's last
    stderr line) that vmcache puts into its own messages and logs: a guest must not be
    able to move the user's cursor, retitle their terminal or fake a line of ours. A
    backslash is left alone, so that escaping twice changes nothing. A command's own
    output is never passed through this: it stays byte-exact.
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or (newlines and char == "\n"):
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class VmcacheError(Exception):
    """Root of every error vmcache raises on purpose."""

    #: Exit status the CLI uses for this error.
    exit_status: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(VmcacheError):
    """The configuration is invalid: fix the file or option named in the message."""

    exit_status = 2


class NetworkPolicyError(VmcacheError):
    """A network policy or allowlist entry that is not valid (the message names it and says
    why): fix the entry (``--allow``, ``network=``, the config's ``allow``/``permit``)."""

    exit_status = 2


class ImageError(VmcacheError):
    """The guest image could not be built or is missing: the message says what to install or pass."""

    exit_status = 2


class VMError(VmcacheError):
    """Something went wrong with one QEMU VM."""


class NetworkSetupError(VMError):
    """The guest network of a VM could not be set up or torn down (its namespace, ruleset or
    sockets, or the guest did not configure its NIC): the VM is not handed out with a network
    and is discarded; ask for another. The message quotes the failing step; check that
    nftables, iproute2 and util-linux are installed and the daemon runs as root."""


class BootError(VMError):
    """A VM did not become ready. The message quotes the guest's last console lines."""


class HardwareAccelRequiredError(VmcacheError):
    """``require_hardware_accel`` is on and VMs here would run on TCG (full emulation, which
    QEMU does not support as a security boundary): no VM is booted or handed out. The message
    says why KVM is not used and what to do. A daemon answers FAILED_PRECONDITION: retrying
    does not help until the host or the config is fixed."""

    exit_status = 2


class VMGoneError(VMError):
    """The VM is no longer running (it was stopped, or it died)."""


class QMPError(VMError):
    """QEMU's monitor (QMP) failed or answered with an error."""


class QMPProtocolError(QMPError):
    """QEMU's monitor sent something that is not QMP. Usually a bug or a wrong socket."""


class ResizeError(VMError):
    """A VM could not be grown: QEMU refused a hot-add, or the guest did not bring the added
    vCPUs or memory online in time (the message says which). The VM is best stopped."""


class SizeLimitError(ResizeError):
    """The size asked for is below the VM's current size or above its configured maxima
    (``default_maxvcpus``, ``default_maxmemory``): the message names the limit. Nothing was
    changed; the VM is fine. A daemon answers INVALID_ARGUMENT."""


class AgentError(VMError):
    """The guest agent failed, or the connection to it broke."""


class VMDiedError(AgentError, VMGoneError):
    """The VM died under a call to its agent; the message quotes why (a panic, the OOM killer)."""


class AgentProtocolError(AgentError):
    """The guest agent sent something that is not the agent protocol."""


class GuestRequestError(AgentError):
    """The guest agent could not do what was asked (a file it cannot read, a bad working
    directory, a failed ioctl); the message says why. The connection stays usable."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        #: The guest's errno, when the failure was a system call's.
        self.errno = errno


class GuestConnectError(GuestRequestError):
    """A TCP connection to a port inside the guest (``connect_tcp``, ``vmcache port-forward``)
    could not be made: the message says why (a timeout, an address the guest does not have, a
    guest agent too old to connect: rebuild the image). The agent's connection stays usable."""


class GuestPortRefusedError(GuestConnectError):
    """Nothing listens on that port in the guest (the connection was refused): start the server
    in the guest first (listening on the address asked for, 127.0.0.1 by default), or check the port."""


class GuestConnectionBrokenError(VMError, trio.BrokenResourceError):
    """A TCP connection inside the guest broke while in use (its peer in the guest reset it, or
    stopped reading): the message says which. A ``trio.BrokenResourceError`` too, as a broken
    socket's stream raises; the agent's connection stays usable: connect again."""


class GuestOutputLimitError(VMError):
    """A guest command printed, or a guest file held, more than the call's limit (``max_output``
    of ``run()``, ``max_size`` of ``read_file()``; 64 MiB by default): the command was killed, the
    read stopped. Read it as a stream (``open_process()``, ``open_file()``) or pass a larger limit."""


class GuestProcessError(VmcacheError):
    """A command run with ``check=True`` exited with a non-zero status (or was killed).

    Like :class:`subprocess.CalledProcessError`, it carries what the command left.
    """

    def __init__(self, args: list[str | bytes], returncode: int, stdout: bytes | None,
                 stderr: bytes | None, timed_out: bool = False) -> None:
        if timed_out:
            how = "was killed by its timeout"
        elif returncode < 0:
            how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
        command = " ".join(arg if isinstance(arg, str) else arg.decode("utf-8", "replace") for arg in args)
        message = f"guest command {command!r} {how}"
        last = (stderr or b"").decode("utf-8", "replace").strip().splitlines()
        if last:
            message += f": {printable(last[-1][:200])}"
        super().__init__(message)
        self.cmd = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out


class CacheError(VmcacheError):
    """Talking to the cache daemon failed. Raised in the client: what the daemon raises is a
    :class:`DaemonError`, which reaches the client as a gRPC status (:mod:`vmcache.rpc.status`)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        #: The daemon's own message, for an error that is a status it answered; else ``message``.
        self.detail = detail or message


class DaemonNotRunningError(CacheError):
    """No daemon answers at the endpoint: start one with ``vmcache serve``."""


class CacheUnavailableError(CacheError):
    """The daemon cannot hand out a VM now (shutting down, or boots keep failing)."""


class DeadlineExceededError(CacheError):
    """No VM became ready before the deadline. Retry, raise --timeout or enlarge the cache."""


class EndpointInUseError(CacheError):
    """Another live daemon already serves this socket."""

    exit_status = 2


class InvalidRequestError(CacheError):
    """The daemon refused a request as invalid (a size beyond the limits, a bad TTL...)."""

    exit_status = 2


class PermissionDeniedError(CacheError):
    """The daemon does not admit this user: ask for its ``socket_group``."""


class FailedPreconditionError(CacheError):
    """The daemon answered FAILED_PRECONDITION: :attr:`detail` is its own message."""


class UnknownVMError(CacheError):
    """The daemon holds no VM of that id (gone, or never its own): NOT_FOUND."""


class QuotaExceededError(CacheError):
    """This user already holds as many VMs as the daemon allows one user
    (``factory.max_vms_per_uid``): stop one first. RESOURCE_EXHAUSTED."""


class HandOutAbortedError(CacheError):
    """The VM died on its way to the client (between offer and claim); asking again helps."""


class LeaseLostError(CacheError):
    """A leased VM ended before its lease did (it died, its TTL passed, or the daemon went away)."""


class DaemonError(VmcacheError):
    """Raised in the daemon only: a call it refuses or cannot serve. The rpc server answers
    it with the gRPC status :mod:`vmcache.rpc.status` gives its class (FAILED_PRECONDITION
    for this class itself), and the client raises that status's :class:`CacheError`."""


class NoVMAvailableError(DaemonError):
    """No VM can be handed out now: the daemon is shutting down, or boots keep failing (the
    message quotes the last failure). UNAVAILABLE; the client's CacheUnavailableError."""


class WaitExpiredError(DaemonError):
    """No VM became ready within the wait the client allowed: wait longer or enlarge the
    cache. DEADLINE_EXCEEDED."""


class BadRequestError(DaemonError):
    """A request the daemon cannot serve as asked (a size beyond the limits, a bad TTL, a
    message that is not the protocol's). INVALID_ARGUMENT; the client's InvalidRequestError."""


class NotAllowedError(DaemonError):
    """The caller may not do this (Quit, or another user's VM): the message says who may.
    PERMISSION_DENIED."""


class QuotaReachedError(DaemonError):
    """The caller's uid holds ``factory.max_vms_per_uid`` VMs already: stop one first.
    RESOURCE_EXHAUSTED."""


class NoSuchVMError(DaemonError):
    """The daemon holds no VM of that id (stopped already, or never its): the handle's holder
    may stop it without the daemon. NOT_FOUND; the client's UnknownVMError."""


class HandleError(VmcacheError):
    """A VM handle that does not describe a VM of ours: it is not acted on."""


class PortForwardError(VmcacheError):
    """``vmcache port-forward`` cannot listen on a local address (a port in use, an address this
    host does not have): the message names it. Pick another local port, or 0 for any free one."""


class LocalOutputError(VmcacheError):
    """A guest command's output could not be written here (a full disk, a terminal that went
    away); the command was stopped. The message names the stream and the system's reason."""


class LifecycleError(VmcacheError):
    """A VM was moved to a phase its lifecycle does not allow from where it is (see
    vmcache.lifecycle): a bug in vmcache, caught at the move; report it with the log."""


class DependencyError(VmcacheError):
    """An installed package is at a version vmcache cannot run with (the message names the
    package, the version needed and the one found): install the one it names, and keep
    packages that need another version (E2B's SDK and its h2) in an environment of their own."""


#: The h2 purerpc 0.8.0 (vmcache's gRPC) runs with: h2 4 removed events it uses.
H2_NEEDED = "h2 >= 3.1, < 4"


def check_h2() -> None:
    """Raise :class:`DependencyError` (one line) if the installed h2 is not one purerpc runs
    with. Called before purerpc is imported (``vmcache serve``, ``vmcache.serve``): with h2 4,
    which E2B's SDK pulls in, importing it fails with an AttributeError that says nothing of
    the cause."""
    from importlib import metadata

    try:
        found = metadata.version("h2")
    except metadata.PackageNotFoundError:
        return  # the import that needs it says so
    major = found.split(".", 1)[0]
    if not major.isdigit() or int(major) >= 4:
        raise DependencyError(
            f"vmcache needs {H2_NEEDED} (for purerpc 0.8.0) and found h2 {found} in "
            f"{sys.prefix}: run pip install 'h2<4' there, and keep the e2b SDK (which needs "
            "h2 >= 4) in a venv of its own")


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions in ``error`` that are not groups, through every level of nesting, in
    order (``[error]`` for an exception that is not a group)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What the caller of a context manager that owns a nursery sees for ``group``, the
    nursery's error, so that users see their own exceptions, not groups (the model is
    trio-websocket's ``open_websocket``). Decided on the group's leaves (:func:`leaves`):

    - a KeyboardInterrupt among them wins (the first): Ctrl-C must stay catchable as itself;
    - Cancelled leaves are dropped when there is anything else (the cancel scope that would
      catch them would let the other error through anyway); a group of Cancelled only is its
      first Cancelled (whichever scope was cancelled catches any Cancelled instance);
    - leaves of one type with one message are one error (a broken connection fails every
      task waiting on it with the same error);
    - then one error left is that error; several stay a group (``group`` without its
      Cancelled): choosing one would hide the others, and ``except*`` still sorts them.

    ``except BaseExceptionGroup as group: raise_unwrapped(group)`` raises it.
    """
    found = leaves(group)
    interrupts = [leaf for leaf in found if isinstance(leaf, KeyboardInterrupt)]
    if interrupts:
        return interrupts[0]
    rest = [leaf for leaf in found if not isinstance(leaf, trio.Cancelled)]
    if not rest:
        return found[0]
    if all(type(leaf) is type(rest[0]) and str(leaf) == str(rest[0]) for leaf in rest):
        return rest[0]
    if len(rest) == len(found):
        return group
    _cancelled, without_cancelled = group.split(trio.Cancelled)
    assert without_cancelled is not None  # rest is not empty
    return without_cancelled


def raise_unwrapped(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the exception :func:`unwrap_group` picks for ``group`` (``group`` itself,
    unchanged, if it stays a group). The exception keeps its own ``__cause__`` and
    ``__context__``; one that has no ``__context__`` gets ``group`` there, with
    ``__suppress_context__`` set: a traceback then tells the exception's own story once
    (the group holds it too), and the nursery's frames stay reachable."""
    single = unwrap_group(group)
    if single is group:
        raise group
    context, cause, suppress = single.__context__, single.__cause__, single.__suppress_context__
    if context is None:
        context, suppress = group, True
    try:
        raise single
    finally:
        # raise sets __context__ to the group being handled: put back what was decided
        single.__context__, single.__cause__, single.__suppress_context__ = context, cause, suppress
        del single, context, cause
