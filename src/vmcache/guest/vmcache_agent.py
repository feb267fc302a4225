"""vmcache guest agent: runs commands and moves files for the host, over virtio-serial.

Started in the guest as PID 1 after switch_root::

    /usr/bin/python3 -E -s /run/vmcache/agent/vmcache_agent.py --init

(``agent_protocol.py`` sits next to this file). It serves every virtio-serial
port whose name starts with ``vmcache.`` (``vmcache.control``,
``vmcache.agent.0`` ...), one independent session per port, all in one
single-threaded event loop (epoll). ``--fd N`` serves one already-connected
socket instead (the host tests run the agent that way) and exits when it
closes.

Only modules that Debian's ``python3-minimal`` ships are used (no json, no
termios, no ctypes needed), and the code runs on any Python >= 3.9. The wire
protocol is ``agent_protocol.py``'s; ``docs/agent-protocol.md`` describes the
requests and their answers.

Memory stays bounded whatever a process or the host does: a process's output
is read only while the host granted credit and the port's send queue is
short (the process then blocks on its pipe), and the host may send only as
much as the agent granted.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmcache.guest import agent_loop as base
    from vmcache.guest import agent_process as process
    from vmcache.guest import agent_session as session
    from vmcache.guest import agent_system as system
else:
    try:
        import agent_protocol  # noqa: F401  (the other modules import it)
    except ImportError:  # run from a source checkout: src/vmcache/agent_protocol.py
        sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import agent_loop as base
    import agent_process as process
    import agent_session as session
    import agent_system as system

PR_SET_CHILD_SUBREAPER = 36
#: How often disconnected ports are checked, besides SIGIO.
PORT_RECHECK = 2.0


# --- Ports ---------------------------------------------------------------------------------------


class Port:
    """A virtio-serial port named ``vmcache.*``: one session per host connection."""

    def __init__(self, agent: Agent, name: str, path: str) -> None:
        self.agent = agent
        self.name = name
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        self.session: session.Session | None = None
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        except OSError as error:
            base.log(f"{name}: F_SETOWN: {base.os_error_text(error)} (reconnections noticed by polling)")

    def host_connected(self) -> bool:
        """virtio-serial polls POLLHUP while no host end is connected."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not any(events & select.POLLHUP for _, events in poller.poll(0))

    def _set_async(self, on: bool) -> None:
        """SIGIO on connection changes, wanted only while idle (it also fires on every input)."""
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC))
        except OSError as error:
            base.log(f"{self.name}: O_ASYNC: {base.os_error_text(error)}")

    def check(self) -> None:
        if self.session is None and self.host_connected():
            self._set_async(False)
            base.log(f"{self.name}: host connected")
            self.session = session.Session(self.agent, self.fd, self.name, self._ended)

    def _ended(self, session: session.Session) -> None:
        self.session = None
        self._set_async(True)
        self.check()  # a host may have connected again already

    def start(self) -> None:
        self._set_async(True)
        self.check()


# --- The agent -----------------------------------------------------------------------------------


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = base.Loop()
        self.system = system.System(args.sys_dir, args.proc_dir, args.random_device, not args.no_set_clock)
        self.children: dict[int, process.ProcessStream] = {}
        self.ports: dict[str, Port] = {}
        self.sessions = 0
        self.exit_status: int | None = None
        self._setup_signals()

    def _setup_signals(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_fd = read_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for number in (signal.SIGCHLD, signal.SIGIO, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, self._on_signal_handler)
        self.loop.add_reader(read_end, self._on_signals)

    def _on_signal_handler(self, number: int, frame: Any) -> None:
        """The wakeup fd does the work; this only keeps Python from acting on the signal."""

    def _on_signals(self) -> None:
        try:
            numbers = set(os.read(self._signal_fd, 4096))
        except BlockingIOError:
            return
        if signal.SIGCHLD in numbers:
            self.reap()
        if signal.SIGIO in numbers:
            self.check_ports()
        if not self.args.init and numbers & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            base.log("stopping on a signal")
            self.stop(0)

    def reap(self) -> None:
        """Collect every exited child, ours or orphans (as PID 1 or a subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.children.pop(pid, None)
            if process is not None:
                try:
                    process.exited(os.waitstatus_to_exitcode(status))
                except Exception:
                    base.log_exception(f"handling the exit of pid {pid}")

    # Ports.

    def serve_ports(self) -> None:
        self.scan_ports()
        self._port_timer()

    def scan_ports(self) -> None:
        for entry in sorted(system._listdir(self.args.port_dir)):
            name = system._read(os.path.join(self.args.port_dir, entry, "name"))
            if not name or not name.startswith("vmcache.") or name in self.ports:
                continue
            path = os.path.join(self.args.dev_dir, entry)
            try:
                port = Port(self, name, path)
            except OSError as error:
                base.log(f"cannot open port {name} ({path}): {base.os_error_text(error)}")
                continue
            self.ports[name] = port
            base.log(f"serving {name} on {path}")
            port.start()

    def check_ports(self) -> None:
        for port in self.ports.values():
            try:
                port.check()
            except Exception:
                base.log_exception(f"checking port {port.name}")

    def _port_timer(self) -> None:
        self.scan_ports()  # ports may appear late (modules loading, hotplug)
        self.check_ports()
        self.loop.call_later(PORT_RECHECK, self._port_timer)

    # One socket.

    def serve_fd(self, fd: int) -> None:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)

        def ended(session: session.Session) -> None:
            os.close(fd)
            self.stop(0)

        session.Session(self, fd, f"fd {fd}", ended)

    def stop(self, status: int) -> None:
        self.exit_status = status
        self.loop.running = False

    def run(self) -> int:
        while self.loop.running:
            try:
                self.loop.run_once()
            except Exception:
                if not self.args.init:
                    raise
                base.log_exception("error in the main loop (PID 1 carries on)")
                time.sleep(0.1)
        self._wait_for_children(1.0)
        return self.exit_status or 0

    def _wait_for_children(self, limit: float) -> None:
        """Before exiting (not as PID 1): reap the processes the sessions killed."""
        deadline = time.monotonic() + limit
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)


def become_subreaper() -> None:
    """Not PID 1: adopt orphaned grandchildren, so that they are reaped too (if ctypes is there)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vmcache guest agent")
    parser.add_argument("--init", action="store_true", help="run as PID 1: reap every process, never exit")
    parser.add_argument("--fd", type=int, help="serve this one connected socket, then exit")
    parser.add_argument("--port-dir", default="/sys/class/virtio-ports", help="where port names are")
    parser.add_argument("--dev-dir", default="/dev", help="where port devices are")
    parser.add_argument("--sys-dir", default="/sys", help="sysfs (for online)")
    parser.add_argument("--proc-dir", default="/proc", help="procfs (boot id, meminfo)")
    parser.add_argument("--random-device", default="/dev/urandom", help="target of the entropy ioctls")
    parser.add_argument("--no-set-clock", action="store_true", help="refuse clock requests (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.umask(0o022)
    if args.init and os.getpid() != 1:
        base.log("--init but not PID 1: orphans are not ours to reap")
    if os.getpid() != 1:
        become_subreaper()
    agent = Agent(args)
    base.log(f"version {base.AGENT_VERSION}, Python {sys.version.split()[0]}, boot id {agent.system.boot_id}")
    if args.fd is not None:
        agent.serve_fd(args.fd)
    else:
        agent.serve_ports()
    while True:
        try:
            return agent.run()
        except Exception:
            base.log_exception("the agent failed")
            if not args.init:
                return 1


if __name__ == "__main__":
    sys.exit(main())
