"""Acting inside another process's network namespace: sockets made there, nftables and iproute2 run there.

The egress enforcement of a VM lives in QEMU's own network namespace (the bwrap one, reached as
``/proc/QEMU_PID/ns/net``), which has only ``lo`` and the VM's tap. The daemon stays in the host's
namespace; it reaches into the VM's in two ways:

- a socket made by a thread that has ``setns()``-ed into the namespace belongs to that namespace
  for its whole life, whatever thread then uses it. :func:`run_in_netns` runs a function in a
  worker thread that joins the namespace and *always* goes back to its own before the thread is
  returned to trio's thread cache (a cached thread left in a VM's namespace would make the next
  unrelated ``getaddrinfo`` or socket of the daemon there);
- ``nft`` and ``ip`` run under ``nsenter --net=/proc/self/fd/N`` with the namespace passed as an
  inherited descriptor, through :func:`trio.run_process` with a timeout.

A namespace is given as a path (``/proc/PID/ns/net``, ``/run/netns/NAME``) or an open descriptor;
:class:`Netns` holds its own descriptor, which also keeps the namespace alive while we use it, so
a test's namespace works exactly like QEMU's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
from collections.abc import Callable
from typing import TypeVar

import trio

from vmcache.errors import NetworkSetupError

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15  # linux/in.h; not in Python's socket module
#: Bound on every ``nft`` / ``ip`` run inside a namespace.
COMMAND_TIMEOUT = 10.0
#: Bound on what such a command may print (it is quoted in errors).
_OUTPUT_LIMIT = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int

def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Netns:
    """An open reference to one network namespace (our own duplicate descriptor).

    ``Netns(path)`` opens the path; ``Netns(fd)`` duplicates the descriptor (the caller keeps
    its own). Close it with :meth:`close` (or ``with``): until then the namespace cannot go away
    under us, even when its last process exits.
    """

    def __init__(self, ref: int | str | os.PathLike[str]) -> None:
        try:
            if isinstance(ref, int):
                self._fd = os.dup(ref)
                self.name = f"fd {ref}"
            else:
                self._fd = os.open(ref, os.O_RDONLY | os.O_CLOEXEC)
                self.name = os.fspath(ref)
        except OSError as exc:
            raise NetworkSetupError(
                f"cannot open the network namespace {ref!r}: {exc.strerror}; "
                "is the process still running (and are we root)?"
            ) from exc

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise NetworkSetupError(f"the network namespace {self.name} was already closed (a vmcache bug)")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def as_netns(ref: Netns | int | str | os.PathLike[str]) -> tuple[Netns, bool]:
    """``(netns, owned)``: ``ref`` itself if it is a :class:`Netns`, else a new one we must close."""
    if isinstance(ref, Netns):
        return ref, False
    return Netns(ref), True


def _in_netns_sync(fd: int, fn: Callable[[], T]) -> T:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
        try:
            return fn()
        finally:
            try:
                _setns(own)
            except OSError:
                # Going back to a namespace we hold a descriptor of, as root, cannot fail; if it
                # did, this thread would go back to trio's cache inside a VM's namespace and the
                # daemon's next socket made there would be the guest's. Fail closed, loudly.
                log.critical("could not return a worker thread to its own network namespace; aborting")
                os.abort()
    finally:
        os.close(own)


async def run_in_netns(netns: Netns, fn: Callable[[], T]) -> T:
    """``fn()`` run in a worker thread that is inside ``netns`` for the call (and only for it).

    For short calls that make sockets: a socket keeps the namespace it was made in. Not
    cancellable once started (the thread must get back to its own namespace first).
    """
    fd = netns.fd
    return await trio.to_thread.run_sync(_in_netns_sync, fd, fn)


def _make_socket(kind: int, address: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # IP_FREEBIND: the address may be on an interface that is not up yet (a tap whose QEMU
        # has not started the NIC); the socket must exist before the ruleset points at it.
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


async def socket_in_netns(netns: Netns, kind: int, address: str, port: int = 0,
                          *, backlog: int = 128) -> trio.socket.SocketType:
    """A bound IPv4 socket made inside ``netns`` (a listening one for ``SOCK_STREAM``)."""
    try:
        sock = await run_in_netns(netns, lambda: _make_socket(kind, address, port, backlog))
    except OSError as exc:
        raise NetworkSetupError(
            f"cannot open a socket on {address}:{port} in the network namespace {netns.name}: "
            f"{exc.strerror or exc}"
        ) from exc
    return trio.socket.from_stdlib_socket(sock)


async def run_in_netns_command(netns: Netns, argv: list[str], *, stdin: bytes = b"",
                               timeout: float = COMMAND_TIMEOUT) -> None:
    """Run ``argv`` (``nft``, ``ip``...) inside ``netns`` through ``nsenter``, bounded by ``timeout``.

    Raises :class:`NetworkSetupError` quoting the command's output if it fails or times out.
    """
    fd = netns.fd
    full = ["nsenter", f"--net=/proc/self/fd/{fd}", "--", *argv]
    try:
        with trio.fail_after(timeout):
            result = await trio.run_process(
                full, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
                pass_fds=(fd,),
            )
    except trio.TooSlowError:
        raise NetworkSetupError(
            f"{' '.join(argv[:2])} in the network namespace {netns.name} did not finish in {timeout:g} s"
        ) from None
    except OSError as exc:
        raise NetworkSetupError(
            f"cannot run {argv[0]}: {exc.strerror or exc}; install nftables, iproute2 and util-linux"
        ) from exc
    if result.returncode != 0:
        output = (result.stderr or b"")[-_OUTPUT_LIMIT:].decode(errors="replace").strip()
        raise NetworkSetupError(
            f"{' '.join(argv[:3])} failed in the network namespace {netns.name} "
            f"(exit {result.returncode}): {output}"
        )


async def apply_nft(netns: Netns, ruleset: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
    """Load ``ruleset`` (``nft -f`` text; atomic: all of it or none) inside ``netns``."""
    await run_in_netns_command(netns, ["nft", "-f", "-"], stdin=ruleset.encode(), timeout=timeout)


async def list_nft(netns: Netns, *, timeout: float = COMMAND_TIMEOUT) -> str:
    """The ruleset now loaded in ``netns`` (``nft list ruleset``), for tests and diagnostics."""
    fd = netns.fd
    with trio.fail_after(timeout):
        result = await trio.run_process(
            ["nsenter", f"--net=/proc/self/fd/{fd}", "--", "nft", "list", "ruleset"],
            capture_stdout=True, capture_stderr=True, check=False, pass_fds=(fd,),
        )
    if result.returncode != 0:
        output = result.stderr[-_OUTPUT_LIMIT:].decode(errors="replace")
        raise NetworkSetupError(f"nft list ruleset failed in {netns.name}: {output}")
    return result.stdout.decode(errors="replace")


async def configure_interface(netns: Netns, interface: str, address: str, *,
                              timeout: float = COMMAND_TIMEOUT) -> None:
    """Give ``interface`` in ``netns`` the address ``address`` (``10.0.2.2/24``; idempotent) and
    bring it and ``lo`` up."""
    await run_in_netns_command(netns, ["ip", "link", "set", "dev", "lo", "up"], timeout=timeout)
    await run_in_netns_command(netns, ["ip", "addr", "replace", address, "dev", interface], timeout=timeout)
    await run_in_netns_command(netns, ["ip", "link", "set", "dev", interface, "up"], timeout=timeout)


__all__ = [
    "COMMAND_TIMEOUT",
    "Netns",
    "apply_nft",
    "as_netns",
    "configure_interface",
    "list_nft",
    "run_in_netns",
    "run_in_netns_command",
    "socket_in_netns",
]
