"""What the guest agent's request handlers share: logging, errors, the stream they extend."""

from __future__ import annotations

import fcntl
import os
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmcache.in_guest.vmcache_agent import Session

AGENT_VERSION = "2.1.0"

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


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


class RequestFailed(Exception):
    """A request or stream that the agent answers with an error (its message goes to the host)."""

    def __init__(self, message: str, error_number: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = error_number

    @classmethod
    def from_os(cls, what: str, error: OSError) -> RequestFailed:
        """``what`` failed with ``error``: its message and errno."""
        return cls(f"{what}: {os_error_text(error)}", error.errno)


def fs_bytes(text: str | bytes) -> bytes:
    """A path or argument as the kernel takes it (the wire's text is UTF-8 with surrogateescape)."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def shown(path: bytes) -> str:
    return path.decode("utf-8", "replace")


class Stream:
    """One stream of a session that outlives its request: a process or a file transfer.

    Subclasses have a method for each event they take (``on_data``, ``on_eof``,
    ``on_window``, ``on_signal``, ``on_resize``: the session's ``STREAM_EVENTS``);
    the connection has checked that the event is legal for the stream (its
    channels, its state), so they only act on it.
    """

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.id = stream_id

    def close(self) -> None:
        """The host reset the stream, or the session ended: release everything now."""

    def finish(self) -> None:
        self.session.streams.pop(self.id, None)
