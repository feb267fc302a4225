"""What a VM's network could leave on the host, counted from outside the daemon.

The soak, the chaos run and the network tests take a :func:`census` before and after, and
fail on any difference (:func:`leaked`), as they do on QEMU processes:

- ``host_links``: interfaces in the host's (root) network namespace (``ip -o link``): a
  tap that escaped its VM's namespace, a veth;
- ``netns_mounts``: named namespaces (``/run/netns``; vmcache never makes one), but for
  those of tests/netns_pair.py (``vmcache-test-*``: each test removes its own), so that
  another engineer's test running meanwhile on a shared machine is not counted;
- ``host_ruleset``: the root namespace's nftables ruleset (``nft list ruleset``), changed;
- ``foreign_fds`` (of a live daemon, :func:`foreign_fds`): its descriptors that keep
  another network namespace alive: a namespace itself (``net:[...]``), a tap
  (``/dev/net/tun``), or a socket whose namespace (``SIOCGSKNS``, on a copy taken with
  ``pidfd_getfd``) is not the host's: a proxy listener or DNS responder left open after its
  VM, which would hold the VM's namespace, its tap and its ruleset after QEMU exited;
- ``helpers`` (of a live daemon): its children running ``nsenter``, ``nft``, ``ip``;
- ``proxied`` (:func:`established`): TCP connections still established to a loopback
  server the guests reached through the egress proxy.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has
SIOCGSKNS = 0x894C
HELPERS = {"nsenter", "nft", "ip", "sysctl", "unshare"}
#: The prefix of the named namespaces tests/netns_pair.py makes (and removes) itself.
TEST_NETNS = "vmcache-test-"


@dataclass(frozen=True)
class Census:
    host_links: frozenset[str]
    netns_mounts: frozenset[str]
    host_ruleset: str


def host_links() -> frozenset[str]:
    listed = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True, timeout=10)
    return frozenset(line.split(":")[1].strip().split("@")[0] for line in listed.stdout.splitlines())


def host_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True,
                          timeout=10).stdout


def census() -> Census:
    mounts = Path("/run/netns")
    named = os.listdir(mounts) if mounts.is_dir() else []
    return Census(host_links(), frozenset(name for name in named if not name.startswith(TEST_NETNS)),
                  host_ruleset())


def leaked(before: Census, after: Census) -> dict[str, object]:
    """What ``after`` has that ``before`` had not (empty values: nothing leaked)."""
    return {
        "leaked_host_links": sorted(after.host_links - before.host_links),
        "leaked_netns_mounts": sorted(after.netns_mounts - before.netns_mounts),
        "host_ruleset_changed": after.host_ruleset != before.host_ruleset,
    }


def _socket_netns(pidfd: int, fd: int) -> int | None:
    """The inode of the network namespace of socket ``fd`` of the process (None: gone)."""
    copy = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copy < 0:
        return None
    try:
        netns = fcntl.ioctl(copy, SIOCGSKNS)
    except OSError:
        return None
    finally:
        os.close(copy)
    try:
        return os.fstat(netns).st_ino
    finally:
        os.close(netns)


def foreign_fds(pid: int) -> list[str]:
    """The descriptors of process ``pid`` that hold a network namespace other than the
    host's (see the module's docstring), each as ``FD -> what``."""
    host = os.stat(f"/proc/{pid}/ns/net").st_ino  # the daemon's own: the host's
    found = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("net:[") and target != f"net:[{host}]":
                found.append(f"{name} -> {target}")
            elif target == "/dev/net/tun":
                found.append(f"{name} -> a tap")
            elif target.startswith("socket:["):
                inode = _socket_netns(pidfd, int(name))
                if inode is not None and inode != host:
                    found.append(f"{name} -> {target} in net:[{inode}]")
    finally:
        os.close(pidfd)
    return found


def helpers(pid: int) -> list[str]:
    """Children of ``pid`` running a namespace helper (nsenter, nft, ip, ...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        if ppid == str(pid) and comm in HELPERS:
            found.append(f"{entry.name} {comm}")
    return found


def established(port: int) -> int:
    """TCP connections established to or from ``port`` on the host's loopback."""
    listed = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                            capture_output=True, text=True, check=True, timeout=10)
    return len(listed.stdout.splitlines())


class _Named(http.server.BaseHTTPRequestHandler):
    """Answers every GET with its server's name."""

    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def loopback_server(name: str) -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 (an ephemeral port) answering ``name``, for
    the guests to reach through the egress proxy as host.vmcache.internal:PORT."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    server.daemon_threads = True
    server.name = name  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
