"""No leaks, whatever ends a VM given network: a daemon SIGKILLed under a claimed restricted
VM (its guest's network fails closed while the daemon is dead, the next daemon adopts it and
enforces its policy again), a guest that panics, a daemon stopped with Ctrl-C under cached NIC
VMs and a lease. Each time the host is left as it was (tests/leaks.py): no interface or named
namespace in its namespace, its nftables ruleset unchanged, no descriptor of the daemon in a
VM's namespace, no connection left to the server the guests reached; and no QEMU (conftest)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import leaks
import pytest
from conftest import VMCACHE, pid_alive, qemu_pids, wait_until
from daemon import Daemon, stop_handed_out

from vmcache.procfs import open_fds

pytestmark = pytest.mark.qemu

#: Run in the guest: fetch from host.vmcache.internal:PORT; print what came back, or why not.
FETCH = r"""
import sys, urllib.request
try:
    print("got " + urllib.request.urlopen(f"http://host.vmcache.internal:{sys.argv[1]}/",
                                          timeout=5).read().decode(), flush=True)
except Exception as error:
    print("refused: " + type(error).__name__, flush=True)
"""


@pytest.fixture
def servers() -> Iterator[tuple[int, int]]:
    """Two loopback servers: one the policy allows, one it leaves out."""
    with leaks.loopback_server("allowed") as allowed, leaks.loopback_server("other") as other:
        yield allowed, other


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path,  # type: ignore[no-untyped-def]
           servers: tuple[int, int]):
    instance = Daemon(tmp_path, run_dir, cache=1)
    with open(instance.config, "a") as file:
        file.write(f'[network]\npermit = ["host.vmcache.internal:{servers[0]}"]\n')
    yield instance
    instance.ensure_stopped()


def fetch(handle_json: str, port: int) -> str:
    """What the guest of ``handle_json`` gets from host.vmcache.internal:``port``."""
    done = subprocess.run([*VMCACHE, "exec", "-", "--", "python3", "-c", FETCH, str(port)],
                          input=handle_json, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_sigkill_adopt_and_a_panic_leave_nothing(daemon: Daemon, tmp_path: Path,
                                                 servers: tuple[int, int]) -> None:
    allowed, other = servers
    host, before = leaks.census(), qemu_pids()
    daemon.start()
    daemon.wait_cached(1)
    handle_json = daemon.cli("get", "--allow", f"host.vmcache.internal:{allowed}", "--ttl", "600").stdout
    handle = json.loads(handle_json)
    assert fetch(handle_json, allowed) == "got allowed"
    assert leaks.foreign_fds(daemon.pid), "the enforcement holds the VM's namespace (the counter sees it)"

    # The daemon dies: the VM lives on, its network fails closed (no proxy behind the ruleset).
    daemon.process.kill()  # type: ignore[union-attr]
    daemon.process.wait()  # type: ignore[union-attr]
    assert pid_alive(handle["pid"])
    assert fetch(handle_json, allowed).startswith("refused: ")

    # The next daemon adopts it and enforces its policy again: the allowed port, no other.
    daemon.start()
    assert wait_until(lambda: [vm["id"] for vm in daemon.status()["handed_out_vms"]] == [handle["id"]], 30)
    assert wait_until(lambda: leaks.foreign_fds(daemon.pid) != [], 30), daemon.log()
    assert fetch(handle_json, allowed) == "got allowed"
    assert fetch(handle_json, other).startswith("refused: ")
    daemon.wait_cached(1)
    stop_handed_out(handle_json, tmp_path)
    assert wait_until(lambda: leaks.foreign_fds(daemon.pid) == [], 10), leaks.foreign_fds(daemon.pid)
    fds_before = open_fds(daemon.pid)

    # A guest that panics: the daemon sees its QEMU exit and takes its enforcement down.
    daemon.wait_cached(1)
    handle_json = daemon.cli("get", "--allow", f"host.vmcache.internal:{allowed}", "--ttl", "600").stdout
    handle = json.loads(handle_json)
    assert fetch(handle_json, allowed) == "got allowed"
    assert leaks.foreign_fds(daemon.pid)
    panicked = subprocess.run([*VMCACHE, "exec", "-", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"],
                              input=handle_json, capture_output=True, text=True, timeout=120)
    assert panicked.returncode != 0 and "Kernel panic" in panicked.stderr, panicked.stderr
    assert wait_until(lambda: not pid_alive(handle["pid"]), 30)
    assert wait_until(lambda: daemon.status()["handed_out_vms"] == [], 30), daemon.log()
    daemon.wait_cached(1)
    assert wait_until(lambda: leaks.foreign_fds(daemon.pid) == [] and open_fds(daemon.pid) <= fds_before,
                      10), (leaks.foreign_fds(daemon.pid), open_fds(daemon.pid), fds_before)
    assert leaks.helpers(daemon.pid) == []

    assert daemon.signal(signal.SIGTERM) == 0
    assert wait_until(lambda: qemu_pids() == before, 10)
    assert leaks.leaked(host, leaks.census()) == {
        "leaked_host_links": [], "leaked_netns_mounts": [], "host_ruleset_changed": False}
    assert leaks.established(allowed) == 0


def test_ctrl_c_purges_cached_nic_vms_and_a_restricted_lease(daemon: Daemon,
                                                             servers: tuple[int, int]) -> None:
    allowed, _ = servers
    host, before = leaks.census(), qemu_pids()
    daemon.start()
    daemon.wait_cached(1)
    lease = subprocess.Popen([*VMCACHE, "run", "--endpoint", str(daemon.endpoint), "--allow",
                              f"host.vmcache.internal:{allowed}", "--", "python3", "-c",
                              FETCH + "\nimport time; time.sleep(600)\n", str(allowed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert lease.stdout is not None
        assert lease.stdout.readline().strip() == "got allowed"  # the lease's guest is on the network
        daemon.wait_cached(1)
        (leased,) = daemon.status()["handed_out_vms"]
        assert leaks.foreign_fds(daemon.pid)
        assert leaks.established(allowed) == 0  # the guest's fetch is over: nothing proxied

        assert daemon.signal(signal.SIGINT) == 0
        assert wait_until(lambda: qemu_pids() == before, 10)
        assert not pid_alive(leased["pid"])
        assert leaks.leaked(host, leaks.census()) == {
            "leaked_host_links": [], "leaked_netns_mounts": [], "host_ruleset_changed": False}
        assert lease.wait(timeout=30) != 0  # its VM went with the daemon
    finally:
        if lease.poll() is None:
            lease.kill()
            lease.wait()
