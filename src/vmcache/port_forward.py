"""``vmcache port-forward``: local TCP listeners whose every connection is a guest port's.

Like ``kubectl port-forward``: each ``[ADDR:]LOCAL_PORT:GUEST_PORT`` listens on ADDR
(127.0.0.1 by default) and turns every accepted connection into one
:meth:`~vmcache.guest_api.GuestAPI.connect_tcp` to the guest port, relayed both ways
with half-closes passed on. The connections go through the guest agent, so they need no
guest network at all (``mode = "none"``). One agent port carries them all.

A connection the guest refuses (nothing listens there) is one line on stderr and the
local connection is closed; the forwarder goes on. The guest is not trusted to make
progress: a connection whose guest side takes none of the bytes waiting for it for
:data:`NO_PROGRESS_TIMEOUT` seconds, or sends nothing for that long after the local side's
EOF, is abandoned (reset in the guest, closed here, one line on stderr), so a guest agent
that stops granting credit or never ends a stream cannot keep tasks and sockets here.
A VM that is gone, or an agent connection that broke, ends the command with that error.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import attrs
import trio

from .errors import GuestConnectError, PortForwardError, VMGoneError, raise_unwrapped
from .guest_api import GuestAPI

#: Bytes moved per read, each way.
CHUNK = 256 * 1024

#: Seconds a forwarded connection may go without progress before it is abandoned: a send
#: to the guest that it takes nothing of (it grants no credit), or, once the local side is
#: at EOF (it half-closed or went away), the guest sending nothing at all. Every chunk the
#: guest sends restarts the second clock, so a long answer after a half-close is fine.
NO_PROGRESS_TIMEOUT = 60.0


@attrs.frozen
class ForwardSpec:
    """One forward: listen on ``address``:``local_port`` (0: any free port), connect to
    ``guest_port`` in the guest."""

    address: str
    local_port: int
    guest_port: int


def _port(text: str, what: str, low: int) -> int:
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise ValueError(f"{what} {text!r} is not a port number ({low} to 65535)")
    return int(text)


def parse_spec(text: str) -> ForwardSpec:
    """``[ADDR:]LOCAL_PORT:GUEST_PORT``, ``PORT`` (the same port both sides) or ``:GUEST_PORT``
    (any free local port); ADDR is an IP address (IPv6 in brackets) or ``localhost``.
    :class:`ValueError` says what is wrong."""
    address = "127.0.0.1"
    rest = text
    if text.startswith("["):
        close = text.find("]:")
        if close < 0:
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets: [::1]:8080:80")
        address, rest = text[1:close], text[close + 2:]
    parts = rest.split(":")
    if len(parts) == 3 and not text.startswith("["):
        address, parts = parts[0], parts[1:]
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not [ADDR:]LOCAL_PORT:GUEST_PORT")
    if address == "localhost":
        address = "127.0.0.1"
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise ValueError(f"{text!r}: {address!r} is not an IP address to listen on") from None
    local = _port(parts[0], "local port", 0) if parts[0] else 0
    return ForwardSpec(address, local, _port(parts[1], "guest port", 1))


def _shown(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def relay(local: trio.SocketStream, remote: trio.abc.HalfCloseableStream, *,
                timeout: float = NO_PROGRESS_TIMEOUT) -> str | None:
    """Relay both ways until both are at EOF; why it broke (one line), or None.

    ``remote`` is the untrusted side: each send to it must finish within ``timeout`` s, and
    once ``local`` is at EOF, ``remote`` must send something (or its EOF) every ``timeout`` s;
    otherwise the relay gives up (the caller then closes ``remote``, abandoning it). Sends to
    ``local`` are not bounded: a local client that stops reading holds only its own
    connection."""
    broken: list[str] = []
    local_eof = False
    quiet = trio.CancelScope()  # around each receive from remote: a deadline once local is at EOF

    async def to_remote(scope: trio.CancelScope) -> None:
        nonlocal local_eof
        try:
            while chunk := await local.receive_some(CHUNK):
                with trio.move_on_after(timeout) as waited:
                    await remote.send_all(chunk)
                if waited.cancelled_caught:
                    broken.append(f"the guest took none of the bytes sent to it for {timeout:g} s")
                    scope.cancel()
                    return
            await remote.send_eof()
            local_eof = True
            quiet.deadline = trio.current_time() + timeout
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            broken.append(str(error) or type(error).__name__)
            scope.cancel()

    async def to_local(scope: trio.CancelScope) -> None:
        nonlocal quiet
        try:
            while True:
                quiet = trio.CancelScope(
                    deadline=trio.current_time() + timeout if local_eof else math.inf)
                with quiet:
                    chunk = await remote.receive_some(CHUNK)
                if quiet.cancelled_caught:
                    broken.append(f"the guest sent nothing for {timeout:g} s after the local "
                                  "side's EOF")
                    scope.cancel()
                    return
                if not chunk:
                    break
                await local.send_all(chunk)
            await local.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            broken.append(str(error) or type(error).__name__)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(to_remote, nursery.cancel_scope)
        nursery.start_soon(to_local, nursery.cancel_scope)
    return broken[0] if broken else None


async def port_forward(
    guest: GuestAPI,
    specs: Sequence[ForwardSpec],
    *,
    guest_host: str = "127.0.0.1",
    on_listening: Callable[[ForwardSpec, int], None] = lambda spec, port: None,
    on_error: Callable[[str], None] = lambda line: None,
    vm_stopped: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for every spec, then forward until cancelled. ``on_listening(spec, port)`` is
    called once per spec when it listens (``port``: the one bound, for a local port 0);
    ``on_error`` gets one line per connection that failed. :class:`PortForwardError` if a
    local address cannot be listened on. When ``vm_stopped()`` returns (the VM is gone), the
    listeners close and :class:`VMGoneError` is raised: a forward never outlives its VM."""
    listeners: list[tuple[ForwardSpec, list[trio.SocketListener]]] = []
    try:
        for spec in specs:
            try:
                found = await trio.open_tcp_listeners(spec.local_port, host=spec.address)
            except OSError as error:
                where = _shown(spec.address, spec.local_port)
                raise PortForwardError(f"port-forward: cannot listen on {where}: "
                                       f"{error.strerror or error}") from None
            listeners.append((spec, found))
        ports = [found[0].socket.getsockname()[1] for _, found in listeners]
        try:
            async with trio.open_nursery() as nursery:
                for (spec, found), port in zip(listeners, ports, strict=True):
                    target = _shown(guest_host, spec.guest_port)
                    where = f"port-forward {_shown(spec.address, port)} -> {target} in the guest"
                    handler = partial(_forward_one, guest, spec.guest_port, guest_host, where, on_error)
                    nursery.start_soon(partial(trio.serve_listeners, handler, found))
                    on_listening(spec, port)
                if vm_stopped is not None:
                    nursery.start_soon(_end_with_vm, vm_stopped)
                task_status.started(ports)
        except BaseExceptionGroup as group:  # the error itself, not the nurseries' groups
            raise_unwrapped(group)
    finally:
        for _, found in listeners:
            for listener in found:
                await trio.aclose_forcefully(listener)


async def _end_with_vm(vm_stopped: Callable[[], Awaitable[object]]) -> None:
    await vm_stopped()
    raise VMGoneError("the VM stopped: port-forward ends (its local ports are closed)")


async def _forward_one(guest: GuestAPI, guest_port: int, guest_host: str, where: str,
                       on_error: Callable[[str], None], local: trio.SocketStream) -> None:
    """One accepted connection: connect in the guest, relay, close both."""
    async with local:
        try:
            remote = await guest.connect_tcp(guest_port, guest_host)
        except GuestConnectError as error:
            on_error(f"{where}: {error}")
            return
        async with remote:
            problem = await relay(local, remote)
        if problem is not None:
            on_error(f"{where}: connection broken: {problem}")
