"""Files the host writes into the guest or reads from it, under credit; and mkdir."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
    from vmcache.in_guest import agent_base as base
    from vmcache.in_guest.vmcache_agent import Session
else:
    import agent_base as base
    import agent_protocol as ap

#: Credit the agent grants for a file being written.
FILE_WINDOW = 4 * 1024 * 1024


def mkdir(request: ap.MkdirRequest) -> None:
    """``mkdir -p``; the mode applies to the last directory if it is made."""
    path = base.fs_bytes(request.path)
    try:
        existed = os.path.isdir(path)
        os.makedirs(path, request.mode, exist_ok=True)
        if not existed:
            os.chmod(path, request.mode)
    except OSError as error:
        raise base.RequestFailed.from_os(f"cannot make directory {base.shown(path)} in the guest",
                                         error) from None


class WriteFileStream(base.Stream):
    """A file the host sends: written to a temporary name, renamed into place at EOF."""

    def __init__(self, session: Session, request: ap.WriteFileRequest) -> None:
        super().__init__(session, request.stream)
        self.path = base.fs_bytes(request.path)
        self.mode = request.mode
        self.size = 0
        self.fd: int | None = None
        self.temp: bytes | None = None

    def start(self) -> None:
        directory, name = os.path.split(self.path)
        try:
            os.makedirs(directory or b"/", 0o755, exist_ok=True)
            self.temp = os.path.join(directory, b"." + name + b".vmcache-" + os.urandom(6).hex().encode())
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as error:
            self.temp = None
            raise base.RequestFailed.from_os(self._what(), error) from None
        self.session.send(ap.WriteFileReply(self.id, FILE_WINDOW))

    def on_data(self, event: ap.Data) -> None:
        if self.fd is None:
            return
        try:
            view = memoryview(event.data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as error:
            self._fail(error)
            return
        self.size += len(event.data)
        self.session.consumed(self.id, ap.STDIN, len(event.data))

    def on_eof(self, event: ap.Eof) -> None:
        if self.fd is None or self.temp is None:
            return
        fd, self.fd = self.fd, None
        try:
            try:
                os.fchmod(fd, self.mode)
            finally:
                os.close(fd)  # also when fchmod failed: PID 1 must not leak descriptors
            os.rename(self.temp, self.path)
        except OSError as error:
            self._fail(error)
            return
        self.temp = None
        self.session.send(ap.FileEnd(self.id, self.size))
        self.finish()

    def _what(self) -> str:
        return f"cannot write {base.shown(self.path)} in the guest"

    def _fail(self, error: OSError) -> None:
        self.session.fail_stream(self.id, base.RequestFailed.from_os(self._what(), error))

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

    def __init__(self, session: Session, request: ap.ReadFileRequest) -> None:
        super().__init__(session, request.stream)
        self.path = base.fs_bytes(request.path)
        self.fd: int | None = None
        self.size = 0
        self.scheduled = False

    def start(self) -> None:
        what = f"cannot read {base.shown(self.path)} in the guest"
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            info = os.fstat(self.fd)
        except OSError as error:
            self.close()
            raise base.RequestFailed.from_os(what, error) from None
        if not stat.S_ISREG(info.st_mode):
            self.close()
            raise base.RequestFailed(f"{what}: not a regular file")
        self.session.send(ap.ReadFileReply(self.id, stat.S_IMODE(info.st_mode), info.st_size))
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
        credit = session.credit(self.id, ap.STDOUT)
        if credit <= 0:
            return  # a WINDOW reschedules
        if session.out_bytes >= base.OUT_LIMIT:
            session.waiting_outputs.add(self)
            return
        try:
            data = os.read(self.fd, min(credit, ap.CHUNK))
        except OSError as error:
            what = f"cannot read {base.shown(self.path)} in the guest"
            session.fail_stream(self.id, base.RequestFailed.from_os(what, error))
            return
        if not data:
            session.send(ap.Eof(self.id, ap.STDOUT))
            session.send(ap.FileEnd(self.id, self.size))
            self.close()
            self.finish()
            return
        self.size += len(data)
        session.send_data(self.id, ap.STDOUT, data)
        self.schedule()

    def update(self) -> None:
        """Called when the send queue drained (like OutputPipe.update)."""
        self.schedule()

    def on_window(self, event: ap.WindowUpdate) -> None:
        self.schedule()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
