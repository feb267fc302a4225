"""E2B's code interpreter, guest side: one stateful Python context in one long-lived process.

The host (vmcache.e2b_code) starts ``python3 -I e2b_kernel.py --cwd DIR`` through the guest
agent, as the context's user, and speaks newline-delimited JSON with it: commands come on
stdin, messages go out on stdout. Standard library only (the guest's Python 3.11).

Commands (one JSON object a line)::

    {"type": "execute", "id": ID, "code": SOURCE, "env": {NAME: VALUE}}
    {"type": "interrupt", "id": ID}          # KeyboardInterrupt in execution ID (if it
                                             # still waits, it will not run at all)

Messages, each one line of at most MAX_LINE bytes (ASCII: non-ASCII is escaped)::

    {"type": "ready", "pid": N}               # once, after the chdir
    {"type": "startup_error", "message": TEXT}  # instead of ready; the process then exits
    {"type": "start", "id": ID, "execution_count": N}
    {"type": "stdout" | "stderr", "id": ID, "text": TEXT}      # at most CHUNK characters
    {"type": "result", "id": ID, "is_main_result": BOOL, "data": {MIME: VALUE}}
    {"type": "error", "id": ID, "name": NAME, "value": TEXT, "traceback": TEXT}
    {"type": "done", "id": ID}

Why it is built this way:

- The namespace is a module of its own installed as ``__main__``, so variables, imports and
  classes (pickle finds them) survive between executions.
- Output is taken at the file descriptors: fds 1 and 2 are pipes read by a thread, so what a
  child process or a C extension writes is streamed like ``print``. The kernel's own messages
  use a private duplicate of the original stdout, and its commands a private duplicate of the
  original stdin (fd 0 becomes /dev/null: a child cannot read the host's commands).
- Writes are coalesced per stream for FLUSH_INTERVAL (as ipykernel does: a ``print`` is one
  message, not two), and whatever is pending on one stream is sent before anything else is:
  stdout, stderr, results and errors arrive in the order the code wrote them.
- An interrupt is a real SIGINT sent to the main thread (it also wakes a blocking call), but the
  handler raises only while user code runs and never inside the kernel's own writing, so a
  message is never cut in half and the kernel loop never dies of it.
- Every message is bounded: a long output is chunked, a huge repr truncated with a note, a
  format too large for a message dropped with a note.
- What E2B's Jupyter kernel adds to Python, in part: ``display(obj)`` (a result that is not
  the main one), a last expression ending in ``;`` shows nothing, top-level ``await``, and
  ``!command`` / ``%pip ...`` lines run by the shell (only when the code is not Python
  without them). Other IPython magics are not Python, and are a SyntaxError here.
"""

from __future__ import annotations

import _ast
import binascii
import codecs
import json
import os
import queue
import select
import signal
import sys
import threading
import time
import types
from typing import Any

#: The longest message line the kernel writes (the host refuses longer ones).
MAX_LINE = 8 * 1024 * 1024
#: The longest command line it reads.
MAX_COMMAND = 32 * 1024 * 1024
#: Characters of output per stdout/stderr message.
CHUNK = 16 * 1024
#: How long output is held to be coalesced with what follows.
FLUSH_INTERVAL = 0.05
#: The longest text/plain of a result; the longest traceback and error value.
MAX_TEXT = 256 * 1024
MAX_VALUE = 64 * 1024
#: The longest value of any other format of a result (characters).
MAX_FORMAT = 4 * 1024 * 1024
#: Output pending on a stream while the host is slow: the reader stops reading beyond it.
MAX_PENDING = 1024 * 1024

KERNEL_FILE = os.path.abspath(__file__)

#: ``_repr_*_`` methods and the MIME type each one gives (as IPython's formatters).
REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_pdf_", "application/pdf"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
    ("_repr_javascript_", "application/javascript"),
)
#: The name ``!command`` lines call in the user's namespace.
SYSTEM_NAME = "_vmcache_system"
BINARY_TYPES = ("image/png", "image/jpeg", "application/pdf")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def truncated(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    note = f"[... {len(text) - limit} more characters truncated by vmcache ...]"
    if keep_end:
        return note + "\n" + text[-limit:]
    return text[:limit] + "\n" + note


class Kernel:
    def __init__(self, message_fd: int, command_fd: int) -> None:
        self.message_fd = message_fd
        self.command_fd = command_fd
        self.lock = threading.RLock()
        self.main_thread = threading.get_ident()
        self.current: str | None = None  # the id of the running execution
        self.count = 0
        #: True while user code runs in the main thread (the SIGINT handler may raise) ...
        self.user_code = False
        #: ... unless the main thread is inside the kernel's own writing (then it is deferred).
        self.writing = 0
        self.interrupt_pending = False
        self.pending_name: str | None = None  # the stream with output waiting to be sent
        self.pending: list[str] = []
        self.pending_size = 0
        self.pending_since = 0.0
        self.commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
        #: Executions interrupted before they started (the host sent both at once).
        self.interrupted: set[str] = set()
        self.queued: set[str] = set()
        self.namespace: dict[str, Any] = {}
        #: Each cell's source, for tracebacks (put in linecache once something imports it).
        self.sources: dict[str, str] = {}
        self.registered = 0
        #: The kernel's own __main__, kept alive once the user's namespace takes its place.
        self.own_module: object = None
        self.loop: Any = None  # the asyncio loop of top-level awaits, made on first use
        self.pipes: dict[int, str] = {}
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)

    # --- messages ---------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """One line to the host: the caller holds the lock (or is the only writer)."""
        line = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_LINE:  # every producer bounds itself; this is the last guard
            line = json.dumps({"type": "error", "id": message.get("id"), "name": "MessageTooLarge",
                               "value": f"a {message.get('type')} message of {len(line)} bytes was "
                                        "dropped", "traceback": ""}).encode() + b"\n"
        write_all(self.message_fd, line)

    def enter(self) -> None:
        if threading.get_ident() == self.main_thread:
            self.writing += 1

    def leave(self) -> None:
        if threading.get_ident() == self.main_thread:
            self.writing -= 1
            if not self.writing and self.interrupt_pending and self.user_code:
                self.interrupt_pending = False
                raise KeyboardInterrupt

    def emit(self, message: dict[str, Any]) -> None:
        """Send a message after whatever output is pending (so the order is the code's)."""
        self.enter()
        try:
            with self.lock:
                self.drain_pipes()
                self.flush()
                self.send(message)
        finally:
            self.leave()

    # --- output ------------------------------------------------------------------------------

    def add_output(self, name: str, text: str) -> None:
        """Queue ``text`` on stream ``name``; the caller holds the lock."""
        if not text:
            return
        if self.pending_name != name:
            self.flush()
            self.pending_name = name
            self.pending_since = time.monotonic()
            try:
                os.write(self.wake_write, b"x")  # the reader thread times the flush
            except BlockingIOError:
                pass
        self.pending.append(text)
        self.pending_size += len(text)
        if self.pending_size >= CHUNK:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        """Send the pending output (with ``whole_chunks``, only full CHUNKs); lock held."""
        if not self.pending:
            return
        text = "".join(self.pending)
        name = self.pending_name
        cut = len(text) - len(text) % CHUNK if whole_chunks else len(text)
        for start in range(0, cut, CHUNK):
            if self.current is not None:
                self.send({"type": name, "id": self.current, "text": text[start:start + CHUNK]})
        rest = text[cut:]
        self.pending = [rest] if rest else []
        self.pending_size = len(rest)
        if not rest:
            self.pending_name = None

    def write_stream(self, name: str, text: str) -> None:
        """sys.stdout/sys.stderr's write: after what the fds got before it."""
        self.enter()
        try:
            with self.lock:
                self.drain_pipes()
                self.add_output(name, text)
        finally:
            self.leave()

    def flush_now(self) -> None:
        """Send what is pending now (``print(..., flush=True)``, ``sys.stdout.flush()``)."""
        self.enter()
        try:
            with self.lock:
                self.drain_pipes()
                self.flush()
        finally:
            self.leave()

    def drain_pipes(self) -> None:
        """Read what the fd 1/2 pipes hold now (without blocking); lock held."""
        for fd, name in self.pipes.items():
            while self.pending_size < MAX_PENDING:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.add_output(name, self.decoders[fd].decode(data))

    def reader(self) -> None:
        """The thread that reads the fd 1/2 pipes and flushes coalesced output on time."""
        poller = select.poll()
        for fd in (*self.pipes, self.wake_read):
            poller.register(fd, select.POLLIN)
        while True:
            with self.lock:
                waited = time.monotonic() - self.pending_since
                if self.pending and waited >= FLUSH_INTERVAL:
                    self.flush()
                timeout = None if not self.pending else max(0.0, FLUSH_INTERVAL - waited) * 1000
            ready = poller.poll(timeout)
            with self.lock:
                for fd, _event in ready:
                    if fd == self.wake_read:
                        try:
                            os.read(self.wake_read, 4096)
                        except BlockingIOError:
                            pass
                self.drain_pipes()

    # --- commands ----------------------------------------------------------------------------

    def command_reader(self) -> None:
        """The thread reading the host's commands: executions are queued for the main thread;
        an interrupt for the running one is a SIGINT to the main thread at once."""
        buffer = b""
        while True:
            try:
                data = os.read(self.command_fd, 1 << 20)
            except InterruptedError:
                continue
            if not data:
                os._exit(0)  # the host went away: nothing would read what we say
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self.command(line)
            if len(buffer) > MAX_COMMAND:
                os._exit(3)

    def command(self, line: bytes) -> None:
        try:
            command = json.loads(line)
        except ValueError:
            return
        if not isinstance(command, dict):
            return
        if command.get("type") == "execute":
            with self.lock:
                self.queued.add(str(command.get("id", "")))
            self.commands.put(command)
        elif command.get("type") == "interrupt":
            with self.lock:
                if self.current is not None and command.get("id") == self.current:
                    signal.pthread_kill(self.main_thread, signal.SIGINT)
                elif command.get("id") in self.queued:
                    self.interrupted.add(command["id"])  # not started yet: it never will

    def on_sigint(self, signum: int, frame: object) -> None:
        if self.user_code and not self.writing:
            raise KeyboardInterrupt
        if self.user_code:
            self.interrupt_pending = True

    # --- executions --------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            command = self.commands.get()
            if command is None:
                return
            self.execute(command)

    def execute(self, command: dict[str, Any]) -> None:
        execution_id = str(command.get("id", ""))
        code = command.get("code")
        env = command.get("env") or {}
        if not isinstance(code, str) or not isinstance(env, dict):
            code, env = "", {}
        self.count += 1
        with self.lock:
            self.current = execution_id
            self.queued.discard(execution_id)
            self.send({"type": "start", "id": execution_id, "execution_count": self.count})
            if execution_id in self.interrupted:  # interrupted while it waited in the queue
                self.interrupted.discard(execution_id)
                code, env = "raise KeyboardInterrupt", {}
        saved: dict[str, str | None] = {}
        for name, value in env.items():
            if isinstance(name, str) and isinstance(value, str) and name and "=" not in name \
                    and "\0" not in name + value:
                saved.setdefault(name, os.environ.get(name))
                os.environ[name] = value
        try:
            self.run_cell(code)
        finally:
            for name, old in saved.items():
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
            self.finish(execution_id)

    def finish(self, execution_id: str) -> None:
        # The user's code may have replaced them; sys.__stdout__ is block-buffered on fd 1.
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        with self.lock:
            self.drain_pipes()
            self.flush()
            self.send({"type": "done", "id": execution_id})
            self.current = None

    def run_cell(self, code: str) -> None:
        filename = f"<cell {self.count}>"
        self.sources[filename] = code
        if "linecache" in sys.modules:  # else it is done when a traceback needs it
            self.register_sources()
        self.interrupt_pending = False
        try:
            self.user_code = True
            try:
                value = self.evaluate(code, filename)
                if value is not None:
                    self.namespace["_"] = value
                    self.emit({"type": "result", "id": self.current, "is_main_result": True,
                               "data": self.formats(value)})
            finally:
                self.user_code = False
        except BaseException as error:  # everything the user's code raises is its error
            self.report(error, filename)
        self.interrupt_pending = False

    def register_sources(self) -> None:
        import linecache

        for filename in list(self.sources)[self.registered:]:
            code = self.sources[filename]
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self.registered = len(self.sources)

    def evaluate(self, code: str, filename: str) -> object:
        """Run ``code``; the value of its last statement when that is an expression (unless
        it ends with ``;``, as in IPython). Code that is not Python only because of IPython's
        ``!command`` or ``%pip`` lines runs with those lines as shell commands."""
        flags = _ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        try:
            tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST | flags)
        except SyntaxError:
            escaped = shell_escapes(code)
            if escaped is None:
                raise
            tree = compile(escaped, filename, "exec", _ast.PyCF_ONLY_AST | flags)
        last: _ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], _ast.Expr):
            last = tree.body[-1].value
            del tree.body[-1]
        if tree.body:
            self.run_code(compile(tree, filename, "exec", flags=flags))
        if last is None:
            return None
        expression = _ast.Expression(last)
        value = self.run_code(compile(expression, filename, "eval", flags=flags))
        return None if code.rstrip().endswith(";") else value

    def system(self, command: str) -> None:
        """IPython's ``!command``: run by the shell, its output streamed like any child's."""
        import subprocess

        self.flush_now()
        shell = "/bin/bash" if os.path.exists("/bin/bash") else None
        subprocess.run(command, shell=True, executable=shell, check=False)

    def run_code(self, compiled: types.CodeType) -> object:
        result = eval(compiled, self.namespace)  # the user's code: running it is the point
        if compiled.co_flags & 0x80:  # CO_COROUTINE: top-level await
            import asyncio
            if self.loop is None or self.loop.is_closed():
                self.loop = asyncio.new_event_loop()
            result = self.loop.run_until_complete(result)
        return result

    def formats(self, value: object) -> dict[str, Any]:
        """The MIME bundle of ``value``: repr, and every ``_repr_*_`` it offers."""
        data: dict[str, Any] = {}
        notes: list[str] = []
        bundle = getattr(value, "_repr_mimebundle_", None)
        if callable(bundle) and not isinstance(value, type):
            offered = self.guarded(bundle)
            if isinstance(offered, tuple) and offered:
                offered = offered[0]
            if isinstance(offered, dict):
                for mime, item in offered.items():
                    if isinstance(mime, str):
                        data[mime] = item
        for method, mime in REPR_METHODS:
            function = getattr(value, method, None)
            if mime in data or not callable(function) or isinstance(value, type):
                continue
            item = self.guarded(function)
            if isinstance(item, tuple) and item:
                item = item[0]
            if item is not None:
                data[mime] = item
        for mime in list(data):
            item = data[mime]
            if mime in BINARY_TYPES and isinstance(item, (bytes, bytearray)):
                item = binascii.b2a_base64(bytes(item), newline=False).decode("ascii")
            try:
                encoded = item if isinstance(item, str) else json.dumps(item)
            except (TypeError, ValueError):
                del data[mime]
                notes.append(f"[{mime} dropped by vmcache: not JSON]")
                continue
            if len(encoded) > MAX_FORMAT:
                del data[mime]
                notes.append(f"[{mime} dropped by vmcache: {len(encoded)} characters]")
                continue
            data[mime] = item
        text = data.get("text/plain")
        if not isinstance(text, str):
            text = repr(value)
        data["text/plain"] = truncated(text, MAX_TEXT) + "".join("\n" + note for note in notes)
        return data

    def guarded(self, function: Any) -> object:
        try:
            return function()
        except KeyboardInterrupt:
            raise
        except Exception:
            return None

    def report(self, error: BaseException, filename: str) -> None:
        if isinstance(error, SyntaxError) and error.filename == filename:
            error.__traceback__ = None  # the parser's: its frames are the kernel's and ast's
        try:
            self.register_sources()
            lines = user_traceback(error)
        except Exception:
            lines = [f"{type(error).__name__}\n"]
        try:
            value = str(error)
        except Exception:
            value = "<the exception's str() failed>"
        self.emit({"type": "error", "id": self.current, "name": truncated(type(error).__name__, 1000),
                   "value": truncated(value, MAX_VALUE),
                   "traceback": truncated("".join(lines), MAX_TEXT, keep_end=True)})

    def display(self, *objects: object) -> None:
        """IPython's ``display()``: each object as a result that is not the main one."""
        for item in objects:
            self.emit({"type": "result", "id": self.current, "is_main_result": False,
                       "data": self.formats(item)})


def shell_escapes(code: str) -> str | None:
    """``code`` with IPython's ``!command`` and ``%pip ARGS`` lines turned into calls of the
    kernel's shell runner (one line for one, so line numbers hold); None if it has none."""
    lines = code.split("\n")
    changed = False
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        indent = line[:len(line) - len(stripped)]
        if stripped.startswith("!"):
            command = stripped[1:]
        elif stripped == "%pip" or stripped.startswith("%pip "):
            command = f"{sys.executable} -m pip {stripped[4:].strip()}"
        else:
            continue
        lines[index] = f"{indent}{SYSTEM_NAME}({command!r})"
        changed = True
    return "\n".join(lines) if changed else None


def user_traceback(error: BaseException) -> list[str]:
    """The traceback of ``error`` (and of its chain) without the kernel's own frames."""
    import traceback

    shown = traceback.TracebackException(type(error), error, error.__traceback__)
    seen: set[int] = set()
    pending = [shown]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        item.stack = traceback.StackSummary.from_list(
            [frame for frame in item.stack if frame.filename != KERNEL_FILE])
        pending += [linked for linked in (item.__cause__, item.__context__) if linked is not None]
    return list(shown.format())


class OutStream:
    """sys.stdout / sys.stderr: text goes to the kernel's stream, in order with the fds'."""

    def __init__(self, kernel: Kernel, name: str, fd: int) -> None:
        self.kernel = kernel
        self.name = name
        self.fd = fd
        self.encoding = "utf-8"
        self.errors = "replace"
        self.closed = False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.kernel.write_stream(self.name, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.kernel.flush_now()

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def buffer(self) -> Any:
        raise AttributeError("this stream has no binary buffer (write text, or to the fd)")


def main(argv: list[str]) -> int:
    cwd = argv[argv.index("--cwd") + 1] if "--cwd" in argv else os.path.expanduser("~")
    message_fd = os.dup(1)
    command_fd = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    kernel = Kernel(message_fd, command_fd)
    try:
        os.chdir(cwd)
    except OSError as error:
        kernel.send({"type": "startup_error",
                     "message": f"cannot use {cwd!r} as the working directory: {error.strerror}"})
        return 1
    for fd, name in ((1, "stdout"), (2, "stderr")):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        os.set_blocking(read_end, False)
        kernel.pipes[read_end] = name
        kernel.decoders[read_end] = codecs.getincrementaldecoder("utf-8")("replace")
    sys.stdout = OutStream(kernel, "stdout", 1)
    sys.stderr = OutStream(kernel, "stderr", 2)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.path.insert(0, "")
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = __builtins__
    module.__dict__["display"] = kernel.display
    module.__dict__[SYSTEM_NAME] = kernel.system
    kernel.own_module = sys.modules["__main__"]
    sys.modules["__main__"] = module
    kernel.namespace = module.__dict__
    signal.signal(signal.SIGINT, kernel.on_sigint)
    threading.Thread(target=kernel.reader, name="output", daemon=True).start()
    threading.Thread(target=kernel.command_reader, name="commands", daemon=True).start()
    kernel.send({"type": "ready", "pid": os.getpid()})
    kernel.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
