"""What a guest (and QEMU on its behalf) may write on the host: the console and ``qemu.log``, bounded.

The guest is hostile: anything it can make the host store must have a cap, or a guest
writing to ``/dev/ttyS0`` in a loop fills the run directory (a tmpfs: host memory).

* **The serial console** is a ``-chardev socket`` (server) in the run directory, not a
  file. A drainer task (:func:`start_drain`) reads it, at most :data:`DRAIN_RATE` bytes a
  second, into ``console.log`` and ``console.log.1``, each at most :data:`CONSOLE_CAP`
  bytes (:class:`RotatingLog`). Not reading just back-pressures the guest's UART: QEMU
  waits until the socket is writable, the guest's driver waits for QEMU. When nobody is
  connected (a handed-out VM whose daemon died) QEMU drops the output and the guest never
  blocks. The drainer ends at EOF, when QEMU exits.
* **QEMU's own stdout/stderr** (``qemu.log``, a file) is bounded by ``RLIMIT_FSIZE`` on the
  QEMU process (:func:`limit_qemu_output`): a guest can make QEMU print (virtio devices
  complain about bad requests); writes past :data:`QEMU_LOG_CAP` fail with EFBIG, which
  QEMU ignores. QEMU writes no other file: its pidfile is ours, and a snapshot template's
  RAM is a memfd we size ourselves, written through ``mmap`` (which the limit does not cover).

:func:`console_tail` and :func:`telling_console_line` read both console files, so the
line that says why a guest died is quoted even after a flood rotated the log; what they
return has its control characters escaped (:func:`~vmcache.errors.printable`): the text is
the guest's, the line it goes into is ours.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
from collections.abc import Callable
from pathlib import Path

import trio

from ._unix import connect_when_ready
from .errors import printable

log = logging.getLogger("vmcache.console")

CONSOLE_LOG = "console.log"
CONSOLE_SOCKET = "console.sock"
#: The most each of ``console.log`` and ``console.log.1`` holds.
CONSOLE_CAP = 256 << 10
#: The most QEMU's own ``qemu.log`` holds (its stdout and stderr).
QEMU_LOG_CAP = 512 << 10
#: The most the drainer reads at once.
READ_SIZE = 32 << 10
#: The most the drainer reads per second and VM: a flooding guest (KVM writes its UART
#: far faster than TCG) costs the daemon a bounded share of a core.
DRAIN_RATE = 1 << 20
#: The shortest time between two reads, so that a guest writing byte by byte (QEMU sends
#: each UART byte on its own) wakes the daemon at most 1 / READ_INTERVAL times a second.
READ_INTERVAL = 0.02
#: How long the drainer waits for QEMU to make the console socket.
CONNECT_TIMEOUT = 60.0
#: Console lines that say why a guest died, quoted first when there is one.
TELLING_LINES = ("Kernel panic", "Out of memory", "oom-kill", "vmcache-init:")


def _escape(value: str) -> str:
    """Escape a value for a QEMU ``-chardev`` option list (comma doubled)."""
    return value.replace(",", ",,")


def console_args(run_dir: Path) -> list[str]:
    """QEMU's serial console: a Unix socket server in ``run_dir`` for the drainer.

    ``wait=on``: QEMU waits for the drainer's connection before it starts the guest, so no
    line of the boot is lost, whatever the load on the daemon's event loop; the drainer
    connects within milliseconds of QEMU's start (it retries from 2 ms on). A later
    reconnection (an adopting daemon) needs no waiting: ``wait`` only applies at start.
    """
    path = _escape(str(run_dir / CONSOLE_SOCKET))
    return ["-chardev", f"socket,id=console,path={path},server=on,wait=on",
            "-serial", "chardev:console"]


class RotatingLog:
    """``path`` and ``path.1``, each at most ``cap`` bytes: the newest output in ``path``.

    Rotation copies ``path`` into ``path.1`` and truncates ``path`` (no renames), so that
    both files keep their inodes for the VM's life: a reader that opened them (a
    :class:`~vmcache.guest_api.Guest`, whose VM's run directory may be removed before it reads
    why the VM died) goes on seeing the newest bytes. Writes that fail (a full file
    system) are dropped: the console is a diagnostic, never a reason to fail.
    """

    def __init__(self, path: Path, cap: int = CONSOLE_CAP) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self.cap = cap
        self._fd = os.open(path, flags, 0o600)
        try:
            self._old_fd = os.open(f"{path}.1", flags, 0o600)
        except BaseException:
            os.close(self._fd)
            raise
        self._size = os.fstat(self._fd).st_size  # an adopted VM's log goes on where it was

    def write(self, data: bytes) -> None:
        if len(data) > self.cap:
            data = data[-self.cap:]
        try:
            if self._size + len(data) > self.cap:
                self._rotate()
            os.pwrite(self._fd, data, self._size)
            self._size += len(data)
        except OSError as error:
            log.debug("console log write failed: %s", error)

    def _rotate(self) -> None:
        current = os.pread(self._fd, self._size, 0)
        os.ftruncate(self._old_fd, 0)
        os.pwrite(self._old_fd, current, 0)
        os.ftruncate(self._fd, 0)
        self._size = 0

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._old_fd)


async def drain(run_dir: Path, still_running: Callable[[], bool], *, rate: int = DRAIN_RATE,
                cap: int = CONSOLE_CAP, done: trio.Event | None = None) -> None:
    """Copy the VM's console socket into its rotated log until QEMU closes it (exits);
    then set ``done``.

    Never raises (but Cancelled): whatever goes wrong ends the drain and is logged at
    debug level; QEMU then drops the console's output. Reads at most :data:`READ_SIZE`
    bytes at once, one read per :data:`READ_INTERVAL` at most, ``rate`` bytes a second.
    """
    try:
        await _drain(run_dir, still_running, rate, cap)
    finally:
        if done is not None:
            done.set()


async def _drain(run_dir: Path, still_running: Callable[[], bool], rate: int, cap: int) -> None:
    try:
        stream: trio.SocketStream | None = None
        with trio.move_on_after(CONNECT_TIMEOUT):
            stream = await connect_when_ready(run_dir / CONSOLE_SOCKET, still_starting=still_running)
        if stream is None:
            return
        async with stream:
            output: RotatingLog | None = None
            try:
                output = RotatingLog(run_dir / CONSOLE_LOG, cap)
            except OSError as error:  # the run directory is gone: drain into nothing
                log.debug("console of %s not kept: %s", run_dir.name, error)
            try:
                while data := await stream.receive_some(READ_SIZE):
                    if output is not None:
                        output.write(data)
                    await trio.sleep(max(READ_INTERVAL, len(data) / rate))
            finally:
                if output is not None:
                    output.close()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
        log.debug("console drain of %s ended: %s", run_dir.name, error)
    except Exception:  # a bug: never into the caller (a system task would crash the run)
        log.exception("console drain of %s failed", run_dir.name)


def start_drain(run_dir: Path, still_running: Callable[[], bool]) -> trio.Event:
    """Drain the VM's console for as long as its QEMU runs, whoever owns the VM; the
    event returned is set once the drain is over (the last bytes QEMU wrote are in the log).

    A Trio system task, not a task of some nursery: the drain lives as long as the QEMU
    process, across the hand-over from a cache slot to the ledger, and with no nursery to
    plumb through ``launch_vm``. It cannot raise (see :func:`drain`); it ends at EOF, or
    is cancelled when the Trio run ends (QEMU then drops the console's output).
    """
    done = trio.Event()
    trio.lowlevel.spawn_system_task(functools.partial(drain, done=done), run_dir, still_running,
                                    name=f"vmcache console {run_dir.name}")
    return done


def limit_qemu_output(pid: int) -> None:
    """Cap what the QEMU process ``pid`` may write to a file at :data:`QEMU_LOG_CAP`.

    Set right after the start (``preexec_fn`` would make every start fork instead of
    vfork): QEMU has not run the guest yet, so what it wrote meanwhile is its own few
    lines. QEMU must be started with ``restore_signals=False``, so that SIGXFSZ stays
    ignored as in Python and a write past the cap fails with EFBIG instead of killing QEMU.
    """
    try:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (QEMU_LOG_CAP, QEMU_LOG_CAP))
    except OSError as error:  # QEMU already gone: its start fails on its own
        log.debug("cannot limit QEMU %d's file size: %s", pid, error)


def read_console(run_dir: Path) -> str:
    """The console's text as kept: ``console.log.1`` then ``console.log``."""
    return "".join(_read(run_dir / name) for name in (f"{CONSOLE_LOG}.1", CONSOLE_LOG))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


#: The most of one console line quoted in a message (a guest's line may be the whole log).
QUOTED_LINE = 200


def telling_console_line(text: str) -> str:
    """The last line of ``text`` that says why a guest died (a panic, the OOM killer, our
    init's own complaint), from a little before its marker, at most :data:`QUOTED_LINE`
    characters, escaped (:func:`~vmcache.errors.printable`); or ""."""
    for line in reversed(text.splitlines()):
        found = [line.find(marker) for marker in TELLING_LINES if marker in line]
        if found:
            start = max(0, min(found) - QUOTED_LINE // 4)
            clipped = ("..." if start else "") + line[start:start + QUOTED_LINE]
            return printable(clipped.strip())
    return ""


def _quoted(line: str) -> str:
    """One console line for a message: its end, at most :data:`QUOTED_LINE` characters."""
    line = line.strip()
    return printable(line if len(line) <= QUOTED_LINE else "..." + line[-QUOTED_LINE:])


def console_tail(run_dir: Path, lines: int = 5) -> str:
    """The guest's last console lines and QEMU's own messages, joined on one line; a line
    that says why the guest died (see :data:`TELLING_LINES`) comes first. Control
    characters are escaped: this goes into vmcache's own messages."""
    collected: list[str] = []
    telling = ""
    for text in (_read(run_dir / "qemu.log"), read_console(run_dir)):
        telling = telling_console_line(text) or telling
        collected += [_quoted(line) for line in text.splitlines() if line.strip()][-lines:]
    tail = collected[-lines:]
    if telling and telling not in tail:
        tail = [telling, "...", *tail]
    return " | ".join(tail) or "(no console output)"
