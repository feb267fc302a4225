"""envd's files on the host: ``filesystem.Filesystem`` and ``GET``/``POST /files``.

The filesystem calls go to one long-lived guest helper per sandbox (in_guest/e2b_fs.py,
started through the agent as root the first time a sandbox needs it, as envd runs as root):
a JSON line per request and per answer over its stdin/stdout, so a Stat costs one round trip
through the agent instead of starting a Python each time. Its watch events come on the same
stdout and are queued per watcher, bounded in count and bytes (:data:`MAX_WATCH_EVENTS`,
:data:`MAX_WATCH_BYTES`): a watcher nobody drains that far is ended with ``data_loss`` (and its
guest watch removed). Everything the helper sends is untrusted (the guest may be hostile): its
lines are bounded (:data:`MAX_HELPER_LINE`), big ones parsed in a worker thread, and each
watch event is checked for envd's shape before it is queued.

``GET /files`` streams the guest file through the agent's ``open_file`` (never whole in
memory); ``POST /files`` takes ``multipart/form-data`` (the Python SDK's and the JS SDK's
FormData; parsed here as it arrives, part headers bounded, each ``file`` part written through
the agent's ``write_file`` as its bytes come) or ``application/octet-stream`` (the SDKs'
streamed and gzip uploads, ``path`` in the query). A file uploaded for ``user`` is owned by
it, the directories made for it too, as envd does.
"""

from __future__ import annotations

import enum
import errno
import itertools
import json
import logging
import posixpath
import secrets
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from vmcache import e2b_message as m
from vmcache.agent_client import GuestFile, GuestProcess
from vmcache.e2b_connect import CallContext, Code, ConnectError
from vmcache.e2b_http import HttpError, HttpRequest, HttpResponse, json_response
from vmcache.e2b_process import keepalive_interval
from vmcache.e2b_users import DEFAULT_USER, lookup, resolve_path
from vmcache.errors import AgentError, GuestRequestError, printable

if TYPE_CHECKING:
    from vmcache.e2b_sandbox import SandboxRuntime

log = logging.getLogger(__name__)

#: The guest helper, as the guest's /init installs it.
HELPER_ARGV = ["/usr/bin/python3", "-I", "-S", "/run/vmcache/agent/e2b_fs.py", "serve"]
#: How long one helper call may take (a ListDir of a big tree included).
CALL_TIMEOUT = 60.0
#: Longest line the helper may send. A ListDir's answer is the largest; the helper answers
#: ``resource_exhausted`` ("list it with a smaller depth") rather than send a longer one
#: (in_guest/e2b_fs.py's MAX_ANSWER, the same bound), and splits watch events into lines
#: far shorter. A longer line ends the helper (it is restarted by the next call).
MAX_HELPER_LINE = 16 * 1024 * 1024
#: Lines at least this long are parsed in a worker thread, off the event loop.
PARSE_IN_THREAD = 256 * 1024
#: Events a watcher keeps until they are fetched (or streamed), and their bytes (names and
#: entries) at most: whichever comes first ends the watcher with ``data_loss``.
MAX_WATCH_EVENTS = 10_000
MAX_WATCH_BYTES = 4 * 1024 * 1024
#: Longest name or path in an event or entry from the guest (Linux's PATH_MAX).
MAX_GUEST_PATH = 4096
#: envd's EventType and FileType names, the only ones taken from the guest.
EVENT_TYPES = frozenset({"EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE", "EVENT_TYPE_REMOVE",
                         "EVENT_TYPE_RENAME", "EVENT_TYPE_CHMOD"})
FILE_TYPES = frozenset({"FILE_TYPE_UNSPECIFIED", "FILE_TYPE_FILE", "FILE_TYPE_DIRECTORY",
                        "FILE_TYPE_SYMLINK"})
#: Most watchers of a sandbox at once (the helper's own bound).
MAX_WATCHERS = 64
#: Deepest ListDir walked (a deeper one lists this far: no tree of a sandbox is deeper in practice).
MAX_DEPTH = 256
#: Bytes read from the guest per piece of a download.
DOWNLOAD_CHUNK = 256 * 1024
#: Longest a ``/files`` transfer may go without progress (a piece written to or read from the
#: guest, or the writer's end after the body): envd has no such bound, but a write to a named
#: pipe nobody reads, or a guest that stops answering, must not hold the handler, the guest
#: process and an HTTP slot until the sandbox ends. It is idle time, not a cap on the whole
#: transfer: the SDKs' own request timeout (60 s) is httpx's/fetch's per read and write, so a
#: big file that keeps moving is never cut. ``Connect-Timeout-Ms``'s deadline, when sent, is
#: a cap as well.
FILES_TIMEOUT = 60.0


def _code(value: object) -> Code:
    try:
        return Code(str(value))
    except ValueError:
        return Code.INTERNAL


def _guest_error(error: object) -> ConnectError:
    fields = error if isinstance(error, dict) else {}
    return ConnectError(_code(fields.get("code")), printable(str(fields.get("message", "failed"))[:2000]))


def parse_helper_line(line: bytes) -> dict[str, Any] | None:
    """One helper line as an object; None (logged by the caller) if it is not JSON, is nested
    too deep for the parser (RecursionError) or is not an object."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


#: EntryInfo's string fields and their longest accepted value (``size`` is an int64 as a string).
_ENTRY_STRINGS = {"name": MAX_GUEST_PATH, "path": MAX_GUEST_PATH, "symlinkTarget": MAX_GUEST_PATH,
                  "permissions": 64, "owner": 256, "group": 256, "modifiedTime": 64, "size": 24}


def checked_entry(value: object) -> dict[str, Any] | None:
    """A guest EntryInfo with only envd's fields, each of its type and bounded; None if any
    is wrong (a guest that sends it is broken or hostile)."""
    if not isinstance(value, dict):
        return None
    entry: dict[str, Any] = {}
    for name, limit in _ENTRY_STRINGS.items():
        field = value.get(name)
        if field is None and name == "symlinkTarget":
            continue
        if not isinstance(field, str) or len(field) > limit:
            return None
        entry[name] = field
    kind, mode = value.get("type"), value.get("mode")
    if kind not in FILE_TYPES or type(mode) is not int or not 0 <= mode <= 0o7777:
        return None
    if not entry["size"].isdigit():
        return None
    entry["type"], entry["mode"] = kind, mode
    return entry


def checked_event(value: object) -> tuple[dict[str, Any], int] | None:
    """A guest watch event (``name``, ``type``, optional ``entry``) in envd's shape and its
    size in bytes for the sink's bound; None if it is not one."""
    if not isinstance(value, dict):
        return None
    name, kind = value.get("name"), value.get("type")
    if not isinstance(name, str) or len(name) > MAX_GUEST_PATH or kind not in EVENT_TYPES:
        return None
    event: dict[str, Any] = {"name": name, "type": kind}
    size = 64 + len(name)
    if value.get("entry") is not None:
        entry = checked_entry(value["entry"])
        if entry is None:
            return None
        event["entry"] = entry
        size += 64 + sum(len(field) for field in entry.values() if isinstance(field, str))
    return event, size


@attrs.define(eq=False)
class WatchSink:
    """The events of one guest watch until they are taken; ``error`` ends it."""

    events: deque[dict[str, Any]] = attrs.Factory(deque)
    error: ConnectError | None = None
    changed: trio.Event = attrs.Factory(trio.Event)
    size: int = 0

    def add(self, events: list[tuple[dict[str, Any], int]]) -> bool:
        """Queue events (each with its size in bytes); False (and the sink ended, its events
        dropped) if that overflows it in count or in bytes."""
        if self.error is not None:
            return True
        size = self.size + sum(event_size for _, event_size in events)
        if len(self.events) + len(events) > MAX_WATCH_EVENTS or size > MAX_WATCH_BYTES:
            self.fail(ConnectError(Code.DATA_LOSS,
                                   f"watcher error: more than {MAX_WATCH_EVENTS} events or "
                                   f"{MAX_WATCH_BYTES // (1024 * 1024)} MiB of them were not fetched; "
                                   "the watch was stopped: watch the directory again"))
            return False
        self.events.extend(event for event, _ in events)
        self.size = size
        self._wake()
        return True

    def fail(self, error: ConnectError) -> None:
        """End the sink: ``error`` is all it has to say from now on (its events go)."""
        self.events.clear()
        self.size = 0
        if self.error is None:
            self.error = error
            self._wake()

    def take(self) -> list[dict[str, Any]]:
        events = list(self.events)
        self.events.clear()
        self.size = 0
        return events

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class HelperState(enum.Enum):
    """Where a sandbox's filesystem helper is."""

    STOPPED = "stopped"    # none yet, or the last one ended (``_failure`` says why): a call starts one
    STARTING = "starting"  # its task is opening the guest process
    RUNNING = "running"    # it answers calls


#: The helper's moves, all of them.
HELPER_TRANSITIONS: dict[HelperState, frozenset[HelperState]] = {
    HelperState.STOPPED: frozenset({HelperState.STARTING}),
    HelperState.STARTING: frozenset({HelperState.RUNNING, HelperState.STOPPED}),
    HelperState.RUNNING: frozenset({HelperState.STOPPED}),
}


class FsHelper:
    """The sandbox's guest filesystem helper (``context.sandbox.service(FsHelper)``)."""

    def __init__(self, sandbox: SandboxRuntime) -> None:
        self._sandbox = sandbox
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._watches: dict[int, WatchSink] = {}
        self.state = HelperState.STOPPED
        self._process: GuestProcess | None = None  # while RUNNING
        self._ready = trio.Event()  # set when a start ends (RUNNING or STOPPED again)
        self._starting = trio.Lock()
        self._writing = trio.Lock()
        self._failure = ""

    def _move(self, state: HelperState) -> None:
        if state not in HELPER_TRANSITIONS[self.state]:
            raise AssertionError(f"filesystem helper: {self.state.value} -> {state.value}")
        self.state = state

    async def _ensure(self) -> GuestProcess:
        async with self._starting:
            if self.state is HelperState.STOPPED:
                self._move(HelperState.STARTING)
                self._ready = trio.Event()
                self._sandbox.start_soon(self._run, self._ready)
            with trio.move_on_after(CALL_TIMEOUT):
                await self._ready.wait()
            if self.state is not HelperState.RUNNING or self._process is None:
                raise ConnectError(Code.UNAVAILABLE, "the guest's filesystem helper did not start"
                                                     + (f": {self._failure}" if self._failure else ""))
            return self._process

    async def _run(self, ready: trio.Event) -> None:
        """Own the helper process: read its lines, answer calls, feed watches."""
        try:
            agent = await self._sandbox.agent()
            async with agent.open_process(HELPER_ARGV, capture_stderr=False) as process:
                self._process = process
                self._move(HelperState.RUNNING)
                ready.set()
                assert process.stdout is not None
                buffer = bytearray()
                while chunk := await process.stdout.receive_some(256 * 1024):
                    searched = len(buffer)
                    buffer += chunk
                    while (end := buffer.find(b"\n", searched)) >= 0:
                        if end > MAX_HELPER_LINE:
                            break
                        line = bytes(buffer[:end])
                        del buffer[:end + 1]
                        searched = 0
                        if len(line) >= PARSE_IN_THREAD:
                            message = await trio.to_thread.run_sync(parse_helper_line, line)
                        else:
                            message = parse_helper_line(line)
                        self._dispatch(message)
                    if len(buffer) > MAX_HELPER_LINE:
                        raise ConnectError(Code.INTERNAL, "the filesystem helper sent a line over "
                                                          f"{MAX_HELPER_LINE} bytes")
                status = await process.wait()
                self._failure = (f"it exited with status {status} (is the guest image built by this "
                                 "vmcache? e2b_fs.py must be in it)")
        except (AgentError, ConnectError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._failure = str(error)
        except Exception as error:  # a task of the sandbox: a bug here must not end the sandbox
            log.error("sandbox %s: the filesystem helper's reader failed: %s", self._sandbox.id, error,
                      exc_info=error)
            self._failure = "it failed inside vmcache: the daemon's log has the details"
        finally:
            self._process = None
            self._move(HelperState.STOPPED)
            ready.set()
            lost = ConnectError(Code.UNAVAILABLE, "the guest's filesystem helper ended"
                                + (f": {self._failure}" if self._failure else ""))
            for reply in self._pending.values():
                reply.close()
            self._pending.clear()
            for sink in self._watches.values():
                sink.fail(lost)
            self._watches.clear()

    def _dispatch(self, message: dict[str, Any] | None) -> None:
        if message is None:
            log.warning("sandbox %s: the filesystem helper sent a line that is not a JSON object",
                        self._sandbox.id)
            return
        ident = message.get("id")
        if isinstance(ident, int) and ident in self._pending:
            try:
                self._pending[ident].send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError):
                pass
            return
        watch = message.get("watch")
        if isinstance(watch, int) and watch in self._watches:
            sink = self._watches[watch]
            if "error" in message:
                sink.fail(_guest_error(message["error"]))
                self._watches.pop(watch, None)
            else:
                events = message.get("events")
                checked = [event for event in map(checked_event, events) if event is not None
                           ] if isinstance(events, list) else []
                if isinstance(events, list) and len(checked) < len(events):
                    log.warning("sandbox %s: the filesystem helper sent %d watch events not in envd's "
                                "shape (dropped)", self._sandbox.id, len(events) - len(checked))
                if checked and not sink.add(checked):
                    self._watches.pop(watch, None)
                    self._sandbox.start_soon(self._unwatch_quietly, watch)

    async def call(self, op: str, **fields: object) -> dict[str, Any]:
        """One helper operation; its error as envd's ConnectError."""
        process = await self._ensure()
        ident = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[ident] = send
        try:
            line = json.dumps({"id": ident, "op": op, **fields}, separators=(",", ":")).encode() + b"\n"
            assert process.stdin is not None
            with trio.move_on_after(CALL_TIMEOUT) as waited:
                async with self._writing:
                    try:
                        await process.stdin.send_all(line)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, AgentError) as error:
                        raise ConnectError(Code.UNAVAILABLE, f"the guest's filesystem helper is gone: {error}"
                                           ) from None
                try:
                    reply = await receive.receive()
                except trio.EndOfChannel:
                    raise ConnectError(Code.UNAVAILABLE, "the guest's filesystem helper ended"
                                       + (f": {self._failure}" if self._failure else "")) from None
            if waited.cancelled_caught:
                raise ConnectError(Code.DEADLINE_EXCEEDED, f"the guest's filesystem helper did not "
                                                           f"answer {op} within {CALL_TIMEOUT:g} s")
        finally:
            self._pending.pop(ident, None)
        if "error" in reply:
            raise _guest_error(reply["error"])
        result = reply.get("ok")
        return result if isinstance(result, dict) else {}

    async def watch(self, path: str, recursive: bool, include_entry: bool) -> tuple[int, WatchSink]:
        if len(self._watches) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"more than {MAX_WATCHERS} watchers in this sandbox")
        ident = next(self._ids)
        sink = WatchSink()
        self._watches[ident] = sink
        try:
            await self.call("watch", watch=ident, path=path, recursive=recursive, include_entry=include_entry)
        except BaseException:
            self._watches.pop(ident, None)
            raise
        return ident, sink

    async def unwatch(self, ident: int) -> None:
        self._watches.pop(ident, None)
        if self.state is HelperState.RUNNING:
            await self.call("unwatch", watch=ident)

    async def _unwatch_quietly(self, ident: int) -> None:
        try:
            await self.unwatch(ident)
        except ConnectError:
            pass


class Watchers:
    """CreateWatcher's watchers of one sandbox, by id (``context.sandbox.service(Watchers)``)."""

    def __init__(self, sandbox: SandboxRuntime) -> None:
        #: At most :data:`MAX_WATCHERS`; one whose failure GetWatcherEvents reported is dropped.
        self.by_id: dict[str, tuple[int, WatchSink]] = {}


# --- filesystem.Filesystem ------------------------------------------------------------------


def _entry(result: Mapping[str, Any]) -> dict[str, Any]:
    entry = checked_entry(result.get("entry"))
    if entry is None:
        raise ConnectError(Code.INTERNAL, "the guest's filesystem helper answered an entry not in "
                                          "envd's shape")
    return entry


def _entries(values: object) -> list[dict[str, Any]]:
    """A ListDir answer's entries, each checked (the ones not in envd's shape dropped)."""
    if not isinstance(values, list):
        return []
    return [entry for entry in map(checked_entry, values) if entry is not None]


def _path(request: Mapping[str, Any], context: CallContext, name: str = "path") -> str:
    return resolve_path(context.user, m.get_str(request, name))


async def stat(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/Stat``."""
    result = await context.sandbox.service(FsHelper).call("stat", path=_path(request, context))
    return {"entry": _entry(result)}


async def list_dir(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/ListDir``: entries down to ``depth`` (0 means 1), not following
    symlinks below the directory, paths under the one asked for."""
    depth = min(m.get_int(request, "depth") or 1, MAX_DEPTH)
    result = await context.sandbox.service(FsHelper).call("list", path=_path(request, context), depth=depth)
    entries = result.get("entries")
    if isinstance(entries, list) and len(entries) > 1000:
        return {"entries": await trio.to_thread.run_sync(_entries, entries)}
    return {"entries": _entries(entries)}


async def make_dir(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/MakeDir``: with its parents, owned by the user."""
    user = lookup(context.user)
    result = await context.sandbox.service(FsHelper).call(
        "mkdir", path=_path(request, context), uid=user.uid, gid=user.gid)
    return {"entry": _entry(result)}


async def move(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/Move``: a rename; the destination's directories are made."""
    user = lookup(context.user)
    result = await context.sandbox.service(FsHelper).call(
        "move", source=_path(request, context, "source"), destination=_path(request, context, "destination"),
        uid=user.uid, gid=user.gid)
    return {"entry": _entry(result)}


async def remove(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/Remove``: recursive; a path that is not there is no error (envd's
    RemoveAll)."""
    await context.sandbox.service(FsHelper).call("remove", path=_path(request, context))
    return {}


def _watch_args(request: Mapping[str, Any], context: CallContext) -> tuple[str, bool, bool]:
    m.get_bool(request, "allowNetworkMounts")  # a vmcache guest has none to refuse
    return (_path(request, context), m.get_bool(request, "recursive"), m.get_bool(request, "includeEntry"))


async def watch_dir(request: dict[str, Any], context: CallContext
                    ) -> AsyncGenerator[dict[str, Any], None]:
    """``filesystem.Filesystem/WatchDir`` (server stream): start, then each event as it comes,
    keepalives between; the guest watch is removed when the client goes away."""
    helper = context.sandbox.service(FsHelper)
    path, recursive, include_entry = _watch_args(request, context)
    ident, sink = await helper.watch(path, recursive, include_entry)
    interval = keepalive_interval(context)
    try:
        yield {"start": {}}
        while True:
            events = sink.take()
            if events:
                for event in events:
                    yield {"filesystem": event}
                continue
            if sink.error is not None:
                raise sink.error
            changed = sink.changed
            with trio.move_on_after(interval) as waited:
                await changed.wait()
            if waited.cancelled_caught:
                yield {"keepalive": {}}
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await helper.unwatch(ident)
            except ConnectError:
                pass


async def create_watcher(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/CreateWatcher``: a watch whose events GetWatcherEvents takes."""
    path, recursive, include_entry = _watch_args(request, context)
    watchers = context.sandbox.service(Watchers)
    if len(watchers.by_id) >= MAX_WATCHERS:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, f"more than {MAX_WATCHERS} watchers in this sandbox: "
                                                    "remove some with RemoveWatcher")
    ident, sink = await context.sandbox.service(FsHelper).watch(path, recursive, include_entry)
    watcher_id = "w" + secrets.token_hex(8)
    watchers.by_id[watcher_id] = (ident, sink)
    return {"watcherId": watcher_id}


def _watcher(request: Mapping[str, Any], context: CallContext) -> tuple[str, int, WatchSink]:
    watcher_id = m.get_str(request, "watcherId")
    found = context.sandbox.service(Watchers).by_id.get(watcher_id)
    if found is None:
        raise ConnectError(Code.NOT_FOUND, f"watcher with id {watcher_id[:64]} not found")
    return watcher_id, found[0], found[1]


async def get_watcher_events(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/GetWatcherEvents``: the events since the last call."""
    watcher_id, _, sink = _watcher(request, context)
    if sink.error is not None:
        del context.sandbox.service(Watchers).by_id[watcher_id]  # reported: nothing more to say
        raise sink.error
    return {"events": sink.take()}


async def remove_watcher(request: dict[str, Any], context: CallContext) -> dict[str, Any]:
    """``filesystem.Filesystem/RemoveWatcher``."""
    watcher_id, ident, _ = _watcher(request, context)
    del context.sandbox.service(Watchers).by_id[watcher_id]
    try:
        await context.sandbox.service(FsHelper).unwatch(ident)
    except ConnectError:
        pass  # the helper is gone: so is the watch
    return {}


# --- GET/POST /files ---------------------------------------------------------------------------


def _files_user(request: HttpRequest) -> str:
    """The ``username`` query parameter, else envd's default user; 401 for an unknown one (as
    envd answers a failed user lookup)."""
    name = request.query_value("username") or DEFAULT_USER
    try:
        lookup(name)
    except ConnectError as error:
        raise HttpError(401, f"error looking up user '{printable(name[:64])}': {error.message}") from None
    return name


def _idle_deadline(context: CallContext) -> float:
    """When a /files transfer that makes no more progress from now gives up."""
    deadline = trio.current_time() + FILES_TIMEOUT
    return deadline if context.deadline is None else min(deadline, context.deadline)


def content_disposition(name: str) -> str:
    """``inline`` with the file's name as RFC 6266 says (HTTP header values are ASCII): a
    plain ``filename`` (non-ASCII characters as ``_``) and, for a name that is not plain
    ASCII, ``filename*=UTF-8''...`` percent-encoded, which clients prefer."""
    from urllib.parse import quote

    shown = printable(name)
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in shown)
    if fallback == shown:
        return f'inline; filename="{fallback}"'
    return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{quote(shown, safe='')}"


def _files_path(user: str, path: str | None) -> str:
    try:
        return resolve_path(user, path)
    except ConnectError as error:
        raise HttpError(400, f"error expanding and resolving path: {error.message}") from None


async def handle_files(request: HttpRequest, context: CallContext) -> HttpResponse:
    """``GET /files`` (download) and ``POST /files`` (upload), as envd answers them."""
    if request.method == "GET":
        return await _download(request, context)
    if request.method == "POST":
        return await _upload(request, context)
    raise HttpError(405, f"/files takes GET or POST, not {request.method}")


async def _download(request: HttpRequest, context: CallContext) -> HttpResponse:
    user = _files_user(request)
    path = _files_path(user, request.query_value("path"))
    agent = await context.sandbox.agent()
    opened = agent.open_file(path)
    try:
        with trio.fail_at(_idle_deadline(context)):
            file = await opened.__aenter__()
    except trio.TooSlowError:
        raise HttpError(500, f"error opening file '{path}': the guest did not open it within "
                             f"{FILES_TIMEOUT:g} s (context deadline exceeded)") from None
    except GuestRequestError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise HttpError(404, f"path '{path}' does not exist") from None
        if error.errno == errno.EISDIR or "not a regular file" in error.message:
            raise HttpError(400, f"path '{path}' is a directory") from None
        raise HttpError(500, f"error opening file '{path}': {error.message}") from None

    headers = [("content-type", "application/octet-stream"),
               ("content-disposition", content_disposition(posixpath.basename(path)))]
    return HttpResponse(200, headers, _FileBody(file, opened, context))


class _FileBody:
    """A download's body: the guest file's pieces; closing it (at the end, or when the client
    went away, even before the first piece) lets the guest file go."""

    def __init__(self, file: GuestFile, opened: AbstractAsyncContextManager[GuestFile],
                 context: CallContext) -> None:
        self._file = file
        self._opened: AbstractAsyncContextManager[GuestFile] | None = opened
        self._context = context

    def __aiter__(self) -> _FileBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = b""
        if self._opened is not None:
            try:
                with trio.fail_at(_idle_deadline(self._context)):
                    chunk = await self._file.receive_some(DOWNLOAD_CHUNK)
            except trio.TooSlowError:
                await self.aclose()
                raise  # too late for a status: the stream is cut, which the client sees
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            with trio.CancelScope(shield=True):
                await opened.__aexit__(None, None, None)


async def _upload(request: HttpRequest, context: CallContext) -> HttpResponse:
    user = _files_user(request)
    content_type = request.headers.get("content-type") or ""
    media, params = parse_header_value(content_type)
    query_path = request.query_value("path")
    uploader = _Uploader(context, user)
    if media == "application/octet-stream":
        if query_path is None:
            raise HttpError(400, "path query parameter is required for raw body upload")
        encoding = (request.headers.get("content-encoding") or "identity").lower()
        if encoding not in ("identity", "gzip"):
            raise HttpError(400, f"unsupported content encoding: {encoding}")
        chunks = request.body_chunks()
        await uploader.write(_files_path(user, query_path), _gunzip(chunks) if encoding == "gzip" else chunks)
    elif media.startswith("multipart/"):
        boundary = params.get("boundary")
        if not boundary or len(boundary) > 200:
            raise HttpError(500, "error parsing multipart form: no multipart boundary param in Content-Type")
        await _multipart_upload(request, uploader, boundary.encode("latin-1", "replace"), query_path)
    else:
        raise HttpError(400, f"unsupported content type: {content_type[:100]}, expected multipart/form-data "
                             "or application/octet-stream")
    return json_response(200, uploader.written)


#: How an upload is written in the guest: in place, truncated (envd's O_TRUNC), so that a
#: watcher sees the file itself and never a temporary name; then owned by the user, as envd
#: chowns it. The path and owner come as arguments, never through the shell's parser.
WRITE_ARGV = ["/bin/sh", "-c", 'cat > "$1" && chown "$2" "$1"', "e2b-upload"]


class _Uploader:
    def __init__(self, context: CallContext, user: str) -> None:
        self.context = context
        self.user = lookup(user)
        self.written: list[dict[str, str]] = []

    async def write(self, path: str, data: AsyncIterator[bytes]) -> None:
        """One file: its directories made (owned by the user), then its bytes as they come."""
        if any(entry["path"] == path for entry in self.written):
            raise HttpError(400, f"you cannot upload multiple files to the same path '{path}' in one upload "
                                 "request, only the first specified file was uploaded")
        helper = self.context.sandbox.service(FsHelper)
        try:
            await helper.call("prepare_upload", path=path, uid=self.user.uid, gid=self.user.gid)
            agent = await self.context.sandbox.agent()
            argv = [*WRITE_ARGV, path, f"{self.user.uid}:{self.user.gid}"]
            # Each piece moved pushes the deadline on; leaving the block kills the writer.
            with trio.CancelScope(deadline=_idle_deadline(self.context)) as idle:
                async with agent.open_process(argv, capture_stdout=False) as process:
                    assert process.stdin is not None
                    try:
                        async for chunk in data:
                            await process.stdin.send_all(chunk)
                            idle.deadline = _idle_deadline(self.context)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the writer is gone: its status and stderr say why
                    idle.deadline = _idle_deadline(self.context)
                    await process.stdin.aclose()
                    problem = await _read_some(process.stderr, 4096)
                    status = await process.wait()
            if idle.cancelled_caught:
                raise HttpError(500, f"error writing file '{path}': no progress for {FILES_TIMEOUT:g} s "
                                     "(is it a named pipe nobody reads?): context deadline exceeded")
        except ConnectError as error:
            status_code = {Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.PERMISSION_DENIED: 403,
                           Code.RESOURCE_EXHAUSTED: 507}.get(error.code, 500)
            raise HttpError(status_code, error.message) from None
        except GuestRequestError as error:
            raise HttpError(500, f"error writing file: {error.message}") from None
        if status != 0:
            text = printable(problem.decode("utf-8", "replace").strip())[:500] or f"status {status}"
            lowered = text.lower()
            code = 400 if "is a directory" in lowered or "not a directory" in lowered else \
                507 if "no space" in lowered or "quota" in lowered else 500
            raise HttpError(code, f"error writing file '{path}': {text}")
        self.written.append({"name": posixpath.basename(path), "type": "file", "path": path})


async def _read_some(stream: trio.abc.ReceiveStream | None, limit: int) -> bytes:
    """Up to ``limit`` bytes of a small output, to its end (what is beyond is dropped)."""
    if stream is None:
        return b""
    data = b""
    while chunk := await stream.receive_some(65536):
        if len(data) < limit:
            data += chunk[:limit - len(data)]
    return data


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    inflater = zlib.decompressobj(wbits=31)
    try:
        async for chunk in chunks:
            while chunk:
                yield inflater.decompress(chunk, 1024 * 1024)
                chunk = inflater.unconsumed_tail
        yield inflater.flush()
    except zlib.error as error:
        raise HttpError(400, f"error decompressing request body: {error}") from None


async def _multipart_upload(request: HttpRequest, uploader: _Uploader, boundary: bytes,
                            query_path: str | None) -> None:
    """Each ``file`` part written as its bytes arrive: write_file pulls the part's data from
    the parser, which pulls the request body (one task, nothing buffered beyond a piece)."""
    events = _PartEvents(request.body_chunks(), MultipartParser(boundary))
    while (event := await events.next()) is not None:
        if not isinstance(event, PartStart):
            continue
        name, filename = event.disposition()
        if name != "file":
            continue
        path_text = query_path if query_path is not None else filename
        if path_text is None:
            raise HttpError(400, "error getting multipart custom part file name: filename not "
                                 "found in Content-Disposition header")
        await uploader.write(_files_path(uploader.user.name, path_text), _PartBody(events))


class _PartEvents:
    """The parser's events, pulled from the request body as they are asked for."""

    def __init__(self, chunks: AsyncIterator[bytes], parser: MultipartParser) -> None:
        self._chunks = chunks
        self._parser = parser
        self._events: deque[MultipartEvent] = deque()
        self._done = False

    async def next(self) -> MultipartEvent | None:
        while not self._events:
            if self._done:
                return None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._done = True
                self._parser.close()
                return None
            self._events.extend(self._parser.feed(chunk))
        return self._events.popleft()


class _PartBody:
    """One part's bytes as an async iterator (for write_file), up to its end."""

    def __init__(self, events: _PartEvents) -> None:
        self._events = events
        self._ended = False

    def __aiter__(self) -> _PartBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._ended:
            event = await self._events.next()
            if isinstance(event, PartData):
                return event.data
            if isinstance(event, PartEnd):
                self._ended = True
            else:
                raise HttpError(400, "error reading form: a part did not end before the next one")
        raise StopAsyncIteration


# --- multipart/form-data, streaming -------------------------------------------------------------

#: Longest header block of one part.
MAX_PART_HEADERS = 16 * 1024
#: Most parts in one body.
MAX_PARTS = 1000


@attrs.frozen
class PartStart:
    headers: dict[str, str]

    def disposition(self) -> tuple[str | None, str | None]:
        """The part's form ``name`` and ``filename`` (the full path: envd does not strip it)."""
        _, params = parse_header_value(self.headers.get("content-disposition", ""))
        return params.get("name"), params.get("filename")


@attrs.frozen
class PartData:
    data: bytes


@attrs.frozen
class PartEnd:
    pass


MultipartEvent = PartStart | PartData | PartEnd


class MultipartParser:
    """RFC 7578 bodies parsed as they arrive (sans I/O): ``feed`` returns the events the bytes
    so far complete; a delimiter split across pieces is found all the same (the last bytes
    that could start one are held back). Bad input is HttpError(400)."""

    def __init__(self, boundary: bytes, *, max_headers: int = MAX_PART_HEADERS,
                 max_parts: int = MAX_PARTS) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")  # so that a delimiter at the very start is found too
        self._state = "preamble"
        self._max_headers = max_headers
        self._max_parts = max_parts
        self._parts = 0

    def feed(self, data: bytes) -> list[MultipartEvent]:
        self._buffer += data
        events: list[MultipartEvent] = []
        while True:
            before = (self._state, len(self._buffer))
            if self._state == "preamble":
                at = self._find_delimiter()
                if at is None:
                    break
                if at < 0:
                    keep = len(self._delimiter)
                    if len(self._buffer) > keep:
                        del self._buffer[:len(self._buffer) - keep]
                else:
                    del self._buffer[:at + len(self._delimiter)]
                    self._state = "after_delimiter"
            elif self._state == "after_delimiter":
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] == b"--":
                    self._state = "epilogue"
                    continue
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 256:
                        raise HttpError(400, "error reading form: malformed multipart delimiter line")
                    break
                if self._buffer[:end].strip(b" \t"):
                    raise HttpError(400, "error reading form: malformed multipart delimiter line")
                del self._buffer[:end + 2]
                self._state = "headers"
            elif self._state == "headers":
                end = self._buffer.find(b"\r\n\r\n") if not self._buffer.startswith(b"\r\n") else -2
                if end == -1:
                    if len(self._buffer) > self._max_headers:
                        raise HttpError(400, f"error reading form: a part's headers are over "
                                             f"{self._max_headers} bytes")
                    break
                if end > self._max_headers:
                    raise HttpError(400, "error reading form: a part's headers are over "
                                         f"{self._max_headers} bytes")
                block = bytes(self._buffer[:max(end, 0)])
                del self._buffer[:max(end, 0) + (4 if end >= 0 else 2)]
                self._parts += 1
                if self._parts > self._max_parts:
                    raise HttpError(400, f"error reading form: more than {self._max_parts} parts")
                events.append(PartStart(_parse_headers(block)))
                self._state = "body"
            elif self._state == "body":
                at = self._find_delimiter()
                if at is None:
                    # A delimiter may start here: hand out what is before it, wait for more.
                    start = self._buffer.find(self._delimiter)
                    if start > 0:
                        events.append(PartData(bytes(self._buffer[:start])))
                        del self._buffer[:start]
                    break
                if at >= 0:
                    if at:
                        events.append(PartData(bytes(self._buffer[:at])))
                    del self._buffer[:at + len(self._delimiter)]
                    events.append(PartEnd())
                    self._state = "after_delimiter"
                else:
                    safe = len(self._buffer) - len(self._delimiter)
                    if safe > 0:
                        events.append(PartData(bytes(self._buffer[:safe])))
                        del self._buffer[:safe]
            elif self._state == "epilogue":
                self._buffer.clear()
            if (self._state, len(self._buffer)) == before:
                break
        return events

    def _find_delimiter(self) -> int | None:
        """Where the first delimiter starts (``-1``: none yet, None: undecided until more
        comes). As Go's reader: ``\r\n--boundary`` followed by anything but ``-``, space,
        tab or a line end is part of the data."""
        start = 0
        while (at := self._buffer.find(self._delimiter, start)) >= 0:
            after = at + len(self._delimiter)
            if after >= len(self._buffer):
                return None
            if self._buffer[after] in b"- \t\r\n":
                return at
            start = at + 1
        return -1

    def close(self) -> None:
        """The body ended: HttpError(400) unless the closing delimiter came."""
        if self._state != "epilogue":
            raise HttpError(400, "error reading form: the multipart body ended before its closing boundary")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise HttpError(400, "error reading form: malformed part header")
        headers[name.strip().lower()] = value.strip()
    return headers


def parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """``type/sub; a=b; c="d e"`` as (lower-case type, params): quoted strings with backslash
    escapes, and RFC 5987 ``name*=UTF-8''...`` values (which win over plain ones)."""
    from urllib.parse import unquote

    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    i = 0
    while i < len(rest):
        while i < len(rest) and rest[i] in " \t;":
            i += 1
        start = i
        while i < len(rest) and rest[i] not in "=;":
            i += 1
        key = rest[start:i].strip().lower()
        if i >= len(rest) or rest[i] != "=":
            continue
        i += 1
        while i < len(rest) and rest[i] in " \t":
            i += 1
        if i < len(rest) and rest[i] == '"':
            i += 1
            out = []
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                out.append(rest[i])
                i += 1
            i += 1
            item = "".join(out)
        else:
            start = i
            while i < len(rest) and rest[i] != ";":
                i += 1
            item = rest[start:i].strip()
        if key.endswith("*"):
            charset, _, encoded = item.partition("''")
            try:
                extended[key[:-1]] = unquote(encoded, encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                pass
        elif key:
            params[key] = item
    params.update(extended)
    return head.strip().lower(), params
