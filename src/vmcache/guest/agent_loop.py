"""The guest agent's event loop (epoll), and what every request handler shares."""

from __future__ import annotations

import fcntl
import heapq
import os
import select
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vmcache.guest.agent_session import Session

AGENT_VERSION = "2.0.0"

#: A session stops reading process output while this much waits to go to the host.
OUT_LIMIT = 512 * 1024


def log(message: str) -> None:
    try:
        os.write(2, ("vmcache-agent: " + message.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def log_exception(what: str) -> None:
    log(what + "\n" + traceback.format_exc())


def os_error_text(error: OSError) -> str:
    return error.strerror or str(error)


# --- Event loop ----------------------------------------------------------------------------------


class Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """A minimal epoll loop: per-fd read and write callbacks, timers, soon-callbacks."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._soon: deque[Callable[[], None]] = deque()
        self._sequence = 0
        self.running = True

    def _update(self, fd: int) -> None:
        mask = select.EPOLLIN if fd in self._readers else 0
        if fd in self._writers:
            mask |= select.EPOLLOUT
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        try:
            if not mask:
                del self._masks[fd]
                self._epoll.unregister(fd)
            elif not old:
                self._epoll.register(fd, mask)
                self._masks[fd] = mask
            else:
                self._epoll.modify(fd, mask)
                self._masks[fd] = mask
        except OSError as error:
            log(f"epoll on fd {fd}: {os_error_text(error)}")

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (call before closing it)."""
        self.remove_reader(fd)
        self.remove_writer(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        self._sequence += 1
        heapq.heappush(self._timers, (timer.deadline, self._sequence, timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    def _run_callback(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log_exception("error in the event loop (carrying on)")

    def run_once(self) -> None:
        if self._soon:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, min(60.0, self._timers[0][0] - time.monotonic()))
        else:
            timeout = 60.0
        for fd, events in self._epoll.poll(timeout):
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                reader = self._readers.get(fd)
                if reader is not None:
                    self._run_callback(reader)
            if events & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
                writer = self._writers.get(fd)
                if writer is not None:
                    self._run_callback(writer)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                self._run_callback(timer.callback)
        for _ in range(len(self._soon)):
            self._run_callback(self._soon.popleft())


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)



class RequestFailed(Exception):
    """A request that the agent answers with an error (its message goes to the host)."""

    def __init__(self, message: str, error_number: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = error_number


def _get(body: dict[str, Any], key: str, kind: Any, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestFailed(f"bad request: {key!r} has the wrong type")
    return value


def _fs_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        raise RequestFailed(f"bad request: {what} is not text")
    if b"\0" in value:
        raise RequestFailed(f"bad request: {what} contains a NUL byte")
    return value


# --- Streams -------------------------------------------------------------------------------------


class Stream:
    """One stream of a session: a process or a file transfer."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.id = stream_id

    def on_data(self, channel: int, data: memoryview) -> None:
        raise RequestFailed(f"DATA on channel {channel} of a stream that takes none")

    def on_eof(self, channel: int) -> None:
        pass

    def on_window(self, channel: int, increment: int) -> None:
        pass

    def on_control(self, body: dict[str, Any]) -> None:
        raise RequestFailed("this stream takes no CONTROL")

    def close(self) -> None:
        """The host reset the stream, or the session ended: release everything now."""

    def finish(self) -> None:
        self.session.streams.pop(self.id, None)
