"""Files the host writes into the guest or reads from it, under credit."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
    from vmcache.guest import agent_loop as base
    from vmcache.guest.agent_session import Session
else:
    import agent_loop as base
    import agent_protocol as ap

#: Credit the agent grants for a file being written.
FILE_WINDOW = 4 * 1024 * 1024


class WriteFileStream(base.Stream):
    """A file the host sends: written to a temporary name, renamed into place at EOF."""

    def __init__(self, session: Session, stream_id: int, body: dict[str, Any]) -> None:
        super().__init__(session, stream_id)
        self.path = base._fs_bytes(base._get(body, "path", str), "path")
        if not self.path.startswith(b"/"):
            raise base.RequestFailed("the path must be absolute")
        self.mode = base._get(body, "mode", int, 0o644) & 0o7777
        self.window = ap.ReceiveWindow(FILE_WINDOW)
        self.size = 0
        self.fd: int | None = None
        self.temp: bytes | None = None
        self.failed = False

    def start(self) -> None:
        directory, name = os.path.split(self.path)
        try:
            os.makedirs(directory or b"/", 0o755, exist_ok=True)
            self.temp = os.path.join(directory, b"." + name + b".vmcache-" + os.urandom(6).hex().encode())
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as error:
            self.temp = None
            raise base.RequestFailed(f"cannot write {self.path.decode('utf-8', 'replace')} in the guest: "
                                     f"{base.os_error_text(error)}", error.errno) from None
        self.session.send(ap.encode_reply(self.id, {"window": FILE_WINDOW}))

    def on_data(self, channel: int, data: memoryview) -> None:
        if channel != ap.STDIN:
            raise base.RequestFailed(f"DATA on channel {channel} of a file being written")
        self.window.received(len(data))
        if not self.failed and self.fd is not None:
            try:
                view = data
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
                self.size += len(data)
            except OSError as error:
                self._fail(error)
        increment = self.window.consumed(len(data))
        if increment and not self.failed:
            self.session.send(ap.encode_window(self.id, ap.STDIN, increment))

    def on_eof(self, channel: int) -> None:
        if self.failed or self.fd is None or self.temp is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.fchmod(fd, self.mode)
            os.close(fd)
            os.rename(self.temp, self.path)
        except OSError as error:
            self._fail(error)
            return
        self.temp = None
        self.session.send(ap.encode_end(self.id, {"size": self.size}))
        self.finish()

    def _fail(self, error: OSError) -> None:
        self.failed = True
        self.session.send(ap.encode_end(self.id, {
            "error": f"cannot write {self.path.decode('utf-8', 'replace')} in the guest: "
                     f"{base.os_error_text(error)}",
            "errno": error.errno or 0,
        }))
        self.close()
        self.finish()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.temp is not None:
            try:
                os.unlink(self.temp)
            except OSError:
                pass
            self.temp = None


class ReadFileStream(base.Stream):
    """A file the host reads: its mode and size, then its bytes as credit allows."""

    def __init__(self, session: Session, stream_id: int, body: dict[str, Any]) -> None:
        super().__init__(session, stream_id)
        self.path = base._fs_bytes(base._get(body, "path", str), "path")
        self.credit = ap.SendCredit(base._get(body, "window", int, ap.DEFAULT_WINDOW))
        self.fd: int | None = None
        self.size = 0
        self.scheduled = False

    def start(self) -> None:
        shown = self.path.decode("utf-8", "replace")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            info = os.fstat(self.fd)
        except OSError as error:
            self.close()
            raise base.RequestFailed(f"cannot read {shown} in the guest: {base.os_error_text(error)}",
                                     error.errno) from None
        if not stat.S_ISREG(info.st_mode):
            self.close()
            raise base.RequestFailed(f"cannot read {shown} in the guest: not a regular file")
        reply = {"mode": stat.S_IMODE(info.st_mode), "size": info.st_size}
        self.session.send(ap.encode_reply(self.id, reply))
        self.schedule()

    def schedule(self) -> None:
        if not self.scheduled and self.fd is not None:
            self.scheduled = True
            self.session.loop.call_soon(self.pump)

    def pump(self) -> None:
        """Read one chunk if there is credit and room; runs again soon while it can."""
        self.scheduled = False
        session = self.session
        if self.fd is None or session.streams.get(self.id) is not self:
            return
        if self.credit.available <= 0:
            return  # a WINDOW reschedules
        if session.out_bytes >= base.OUT_LIMIT:
            session.waiting_outputs.add(self)
            return
        try:
            data = os.read(self.fd, min(self.credit.available, ap.CHUNK))
        except OSError as error:
            session.send(ap.encode_end(self.id, {
                "error": f"cannot read {self.path.decode('utf-8', 'replace')} in the guest: "
                         f"{base.os_error_text(error)}", "errno": error.errno or 0}))
            self.close()
            self.finish()
            return
        if not data:
            session.send(ap.encode_eof(self.id, ap.STDOUT))
            session.send(ap.encode_end(self.id, {"size": self.size}))
            self.close()
            self.finish()
            session.flush()
            return
        self.credit.take(len(data))
        self.size += len(data)
        session.send_data(self.id, ap.STDOUT, data)
        session.flush()
        self.schedule()

    def update(self) -> None:
        """Called when the send queue drained (like OutputPipe.update)."""
        self.schedule()

    def on_window(self, channel: int, increment: int) -> None:
        self.credit.grant(increment)
        self.schedule()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
