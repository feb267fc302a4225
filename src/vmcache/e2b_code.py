"""E2B's code interpreter on the host: everything e2b-code-interpreter sends to port 49999.

E2B's own server for it (``template/server`` of e2b-dev/code-interpreter: FastAPI over
Jupyter) is what the SDKs were written against, and this module answers as it does:

- ``POST /execute`` ``{code, context_id, language, env_vars}`` streams newline-delimited JSON:
  ``number_of_executions``, then ``stdout`` / ``stderr`` (``text``, ``timestamp``), ``result``
  (``text``, ``html``, ``png``... ``extra``, ``is_main_result``), ``error`` (``name``,
  ``value``, ``traceback``), a ``keepalive`` every KEEPALIVE_INTERVAL s of silence (so that a
  vanished client is noticed), and always ``{"type": "end_of_execution"}`` last. Both
  ``context_id`` and ``language``: 400; an unknown context: 404 ``Context ID not found``.
- ``POST /contexts`` ``{language, cwd}`` answers ``{id, language, cwd}``; ``GET /contexts``
  lists them; ``DELETE /contexts/ID`` and ``POST /contexts/ID/restart`` answer ``null``
  (404 for an unknown id); ``GET /health`` answers ``"OK"``. Errors are plain text, as
  FastAPI's ``PlainTextResponse`` there; a body that is not the right JSON is 422.

vmcache runs Python only: ``language`` is normalised as E2B does (none is python, ``js`` is
javascript...) and anything but python is refused with 400 and a sentence saying so (E2B's
server would try to start a Jupyter kernel of that name and answer 500 with Jupyter's words).

A context is one long-lived ``e2b_kernel.py`` process in the guest (see that file for the
line protocol), run through the daemon's agent connection as the request's user. Each context
has a worker task that runs its executions one at a time, in the order they came; a kernel
task per process reads its messages, which are untrusted: a malformed or oversized line stops
that process and ends the execution with an error, and the next execution starts a fresh one.
The execution's stream is fed from those tasks, so a client that goes away (the response
iterator is closed) only marks the execution abandoned: the worker interrupts it, waits
INTERRUPT_GRACE s, and kills the process if it would not stop; the context stays usable.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import math
import re
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .e2b_connect import ConnectError
from .e2b_http import HttpRequest, HttpResponse, json_response
from .e2b_users import DEFAULT_USER, as_user, lookup
from .errors import AgentError, VmcacheError

if TYPE_CHECKING:
    from .agent_client import AgentConnection, GuestProcess
    from .e2b_connect import CallContext
    from .e2b_sandbox import SandboxRuntime

log = logging.getLogger("vmcache.e2b.code")

#: How the kernel is started in the guest (/init copies it there from the initramfs).
KERNEL_ARGV: tuple[str, ...] = ("/usr/bin/python3", "-I", "/run/vmcache/agent/e2b_kernel.py")
#: A context's working directory when the request names none (E2B's).
DEFAULT_CWD = "/home/user"
#: The largest request body (the code, mostly).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: The longest message line accepted from a kernel (it writes at most 8 MiB).
MAX_KERNEL_LINE = 8 * 1024 * 1024 + 64 * 1024
#: A line at least this long is parsed in a worker thread, off the event loop.
PARSE_IN_THREAD = 512 * 1024
#: Contexts per sandbox, executions waiting per context, env_vars per execution.
MAX_CONTEXTS = 32
MAX_QUEUED = 32
MAX_ENV_VARS = 1000
#: Events buffered between a kernel and a slow client (then the kernel waits): each may be
#: a result of several MiB, so few.
EVENT_BUFFER = 2
#: A keepalive line after this many seconds without output (E2B's server sends them too).
KEEPALIVE_INTERVAL = 5.0
#: How long a kernel may take to say it is ready.
START_TIMEOUT = 60.0
#: How long an interrupted execution may take to end before its kernel is killed.
INTERRUPT_GRACE = 5.0
#: How long stopping a kernel may take (the agent kills its process group).
STOP_TIMEOUT = 10.0
#: Bytes of a kernel's own stderr kept to explain its death.
STDERR_TAIL = 4096

END_OF_EXECUTION = b'{"type": "end_of_execution"}\n'
KEEPALIVE = b'{"type": "keepalive"}\n'

#: Result fields E2B's server fills from a MIME bundle; the rest goes to ``extra``.
MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown",
    "image/svg+xml": "svg", "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf",
    "text/latex": "latex", "application/json": "json", "application/javascript": "javascript",
    "e2b/data": "data", "e2b/chart": "chart",
}
#: Fields that hold a string (the others hold any JSON value).
TEXT_FIELDS = frozenset(("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex",
                         "javascript"))
_FIELD_ORDER = tuple(MIME_FIELDS.values())
_MAX_FORMATS = 64
_CONTEXT_PATH = re.compile(r"/contexts/([^/]+)(/restart)?")


class CodeInterpreterError(VmcacheError):
    """The code interpreter could not do what was asked; the message says why and what to do."""


class KernelStartError(CodeInterpreterError):
    """A context's Python process did not start or did not become ready."""


class KernelProtocolError(CodeInterpreterError):
    """A context's Python process sent what the protocol does not allow (it is stopped)."""


class KernelState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"


#: Every allowed change of a kernel's state.
KERNEL_TRANSITIONS: Mapping[KernelState, frozenset[KernelState]] = {
    KernelState.STARTING: frozenset((KernelState.READY, KernelState.DEAD)),
    KernelState.READY: frozenset((KernelState.DEAD,)),
    KernelState.DEAD: frozenset(),
}


def _agent_failed(error: BaseException) -> str:
    return f"the guest agent failed ({type(error).__name__}: {str(error)[:200]})"


def error_event(name: str, value: str, traceback: str = "") -> dict[str, Any]:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One NDJSON line as E2B's server writes it (``json.dumps``: ASCII, so no character the
    SDKs' line splitters would cut on, such as U+2028, appears raw)."""
    return json.dumps(event).encode("ascii") + b"\n"


def normalize_language(language: str | None) -> str:
    """E2B's server's normalisation: none is python, ``js``/``ts`` the long names."""
    if not language:
        return "python"
    language = language.lower().strip()
    return {"js": "javascript", "ts": "typescript"}.get(language, language)


def _require_python(language: str | None) -> str:
    normal = normalize_language(language)
    if normal != "python":
        shown = normal[:64] if normal.isprintable() else repr(normal[:64])
        raise _PlainError(400, f"language '{shown}' is not available: vmcache's code interpreter "
                               "runs Python only (pass language 'python', or none)")
    return normal


# --- the kernel's messages -----------------------------------------------------------------------


def split_lines(buffer: bytearray, data: bytes | bytearray, max_line: int = MAX_KERNEL_LINE) -> list[bytes]:
    """Append ``data`` to ``buffer`` and take the complete lines out of it (without their
    newline); KernelProtocolError if a line is longer than ``max_line``."""
    start = len(buffer)
    buffer += data
    lines: list[bytes] = []
    begin = 0
    search = max(0, start)
    while (end := buffer.find(b"\n", search)) != -1:
        if end - begin > max_line:
            raise KernelProtocolError(f"a message of over {max_line} bytes")
        lines.append(bytes(buffer[begin:end]))
        begin = search = end + 1
    del buffer[:begin]
    if len(buffer) > max_line:
        raise KernelProtocolError(f"a message of over {max_line} bytes")
    return lines


def parse_message(line: bytes) -> dict[str, Any]:
    """One kernel line as a dict with a string ``type``; KernelProtocolError otherwise."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise KernelProtocolError(f"a line that is not JSON ({str(error)[:100]})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise KernelProtocolError("a message that is not an object with a type")
    return message


def _field(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KernelProtocolError(f"a {message['type']} message whose {name} is not valid")
    return value


def to_event(message: Mapping[str, Any]) -> dict[str, Any]:
    """The NDJSON event E2B's server sends for a kernel message about an execution
    (``start``, ``stdout``, ``stderr``, ``result``, ``error``); KernelProtocolError if a
    field is missing or of the wrong kind."""
    kind = message["type"]
    if kind == "start":
        count = _field(message, "execution_count", int)
        if not 0 <= count < 2**53:
            raise KernelProtocolError("a start message whose execution_count is not valid")
        return {"type": "number_of_executions", "execution_count": count}
    if kind in ("stdout", "stderr"):
        return {"type": kind, "text": _field(message, "text", str), "timestamp": _timestamp()}
    if kind == "error":
        return error_event(_field(message, "name", str), _field(message, "value", str),
                           _field(message, "traceback", str))
    if kind == "result":
        return result_event(_field(message, "data", dict),
                            _field(message, "is_main_result", bool))
    raise KernelProtocolError(f"a message of unknown type {kind[:40]!r}")


def result_event(data: Mapping[str, Any], is_main_result: bool) -> dict[str, Any]:
    """A MIME bundle as E2B's server's Result: known types in their fields (text/plain with
    one pair of surrounding quotes removed, as it does), the others in ``extra``."""
    if len(data) > _MAX_FORMATS or not all(isinstance(mime, str) for mime in data):
        raise KernelProtocolError("a result whose data is not a bundle of formats")
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        elif field in TEXT_FIELDS and not isinstance(value, str):
            raise KernelProtocolError(f"a result whose {mime} is not a string")
        else:
            fields[field] = value
    text = fields.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        fields["text"] = text[1:-1]
    event: dict[str, Any] = {"type": "result"}
    event.update((name, fields[name]) for name in _FIELD_ORDER if fields.get(name) is not None)
    event["extra"] = extra
    event["is_main_result"] = is_main_result
    return event


# --- executions ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class Execution:
    """One ``/execute`` call: what to run, and the channel its events go out on."""

    code: str
    env: dict[str, str]
    deadline: float | None
    id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    abandoned: trio.Event = attrs.Factory(trio.Event)   # the client went away
    finished: trio.Event = attrs.Factory(trio.Event)
    #: A last error event, sent after every event already delivered.
    trailer: dict[str, Any] | None = None
    _send: trio.MemorySendChannel[dict[str, Any]] = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel[dict[str, Any]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)

    async def deliver(self, event: dict[str, Any]) -> None:
        """Pass ``event`` to the client (waiting while it is slow); dropped once it is gone."""
        if self.finished.is_set() or self.abandoned.is_set():
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not self.finished.is_set():
                self.abandoned.set()

    def finish(self, error: dict[str, Any] | None = None) -> None:
        """The execution is over (with a last ``error`` event, if given); synchronous, so that
        a task being cancelled can still end it."""
        if self.finished.is_set():
            return
        self.trailer = error
        self._send.close()
        self.finished.set()


class ExecutionStream:
    """The response body of ``/execute`` (see :func:`_lines`). Closing it before its end (the
    client went away) abandons the execution, which the context's worker then interrupts;
    this holds even when the server closes it before reading anything (a generator that never
    started would run no ``finally``)."""

    def __init__(self, execution: Execution, sandbox: SandboxRuntime) -> None:
        self._execution = execution
        self._lines = _lines(execution, sandbox)

    def __aiter__(self) -> ExecutionStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._lines.__anext__()

    async def aclose(self) -> None:
        if not self._execution.finished.is_set():
            self._execution.abandoned.set()
        await self._lines.aclose()


def stream_execution(execution: Execution, sandbox: SandboxRuntime) -> ExecutionStream:
    return ExecutionStream(execution, sandbox)


async def _lines(execution: Execution, sandbox: SandboxRuntime) -> AsyncGenerator[bytes, None]:
    """The execution's events as NDJSON lines, keepalives while it is silent, then
    ``end_of_execution``."""
    receive = execution.receive
    try:
        while True:
            if sandbox.ended.is_set() and not execution.finished.is_set():
                execution.finish(error_event(
                    "SandboxEnded", "the sandbox ended during the execution (it was killed or "
                                    "its timeout passed)"))
            with trio.move_on_after(KEEPALIVE_INTERVAL) as waited:
                try:
                    event = await receive.receive()
                except trio.EndOfChannel:
                    break
            if waited.cancelled_caught:
                yield KEEPALIVE
                continue
            yield encode_event(event)
        if execution.trailer is not None:
            yield encode_event(execution.trailer)
        yield END_OF_EXECUTION
    finally:
        if not execution.finished.is_set():
            execution.abandoned.set()
        receive.close()


class Kernel:
    """One ``e2b_kernel.py`` process of a context, run by :meth:`run` as a sandbox task."""

    def __init__(self) -> None:
        self.state = KernelState.STARTING
        self.ready = trio.Event()      # set once READY or DEAD
        self.stopped = trio.Event()    # set once the process is gone
        self.current: Execution | None = None
        self.pid = 0
        #: Why it could not start, or why it died (a sentence for the user).
        self.failure: str | None = None
        #: The error event an execution running at its end gets, when it was stopped on purpose.
        self._stop_error: dict[str, Any] | None = None
        self._scope = trio.CancelScope()
        self._process: GuestProcess | None = None
        self._stdin_lock = trio.Lock()
        self._stderr = bytearray()

    def _move(self, state: KernelState) -> None:
        if state not in KERNEL_TRANSITIONS[self.state]:
            raise AssertionError(f"a kernel cannot go from {self.state.value} to {state.value}")
        self.state = state

    def stop(self, error: dict[str, Any] | None = None) -> None:
        """Stop the process (synchronously: its task kills it); an execution running gets
        ``error`` as its last event."""
        if self._stop_error is None:
            self._stop_error = error
        self._scope.cancel()

    async def run(self, agent: AgentConnection, argv: list[str], env: dict[str, str]) -> None:
        """Start the process and read its messages until it ends (a sandbox task)."""
        reason: str | None = "it was stopped"
        try:
            with self._scope:
                async with agent.open_process(argv, env=env, cwd="/") as process:
                    self._process = process
                    self.pid = process.pid
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._drain_stderr, process)
                        reason = await self._guarded(self._read, process)
                        if reason is None:
                            with trio.move_on_after(STOP_TIMEOUT):
                                reason = await self._guarded(self._wait, process)
                        nursery.cancel_scope.cancel()
        except (AgentError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            reason = _agent_failed(error)
        finally:
            self._end(reason or "it did not exit")

    async def _guarded(self, step: Callable[[GuestProcess], Awaitable[str | None]],
                       process: GuestProcess) -> str | None:
        """Run a step of :meth:`run`; why the kernel ends if it failed (no exception groups)."""
        try:
            return await step(process)
        except KernelProtocolError as error:
            log.warning("sandbox kernel pid %s sent %s", self.pid, error.message)
            return f"it sent {error.message}, and was stopped"
        except (AgentError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            return _agent_failed(error)
        except Exception:  # a bug: the execution still ends, and the next one starts afresh
            log.exception("sandbox kernel pid %s failed", self.pid)
            return "the daemon failed (its log has the details)"

    async def _wait(self, process: GuestProcess) -> str:
        return f"it exited with status {await process.wait()}"

    def _end(self, reason: str) -> None:
        if self.state is KernelState.STARTING and self.failure is None:
            self.failure = f"the context's Python process did not start: {reason}{self._tail()}"
        elif self.failure is None:
            self.failure = reason
        if self.state is not KernelState.DEAD:
            self._move(KernelState.DEAD)
        self.ready.set()
        current, self.current = self.current, None
        if current is not None:
            current.finish(self._stop_error or error_event(
                "KernelDied", f"the context's Python process ended during the execution "
                              f"({reason}): its state is lost, and the next execution starts a "
                              "fresh one", self._tail().strip()))
        self.stopped.set()

    def _tail(self) -> str:
        text = bytes(self._stderr).decode("utf-8", "replace").strip()
        return f"\n{text}" if text else ""

    async def _drain_stderr(self, process: GuestProcess) -> None:
        assert process.stderr is not None
        try:
            while data := await process.stderr.receive_some(65536):
                self._stderr += data
                del self._stderr[:-STDERR_TAIL]
        except (AgentError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader says why

    async def _read(self, process: GuestProcess) -> None:
        assert process.stdout is not None
        buffer = bytearray()
        while data := await process.stdout.receive_some(65536):
            for line in split_lines(buffer, data):
                if len(line) >= PARSE_IN_THREAD:
                    message = await trio.to_thread.run_sync(parse_message, line)
                else:
                    message = parse_message(line)
                await self._dispatch(message)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ready":
            if self.state is not KernelState.STARTING:
                raise KernelProtocolError("a second ready message")
            self._move(KernelState.READY)
            self.ready.set()
            return
        if kind == "startup_error":
            text = message.get("message")
            self.failure = str(text)[:1000] if isinstance(text, str) else "it failed to start"
            return
        if self.state is not KernelState.READY:
            raise KernelProtocolError(f"a {kind[:40]!r} message before ready")
        current = self.current
        if current is None or message.get("id") != current.id:
            if kind in ("start", "stdout", "stderr", "result", "error", "done"):
                return  # an execution that already ended (its client went and it was failed)
            raise KernelProtocolError(f"a message of unknown type {kind[:40]!r}")
        if kind == "done":
            self.current = None
            current.finish()
            return
        await current.deliver(to_event(message))

    async def command(self, command: dict[str, Any]) -> bool:
        """Send one command line; False if the process is gone."""
        process = self._process
        if process is None or process.stdin is None or self.state is KernelState.DEAD:
            return False
        line = json.dumps(command, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
        try:
            async with self._stdin_lock:
                await process.stdin.send_all(line)
        except (AgentError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


class CodeContext:
    """One context: an id, its language and cwd, the user it runs as, and its kernel."""

    def __init__(self, table: ContextTable, context_id: str, cwd: str, user: str) -> None:
        self.table = table
        self.id = context_id
        self.language = "python"
        self.cwd = cwd
        self.user = user
        self.deleted = False
        self.kernel: Kernel | None = None
        self._start_lock = trio.Lock()
        #: Executions waiting for the one running (an abandoned one leaves its place at once).
        self._waiting: deque[Execution] = deque()
        self._wake = trio.Event()

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def submit(self, execution: Execution) -> None:
        """Queue an execution (they run one at a time, in order)."""
        if self.deleted:
            raise _PlainError(404, f"Context {self.id} not found")
        for item in self._waiting:
            if item.abandoned.is_set():
                item.finish()
        self._waiting = deque(item for item in self._waiting if not item.finished.is_set())
        if len(self._waiting) >= MAX_QUEUED:
            raise _PlainError(503, f"{MAX_QUEUED} executions already wait in context {self.id}: "
                                   "wait for them, or use another context")
        self._waiting.append(execution)
        self._wake.set()

    async def ready_kernel(self) -> Kernel:
        """The running kernel, started if there is none (or it died); KernelStartError."""
        async with self._start_lock:
            if self.deleted:
                raise KernelStartError(f"context {self.id} was removed")
            kernel = self.kernel
            if kernel is None or kernel.state is KernelState.DEAD:
                sandbox = self.table.sandbox
                kernel = Kernel()
                try:
                    agent = await sandbox.agent()
                    argv, env, cwd = as_user(self.user, KERNEL_ARGV, dict(sandbox.envs), self.cwd)
                    sandbox.start_soon(kernel.run, agent, [*argv, "--cwd", cwd], env)
                except (VmcacheError, ConnectError) as error:
                    raise KernelStartError(f"the context's Python process cannot start: "
                                           f"{error}") from None
                self.kernel = kernel
            with trio.move_on_after(START_TIMEOUT):
                await kernel.ready.wait()
            if kernel.state is not KernelState.READY:
                kernel.stop()
                raise KernelStartError(kernel.failure or "the context's Python process did not "
                                       f"say it was ready within {START_TIMEOUT:g} s")
            return kernel

    async def restart(self) -> None:
        """A fresh process (its state lost), same id; an execution running ends with E2B's
        ContextRestarting error."""
        async with self._start_lock:
            old, self.kernel = self.kernel, None
        if old is not None:
            old.stop(error_event("ContextRestarting", "Context was restarted"))
            with trio.move_on_after(STOP_TIMEOUT):
                await old.stopped.wait()
        await self.ready_kernel()

    def delete(self) -> None:
        self.deleted = True
        self._wake.set()
        if self.kernel is not None:
            self.kernel.stop(error_event(
                "UnexpectedEndOfExecution",
                "Connection to the execution was closed before the execution was finished"))

    async def worker(self) -> None:
        """Run the queued executions one at a time (a sandbox task, for the context's life)."""
        while True:
            while not self._waiting and not self.deleted:
                await self._wake.wait()
                self._wake = trio.Event()
            if not self._waiting:
                return  # removed, and nothing waits any more
            execution = self._waiting.popleft()
            try:
                await self._run(execution)
            except Exception:  # a bug: the context must still serve the next execution
                log.exception("sandbox %s: an execution in context %s failed",
                              self.table.sandbox.id, self.id)
            finally:
                execution.finish(error_event(
                    "UnexpectedEndOfExecution",
                    "Connection to the execution was closed before the execution was finished"))

    async def _run(self, execution: Execution) -> None:
        if execution.abandoned.is_set():
            return
        if self.deleted:
            return  # the finally in worker() says so
        if execution.deadline is not None and trio.current_time() >= execution.deadline:
            execution.finish(error_event(
                "TimeoutError", "the request's timeout passed while it waited for the executions "
                                "before it in this context"))
            return
        try:
            kernel = await self.ready_kernel()
        except KernelStartError as error:
            execution.finish(error_event("KernelStartError", error.message))
            return
        kernel.current = execution
        if not await kernel.command({"type": "execute", "id": execution.id,
                                     "code": execution.code, "env": execution.env}):
            kernel.stop()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, kernel, execution)
            await execution.finished.wait()
            nursery.cancel_scope.cancel()

    async def _watch(self, kernel: Kernel, execution: Execution) -> None:
        """Interrupt the execution when its client goes or its deadline passes; kill the
        kernel if it does not stop within INTERRUPT_GRACE s."""
        with trio.move_on_at(execution.deadline if execution.deadline is not None else math.inf):
            await execution.abandoned.wait()
        await kernel.command({"type": "interrupt", "id": execution.id})
        with trio.move_on_after(INTERRUPT_GRACE):
            await execution.finished.wait()
            return
        kernel.stop(error_event(
            "KernelDied", f"the execution did not stop within {INTERRUPT_GRACE:g} s of its "
                          "interrupt: the context's Python process was killed (its state is "
                          "lost), and the next execution starts a fresh one"))


class ContextTable:
    """A sandbox's code contexts (``context.sandbox.service(ContextTable)``), with the default
    Python context that executions naming no context run in."""

    def __init__(self, sandbox: SandboxRuntime) -> None:
        self.sandbox = sandbox
        self.contexts: dict[str, CodeContext] = {}
        #: E2B's server has its default Python context from the start (GET /contexts lists
        #: it); its process starts with the first execution, or :meth:`prewarm`.
        self.default: CodeContext = self.create(DEFAULT_CWD, DEFAULT_USER)

    def create(self, cwd: str, user: str) -> CodeContext:
        if len(self.contexts) >= MAX_CONTEXTS:
            raise _PlainError(429, f"this sandbox has {MAX_CONTEXTS} contexts, the most it may "
                                   "have: remove one first")
        context = CodeContext(self, str(uuid.uuid4()), cwd, user)
        self.contexts[context.id] = context
        self.sandbox.start_soon(context.worker)
        return context

    def default_context(self) -> CodeContext:
        """The default Python context (made again if it was removed). It runs as ``user``,
        as E2B's Jupyter server does, whoever asks."""
        if self.default.deleted:
            self.default = self.create(DEFAULT_CWD, DEFAULT_USER)
        return self.default

    def get(self, context_id: str) -> CodeContext:
        context = self.contexts.get(context_id)
        if context is None:
            raise _PlainError(404, f"Context {context_id[:100]} not found")
        return context

    def remove(self, context_id: str) -> None:
        self.get(context_id).delete()
        del self.contexts[context_id]

    def prewarm(self) -> None:
        """Start the default context's process now, so that the first run_code does not wait
        for Python to start in the guest."""
        context = self.default_context()

        async def start() -> None:
            try:
                await context.ready_kernel()
            except KernelStartError as error:
                log.warning("sandbox %s: the default code context did not start: %s",
                            self.sandbox.id, error.message)

        self.sandbox.start_soon(start)


# --- HTTP ----------------------------------------------------------------------------------------


class _PlainError(Exception):
    """An error answered as E2B's server does: a status and plain text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> HttpResponse:
        return HttpResponse(self.status, [("content-type", "text/plain; charset=utf-8")],
                            self.message.encode())


def _invalid(field: str, message: str, kind: str) -> HttpResponse:
    """FastAPI's 422 for a body that does not match the model."""
    return json_response(422, {"detail": [{"type": kind, "loc": ["body", field], "msg": message}]})


class _Invalid(Exception):
    """A body that does not match E2B's request model (FastAPI's 422)."""

    def __init__(self, field: str, message: str, kind: str = "string_type") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


async def _json_body(request: HttpRequest, *, allow_empty: bool = False) -> dict[str, Any]:
    body = await request.read_body(MAX_REQUEST_BYTES)
    if allow_empty and not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise _Invalid("0", "JSON decode error", "json_invalid") from None
    if not isinstance(value, dict):
        raise _Invalid("0", "Input should be a valid dictionary", "model_attributes_type")
    return value


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _Invalid(name, "Input should be a valid string")
    return value


def _env_vars(body: Mapping[str, Any]) -> dict[str, str]:
    value = body.get("env_vars")
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ENV_VARS:
        raise _Invalid("env_vars", f"Input should be a valid dictionary of at most "
                                   f"{MAX_ENV_VARS} strings", "dict_type")
    for name, item in value.items():
        if not isinstance(item, str):
            raise _Invalid("env_vars", f"env_vars[{name[:64]!r}]: Input should be a valid string")
        if not name or "=" in name or "\0" in name or "\0" in item:
            raise _Invalid("env_vars", f"env_vars[{name[:64]!r}]: not a valid environment "
                                       "variable (a name without '=' or NUL)", "value_error")
    return dict(value)


async def _execute(request: HttpRequest, context: CallContext, table: ContextTable) -> HttpResponse:
    body = await _json_body(request)
    code = body.get("code")
    if not isinstance(code, str):
        raise _Invalid("code", "Field required" if code is None else "Input should be a valid string",
                       "missing" if code is None else "string_type")
    context_id = _optional_str(body, "context_id")
    language = _optional_str(body, "language")
    env = _env_vars(body)
    if context_id and language:
        raise _PlainError(400, "Only one of context_id or language can be provided")
    if context_id:
        target = table.get(context_id)
    else:
        _require_python(language)
        target = table.default_context()
    execution = Execution(code, env, context.deadline)
    target.submit(execution)
    return HttpResponse(200, [("content-type", "application/x-ndjson")],
                        stream_execution(execution, context.sandbox))


async def _create(request: HttpRequest, context: CallContext, table: ContextTable) -> HttpResponse:
    body = await _json_body(request, allow_empty=True)
    _require_python(_optional_str(body, "language"))
    cwd = _optional_str(body, "cwd") or DEFAULT_CWD
    if "\0" in cwd or len(cwd) > 4096:
        raise _Invalid("cwd", "not a valid path", "value_error")
    created = table.create(cwd, context.user)
    try:
        await created.ready_kernel()
    except KernelStartError as error:
        table.remove(created.id)
        raise _PlainError(500, f"Failed to create context: {error.message}") from None
    return json_response(200, created.to_json())


async def handle_code(request: HttpRequest, context: CallContext) -> HttpResponse:
    """Everything e2b-code-interpreter sends to port 49999 (see the module's docstring)."""
    path = request.path
    method = request.method
    try:
        try:
            lookup(context.user)
            table = context.sandbox.service(ContextTable)
            if path == "/execute":
                _allow(method, "POST")
                return await _execute(request, context, table)
            if path == "/contexts":
                _allow(method, "GET", "POST")
                if method == "POST":
                    return await _create(request, context, table)
                return json_response(200, [item.to_json() for item in table.contexts.values()])
            if path == "/health":
                _allow(method, "GET")
                return json_response(200, "OK")
            match = _CONTEXT_PATH.fullmatch(path)
            if match is None:
                return json_response(404, {"detail": "Not Found"})
            context_id, restart = match.group(1), match.group(2)
            if restart:
                _allow(method, "POST")
                found = table.get(context_id)
                try:
                    await found.restart()
                except KernelStartError as error:
                    raise _PlainError(500, f"Failed to restart context {context_id}: "
                                           f"{error.message}") from None
                return json_response(200, None)
            _allow(method, "DELETE")
            table.remove(context_id)
            return json_response(200, None)
        except ConnectError as error:  # as_user: an unknown user
            raise _PlainError(400, error.message) from None
        except VmcacheError as error:  # the sandbox ended meanwhile: what E2B's proxy answers
            raise _PlainError(502, f"The sandbox {context.sandbox.id} was not found: {error}"
                              ) from None
    except _PlainError as error:
        return error.response()
    except _Invalid as error:
        return _invalid(error.field, error.message, error.kind)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _MethodNotAllowed(allowed)


class _MethodNotAllowed(_PlainError):
    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(405, "Method Not Allowed")
        self.allowed = allowed

    def response(self) -> HttpResponse:
        response = json_response(405, {"detail": "Method Not Allowed"})
        response.headers.append(("allow", ", ".join(self.allowed)))
        return response
