"""envd's ``process.Process`` service on the host, carried to the guest agent.

A process belongs to its sandbox, not to the stream that started it (as in envd: a client
that goes away leaves its command running; the SDK's background commands keep the pid and
kill it later). Each sandbox has one :class:`ProcessTable` (``sandbox.service``): a task of
the sandbox (``sandbox.start_soon``) owns each guest process, reads its output as fast as
the guest sends it and fans every chunk out to the streams subscribed at that moment
(Start's own stream, then any Connect). Output nobody is subscribed to is dropped, as envd
drops it. Each subscriber has a bounded queue (:data:`SUBSCRIBER_EVENTS` events of at most
:data:`CHUNK` bytes): one that falls that far behind is cut off, its stream ending with
``data_loss`` (the command runs on; ``commands.connect(pid)`` reattaches), so a slow or
vanished client never holds up the process or other clients.

The end is envd's: ``exitCode`` (-1 for a signal), ``exited``, ``status`` and ``error`` in
Go's words (``exit status 1``, ``signal: killed``), and it is kept for
:data:`RETAIN_SECONDS` after the exit so that a late Connect still learns it. A Start's
``Connect-Timeout-Ms`` is the command's lifetime, as envd's: the guest kills the process
group when it passes, and the stream ends with ``deadline_exceeded``. Streams send a
keepalive event after ``Keepalive-Ping-Interval`` seconds (envd's default: 90) without one.
"""

from __future__ import annotations

import logging
import math
import signal as signals
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from vmcache import e2b_message as m
from vmcache.agent_client import GuestProcess, PtySize
from vmcache.e2b_connect import CallContext, Code, ConnectError
from vmcache.e2b_users import as_user
from vmcache.errors import AgentError, GuestRequestError, printable

if TYPE_CHECKING:
    from vmcache.e2b_sandbox import SandboxRuntime

log = logging.getLogger(__name__)

#: Largest output chunk read from the guest and sent as one event (envd's pipe chunk size).
CHUNK = 32 * 1024
#: Events a subscriber may fall behind before it is cut off (so at most about 8 MiB queued).
SUBSCRIBER_EVENTS = 256
#: How long an ended process's exit stays known to Connect (envd's retention).
RETAIN_SECONDS = 30.0
#: At most this many ended processes are remembered at once (the oldest is forgotten first).
MAX_RETAINED = 1024
#: envd's keepalive interval when the request has no ``Keepalive-Ping-Interval``.
DEFAULT_KEEPALIVE = 90.0
#: How long starting a process in the guest may take before the call fails.
START_TIMEOUT = 60.0
#: Most streams following one process at once (Start's and Connects).
MAX_SUBSCRIBERS = 32
#: Largest SendInput payload.
MAX_INPUT = 16 * 1024 * 1024
#: Largest PTY dimension accepted.
MAX_PTY_SIZE = 10_000

SIGNALS = {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9}
#: Go's names for signals, as envd's ``status`` and ``error`` spell them.
GO_SIGNAL_NAMES = {
    1: "hangup", 2: "interrupt", 3: "quit", 4: "illegal instruction", 5: "trace/breakpoint trap",
    6: "aborted", 7: "bus error", 8: "floating point exception", 9: "killed",
    10: "user defined signal 1", 11: "segmentation fault", 12: "user defined signal 2",
    13: "broken pipe", 14: "alarm clock", 15: "terminated",
}


def end_event(returncode: int) -> dict[str, Any]:
    """envd's EndEvent for a guest returncode (negative: killed by that signal)."""
    if returncode >= 0:
        status = f"exit status {returncode}"
        event: dict[str, Any] = {"exitCode": returncode, "exited": True, "status": status}
        if returncode != 0:
            event["error"] = status
        return event
    name = GO_SIGNAL_NAMES.get(-returncode, f"signal {-returncode}")
    return {"exitCode": -1, "exited": False, "status": f"signal: {name}", "error": f"signal: {name}"}


@attrs.define(eq=False)
class Subscriber:
    """One stream's view of a process: a bounded queue of ProcessEvents."""

    send: trio.MemorySendChannel[dict[str, Any]]
    receive: trio.MemoryReceiveChannel[dict[str, Any]]
    dropped: bool = False


@attrs.define(eq=False)
class Proc:
    """A process of the table, from its Start until its end."""

    config: dict[str, Any]
    tag: str | None
    pty: bool
    stdin: bool
    pid: int = 0
    process: GuestProcess | None = None
    started: trio.Event = attrs.Factory(trio.Event)
    start_error: ConnectError | None = None
    end: dict[str, Any] | None = None
    ended: trio.Event = attrs.Factory(trio.Event)
    subscribers: set[Subscriber] = attrs.Factory(set)
    stdin_lock: trio.Lock = attrs.Factory(trio.Lock)
    stdin_closed: bool = False

    def subscribe(self) -> Subscriber:
        send, receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIBER_EVENTS)
        subscriber = Subscriber(send, receive)
        if self.end is not None:
            send.send_nowait({"end": self.end})
            send.close()
        else:
            self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        subscriber.send.close()
        subscriber.receive.close()

    def publish(self, event: dict[str, Any]) -> None:
        for subscriber in list(self.subscribers):
            try:
                subscriber.send.send_nowait(event)
            except trio.WouldBlock:
                subscriber.dropped = True
                self.subscribers.discard(subscriber)
                subscriber.send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.discard(subscriber)

    def close_all(self) -> None:
        for subscriber in list(self.subscribers):
            subscriber.send.close()
        self.subscribers.clear()


@attrs.define
class _Retained:
    pid: int
    tag: str | None
    end: dict[str, Any]
    expiry: float


class ProcessTable:
    """The processes of one sandbox (``context.sandbox.service(ProcessTable)``)."""

    def __init__(self, sandbox: SandboxRuntime) -> None:
        self._sandbox = sandbox
        self._live: dict[int, Proc] = {}
        self._retained: dict[int, _Retained] = {}

    # --- Lookup ---------------------------------------------------------------------------

    def live(self) -> list[Proc]:
        return list(self._live.values())

    def find(self, selector: Mapping[str, Any], field: str = "process") -> Proc:
        """The live process a ProcessSelector names; envd's NOT_FOUND / UNIMPLEMENTED otherwise."""
        if m.has(selector, "pid"):
            pid = m.get_int(selector, "pid", f"{field}.pid")
            proc = self._live.get(pid)
            if proc is None:
                raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
            return proc
        if m.has(selector, "tag"):
            tag = m.get_str(selector, "tag", f"{field}.tag")
            for proc in self._live.values():
                if proc.tag == tag:
                    return proc
            raise ConnectError(Code.NOT_FOUND, f"process with tag {tag} not found")
        raise ConnectError(Code.UNIMPLEMENTED, f"invalid input type: {field} selects no process")

    def retained(self, selector: Mapping[str, Any]) -> _Retained | None:
        self._prune()
        if m.has(selector, "pid"):
            return self._retained.get(m.get_int(selector, "pid", "process.pid"))
        if m.has(selector, "tag"):
            tag = m.get_str(selector, "tag", "process.tag")
            return next((kept for kept in self._retained.values() if kept.tag == tag), None)
        return None

    def _prune(self) -> None:
        now = trio.current_time()
        for pid in [pid for pid, kept in self._retained.items() if kept.expiry <= now]:
            del self._retained[pid]

    def _retain(self, proc: Proc) -> None:
        assert proc.end is not None
        self._prune()
        while len(self._retained) >= MAX_RETAINED:
            del self._retained[next(iter(self._retained))]
        self._retained[proc.pid] = _Retained(proc.pid, proc.tag, proc.end,
                                             trio.current_time() + RETAIN_SECONDS)

    # --- Starting and running -------------------------------------------------------------

    async def start(self, request: Mapping[str, Any], context: CallContext) -> tuple[Proc, Subscriber]:
        """Start the StartRequest's process in a task of the sandbox; its subscriber for the
        Start stream is attached before the process can print anything."""
        config = m.get_message(request, "process")
        cmd = m.get_str(config, "cmd", "process.cmd")
        if not cmd:
            raise m.invalid("process.cmd", "empty")
        raw_args = config.get("args") or []
        if not isinstance(raw_args, list) or len(raw_args) > 4096:
            raise m.invalid("process.args", "not a list of at most 4096 strings")
        args = [m.get_str({"a": arg}, "a", "process.args[]") for arg in raw_args]
        envs = m.get_str_map(config, "envs", "process.envs")
        cwd = m.get_optional_str(config, "cwd", "process.cwd")
        tag = m.get_optional_str(request, "tag")
        stdin = m.get_bool(request, "stdin", default=True)
        pty: PtySize | None = None
        if m.has(request, "pty"):
            size = m.get_message(m.get_message(request, "pty"), "size", "pty.size")
            pty = PtySize(rows=m.get_int(size, "rows", "pty.size.rows", high=MAX_PTY_SIZE),
                          cols=m.get_int(size, "cols", "pty.size.cols", high=MAX_PTY_SIZE))
        argv, env, directory = as_user(context.user, [cmd, *args],
                                       {**self._sandbox.envs, **envs}, cwd)
        timeout: float | None = None
        if context.deadline is not None:
            timeout = context.deadline - trio.current_time()
            if timeout <= 0:
                raise ConnectError(Code.DEADLINE_EXCEEDED, "the request's timeout passed before it started")
        shown_config: dict[str, Any] = {"cmd": cmd, "args": args, "envs": envs}
        if cwd is not None:
            shown_config["cwd"] = cwd
        # A PTY always takes input (envd applies `stdin` to pipes only).
        proc = Proc(config=shown_config, tag=tag, pty=pty is not None, stdin=stdin or pty is not None)
        subscriber = proc.subscribe()
        self._sandbox.start_soon(self._run, proc, argv, env, directory, pty, timeout)
        with trio.move_on_after(START_TIMEOUT) as waited:
            await proc.started.wait()
        if waited.cancelled_caught:
            proc.unsubscribe(subscriber)
            raise ConnectError(Code.UNAVAILABLE, f"the guest did not start '{cmd}' within "
                                                 f"{START_TIMEOUT:g} s")
        if proc.start_error is not None:
            raise proc.start_error
        return proc, subscriber

    async def _run(self, proc: Proc, argv: list[str], env: dict[str, str], cwd: str,
                   pty: PtySize | None, timeout: float | None) -> None:
        """The task that owns one guest process: start it, pump its output, record its end."""
        shown = printable(" ".join([proc.config["cmd"], *proc.config["args"]])[:200])
        try:
            agent = await self._sandbox.agent()
            async with agent.open_process(argv, env=env, cwd=cwd, pty=pty, timeout=timeout) as process:
                if not process.pid:
                    line = await _first_line(process)
                    await process.wait()
                    raise ConnectError(Code.INVALID_ARGUMENT,
                                       f"error starting process '{shown}': {line or 'it could not start'}")
                proc.process, proc.pid = process, process.pid
                if not proc.stdin and process.stdin is not None:
                    proc.stdin_closed = True
                    await process.stdin.aclose()
                self._retained.pop(proc.pid, None)
                if proc.tag is not None:
                    for pid in [pid for pid, kept in self._retained.items() if kept.tag == proc.tag]:
                        del self._retained[pid]
                self._live[proc.pid] = proc
                proc.started.set()
                try:
                    async with trio.open_nursery() as nursery:
                        if process.stdout is not None:
                            nursery.start_soon(_pump, proc, process.stdout, "pty" if proc.pty else "stdout")
                        if process.stderr is not None:
                            nursery.start_soon(_pump, proc, process.stderr, "stderr")
                    returncode = await process.wait()
                    proc.end = end_event(returncode)
                finally:
                    if self._live.get(proc.pid) is proc:
                        del self._live[proc.pid]
                if proc.end is not None:
                    self._retain(proc)
                    proc.publish({"end": proc.end})
        except ConnectError as error:
            proc.start_error = error
        except GuestRequestError as error:
            # The agent refused it: a cwd that does not exist, too many processes.
            code = Code.RESOURCE_EXHAUSTED if "too many processes" in error.message else Code.INVALID_ARGUMENT
            proc.start_error = ConnectError(code, f"error starting process '{shown}': {error.message}")
        except AgentError as error:
            if not proc.started.is_set():
                proc.start_error = ConnectError(Code.UNAVAILABLE,
                                                f"the sandbox's guest agent failed: {error}")
            else:
                log.info("sandbox %s: process %d lost with the guest agent: %s",
                         self._sandbox.id, proc.pid, error)
        except Exception as error:  # a task of the sandbox: a bug here must not end the sandbox
            log.error("sandbox %s: process %s failed: %s", self._sandbox.id, shown, error, exc_info=error)
            if not proc.started.is_set():
                proc.start_error = ConnectError(Code.INTERNAL, f"starting '{shown}' failed inside vmcache: "
                                                               "the daemon's log has the details")
        finally:
            proc.started.set()
            proc.ended.set()
            proc.close_all()


async def _first_line(process: GuestProcess) -> str:
    stream = process.stderr or process.stdout
    if stream is None:
        return ""
    data = b""
    with trio.move_on_after(5):
        while len(data) < 4096 and (chunk := await stream.receive_some(4096)):
            data += chunk
    return printable(data.decode("utf-8", "replace").strip().splitlines()[0][:500]) if data.strip() else ""


async def _pump(proc: Proc, stream: trio.abc.ReceiveStream, kind: str) -> None:
    """Read one output of the process as it comes; each chunk goes to the current subscribers.
    A broken agent connection ends it quietly (the process's wait then says so, once)."""
    try:
        while chunk := await stream.receive_some(CHUNK):
            if proc.subscribers:
                proc.publish({"data": {kind: m.b64(chunk)}})
    except (AgentError, trio.BrokenResourceError, trio.ClosedResourceError):
        return


# --- Handlers ---------------------------------------------------------------------------------


def keepalive_interval(context: CallContext) -> float:
    """envd's keepalive interval of a stream: ``Keepalive-Ping-Interval`` (seconds, bounded to
    1..3600), else :data:`DEFAULT_KEEPALIVE`."""
    value = context.headers.get("Keepalive-Ping-Interval")
    try:
        seconds = float(value) if value is not None else DEFAULT_KEEPALIVE
    except ValueError:
        seconds = DEFAULT_KEEPALIVE
    if not math.isfinite(seconds) or seconds <= 0:
        seconds = DEFAULT_KEEPALIVE
    return max(1.0, min(seconds, 3600.0))


async def _next_event(proc: Proc, subscriber: Subscriber, interval: float) -> dict[str, Any]:
    """The subscriber's next ProcessEvent as a ``{"event": ...}`` response, a keepalive after
    ``interval`` s without one; ``data_loss`` if it was cut off, ``unavailable`` if the process
    was lost without an end (the sandbox or its agent went away)."""
    with trio.move_on_after(interval):
        try:
            return {"event": await subscriber.receive.receive()}
        except trio.EndOfChannel:
            if subscriber.dropped:
                raise ConnectError(
                    Code.DATA_LOSS,
                    f"output of process {proc.pid} dropped: this client read more slowly than the "
                    f"process printed (more than {SUBSCRIBER_EVENTS} events behind); the process "
                    "still runs: connect to it again") from None
            raise ConnectError(Code.UNAVAILABLE,
                               f"process {proc.pid} was lost with the sandbox's guest agent") from None
    return {"event": {"keepalive": {}}}


async def start(request: dict[str, Any], context: CallContext) -> AsyncGenerator[dict[str, Any], None]:
    """``process.Process/Start`` (server stream): start, data..., end. The process is started
    (or the request refused) when the router first asks for a message."""
    table = context.sandbox.service(ProcessTable)
    proc, subscriber = await table.start(request, context)
    interval = keepalive_interval(context)
    try:
        yield {"event": {"start": {"pid": proc.pid}}}
        while "end" not in (response := await _next_event(proc, subscriber, interval))["event"]:
            yield response
        yield response
    finally:
        proc.unsubscribe(subscriber)


async def connect(request: dict[str, Any], context: CallContext) -> AsyncGenerator[dict[str, Any], None]:
    """``process.Process/Connect`` (server stream): a running process's output from now on and
    its end; an ended one's start and end while its exit is retained."""
    table = context.sandbox.service(ProcessTable)
    selector = m.get_message(request, "process")
    try:
        proc = table.find(selector)
    except ConnectError as error:
        kept = table.retained(selector) if error.code is Code.NOT_FOUND else None
        if kept is None:
            raise
        yield {"event": {"start": {"pid": kept.pid}}}
        yield {"event": {"end": kept.end}}
        return
    if len(proc.subscribers) >= MAX_SUBSCRIBERS:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, f"more than {MAX_SUBSCRIBERS} streams follow process "
                                                    f"{proc.pid}: close one first")
    subscriber = proc.subscribe()
    interval = keepalive_interval(context)
    try:
        yield {"event": {"start": {"pid": proc.pid}}}
        while "end" not in (response := await _next_event(proc, subscriber, interval))["event"]:
            yield response
        yield response
    finally:
        proc.unsubscribe(subscriber)


async def list_processes(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``process.Process/List``: the running processes with the config they were started with."""
    table = context.sandbox.service(ProcessTable)
    processes = []
    for proc in table.live():
        info: dict[str, Any] = {"config": proc.config, "pid": proc.pid}
        if proc.tag is not None:
            info["tag"] = proc.tag
        processes.append(info)
    return {"processes": processes}


async def send_input(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``process.Process/SendInput``: bytes to the process's stdin or pty."""
    proc = context.sandbox.service(ProcessTable).find(m.get_message(request, "process"))
    data_in = m.get_message(request, "input")
    if m.has(data_in, "pty"):
        data = m.get_bytes(data_in, "pty", "input.pty", max_size=MAX_INPUT)
        if not proc.pty:
            raise ConnectError(Code.INTERNAL, "error writing to tty: tty not assigned to process — "
                                              "input should be written to the stdin, not the tty")
    elif m.has(data_in, "stdin"):
        data = m.get_bytes(data_in, "stdin", "input.stdin", max_size=MAX_INPUT)
        if proc.pty:
            raise ConnectError(Code.INTERNAL, "error writing to stdin: tty assigned to process — "
                                              "input should be written to the pty, not the stdin")
    else:
        raise ConnectError(Code.UNIMPLEMENTED, "invalid input type: input has neither stdin nor pty")
    await _write_input(proc, data)
    return {}


async def _write_input(proc: Proc, data: bytes) -> None:
    async with proc.stdin_lock:
        process = proc.process
        if process is None or process.stdin is None or proc.stdin_closed:
            raise ConnectError(Code.INTERNAL, "error writing to stdin: stdin not enabled or closed")
        if not data:
            return
        try:
            await process.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, AgentError) as error:
            raise ConnectError(Code.INTERNAL, f"error writing to stdin of process '{proc.pid}': "
                                              f"{error or 'the process has exited'}") from None


async def close_stdin(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``process.Process/CloseStdin``: EOF on the process's stdin (not for a PTY)."""
    proc = context.sandbox.service(ProcessTable).find(m.get_message(request, "process"))
    if proc.pty:
        raise ConnectError(Code.UNKNOWN, "error closing stdin: cannot close stdin for PTY process — "
                                         "send Ctrl+D (0x04) instead")
    async with proc.stdin_lock:
        if not proc.stdin_closed and proc.process is not None and proc.process.stdin is not None:
            proc.stdin_closed = True
            await proc.process.stdin.aclose()
    return {}


async def send_signal(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``process.Process/SendSignal``: SIGTERM or SIGKILL to the process (and its group)."""
    proc = context.sandbox.service(ProcessTable).find(m.get_message(request, "process"))
    number = m.get_enum(request, "signal", SIGNALS)
    if number not in (signals.SIGKILL, signals.SIGTERM):
        shown = next((name for name, value in SIGNALS.items() if value == number), str(number))
        raise ConnectError(Code.UNIMPLEMENTED, f"invalid signal: {shown}")
    if proc.process is not None:
        try:
            await proc.process.send_signal(number)
        except AgentError as error:
            raise ConnectError(Code.INTERNAL, f"error sending signal: {error}") from None
    return {}


async def update(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``process.Process/Update``: resize the process's PTY."""
    proc = context.sandbox.service(ProcessTable).find(m.get_message(request, "process"))
    if m.has(request, "pty"):
        size = m.get_message(m.get_message(request, "pty"), "size", "pty.size")
        rows = m.get_int(size, "rows", "pty.size.rows", high=MAX_PTY_SIZE)
        cols = m.get_int(size, "cols", "pty.size.cols", high=MAX_PTY_SIZE)
        if not proc.pty:
            raise ConnectError(Code.INTERNAL, "error resizing tty: tty not assigned to process")
        if proc.process is not None:
            try:
                await proc.process.resize(rows, cols)
            except AgentError as error:
                raise ConnectError(Code.INTERNAL, f"error resizing tty: {error}") from None
    return {}


async def stream_input(requests: AsyncIterator[dict[str, Any]], context: CallContext) -> dict[str, Any]:
    """``process.Process/StreamInput`` (client stream): a start naming the process, then input
    in order. Needs a router that can read a request body as it comes."""
    proc: Proc | None = None
    async for request in requests:
        if m.has(request, "start"):
            proc = context.sandbox.service(ProcessTable).find(
                m.get_message(m.get_message(request, "start"), "process", "start.process"), "start.process")
        elif m.has(request, "data"):
            if proc is None:
                raise ConnectError(Code.FAILED_PRECONDITION, "data before the start event names a process")
            data_in = m.get_message(m.get_message(request, "data"), "input", "data.input")
            kind = "pty" if m.has(data_in, "pty") else "stdin" if m.has(data_in, "stdin") else None
            if kind is None:
                raise ConnectError(Code.UNIMPLEMENTED, "invalid input type: input has neither stdin nor pty")
            if (kind == "pty") != proc.pty:
                raise ConnectError(Code.INTERNAL, f"error writing to {kind}: the process "
                                                  f"{'has' if proc.pty else 'has no'} tty")
            await _write_input(proc, m.get_bytes(data_in, kind, f"data.input.{kind}", max_size=MAX_INPUT))
        elif not m.has(request, "keepalive"):
            raise ConnectError(Code.UNIMPLEMENTED, "invalid event type")
    return {}
