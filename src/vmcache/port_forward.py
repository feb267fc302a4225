"""``vmcache port-forward``: local TCP listeners whose every connection is a guest port's.

Like ``kubectl port-forward``: each ``[ADDR:]LOCAL_PORT:GUEST_PORT`` listens on ADDR
(127.0.0.1 by default) and turns every accepted connection into one
:meth:`~vmcache.guest_api.GuestAPI.connect_tcp` to the guest port, relayed both ways
with half-closes passed on. The connections go through the guest agent, so they need no
guest network at all (``mode = "none"``). One agent port carries them all.

A connection the guest refuses (nothing listens there) is one line on stderr and the
local connection is closed; the forwarder goes on. A VM that is gone, or an agent
connection that broke, ends the command with that error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import attrs
import trio

from .errors import GuestConnectError, PortForwardError, VMGoneError, raise_unwrapped
from .guest_api import GuestAPI

#: Bytes moved per read, each way.
CHUNK = 256 * 1024


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


async def _pump(source: trio.abc.ReceiveStream, sink: trio.abc.HalfCloseableStream) -> None:
    """Bytes from ``source`` to ``sink`` until EOF, which is passed on as ``sink``'s EOF."""
    while chunk := await source.receive_some(CHUNK):
        await sink.send_all(chunk)
    await sink.send_eof()


async def relay(local: trio.SocketStream, remote: trio.abc.HalfCloseableStream) -> str | None:
    """Relay both ways until both are at EOF; why it broke (one line), or None."""
    broken: list[str] = []

    async def pump(source: trio.abc.ReceiveStream, sink: trio.abc.HalfCloseableStream,
                   scope: trio.CancelScope) -> None:
        try:
            await _pump(source, sink)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            broken.append(str(error) or type(error).__name__)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, local, remote, nursery.cancel_scope)
        nursery.start_soon(pump, remote, local, nursery.cancel_scope)
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
