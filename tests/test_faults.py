"""Fault injection against a real daemon: provoke each fault for real, then count.

Counted after each: QEMU processes, the daemon's open file descriptors, run
directories, VMs cached and handed out.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids, wait_until, write_config
from daemon import Daemon, run_as, stop_handed_out

import vmcache
from vmcache.errors import DeadlineExceededError
from vmcache.procfs import open_fds
from vmcache.rpc.server import MAX_CONNECTIONS

pytestmark = pytest.mark.qemu


def vm_dirs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith("vm-")}


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path):  # type: ignore[no-untyped-def]
    instance = Daemon(tmp_path, run_dir, cache=2, factory={"health_interval": 1.0})
    yield instance
    instance.ensure_stopped()


def test_sigkilled_daemon_leaves_no_orphans_after_restart(daemon: Daemon, tmp_path: Path,
                                                          run_dir: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    handle_json = daemon.cli("get").stdout
    handle = json.loads(handle_json)
    try:
        orphans = set(daemon.wait_cached(2))
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        assert all(pid_alive(pid) for pid in orphans), "cached VMs outlive a SIGKILLed daemon..."

        # A record that names a live process which is not that VM (pid reuse) must be left alone.
        bystander = subprocess.Popen(["sleep", "60"])
        state = next((run_dir / "state").iterdir())
        (state / "vm-feedfacecafe.json").write_text(json.dumps({
            "id": "feedfacecafe", "pid": bystander.pid, "start_time": 1, "run_dir": "/nonexistent"}))
        try:
            daemon.start()  # ...until the next daemon on the endpoint starts
            assert wait_until(lambda: not any(pid_alive(pid) for pid in orphans), 15), daemon.log()
            assert wait_until(lambda: "killed 2 VMs a previous daemon" in daemon.log(), 10)
            assert bystander.poll() is None, "a reused pid was killed"
        finally:
            bystander.kill()
            bystander.wait()
        assert pid_alive(handle["pid"]), "the handed-out VM is not the daemon's to kill"
        fresh = set(daemon.wait_cached(2))
        assert qemu_pids() - before == fresh | {handle["pid"]}
        assert vm_dirs(run_dir) == {f"vm-{vm['id']}" for vm in daemon.status()["vms"]} | {
            Path(handle["run_dir"]).name}
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()
        stop_handed_out(handle_json, tmp_path)
    assert qemu_pids() == before


# QEMU is PID 1 of its pid namespace (vmcache.jail): a signal it has no handler for, sent from
# outside, is ignored (the kernel's own faults still reach it). SIGBUS goes through QEMU's
# handler, which fails to re-raise it and aborts: a real crash, ending in SIGSEGV.
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGBUS])
def test_a_cached_vm_that_dies_is_noticed_and_replaced(daemon: Daemon, run_dir: Path, how: int) -> None:
    before = qemu_pids()
    daemon.start()
    victim, survivor = daemon.wait_cached(2)
    fds = open_fds(daemon.pid)
    os.kill(victim, how)
    killed_at = time.monotonic()
    assert wait_until(lambda: victim not in daemon.cached_pids(), 5)
    assert time.monotonic() - killed_at < 2.5, "noticed within a second or two"
    refilled = daemon.wait_cached(2)
    assert victim not in refilled and survivor in refilled
    assert "replacing it" in daemon.log()
    assert qemu_pids() - before == set(refilled)
    assert len(vm_dirs(run_dir)) == 2
    assert open_fds(daemon.pid) <= fds + 1
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before


def test_a_hung_cached_vm_is_caught_by_the_health_ping(daemon: Daemon, run_dir: Path) -> None:
    before = qemu_pids()
    daemon.start()
    hung, _ = daemon.wait_cached(2)
    os.kill(hung, signal.SIGSTOP)
    try:
        assert wait_until(lambda: not pid_alive(hung), 20), daemon.log()
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGKILL)
    assert "does not answer its" in daemon.log()  # its agent (running) or its monitor (paused)
    refilled = daemon.wait_cached(2)
    assert hung not in refilled
    assert qemu_pids() - before == set(refilled)
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before


def test_boots_that_keep_failing_are_reported_and_recover(tmp_path: Path, run_dir: Path,
                                                         guest_image: Path) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"not a file system" * 1000)  # the guest cannot mount it and powers off
    daemon = Daemon(tmp_path, run_dir, cache=1, factory={"boot_retry_initial": 0.2, "boot_retry_max": 1.0},
                    image=str(image), boot_timeout=20.0)
    before = qemu_pids()
    daemon.start()
    try:
        assert wait_until(lambda: daemon.status().get("boot_failures_in_row", 0) >= 3, 120), daemon.log()
        status = daemon.cli("status").stdout
        assert "boot failures in a row" in status and "last boot error" in status
        asked = time.monotonic()
        get = daemon.cli("get", "--timeout", "60", check=False)
        assert time.monotonic() - asked < 10, "UNAVAILABLE comes at once, not after the deadline"
        assert get.returncode == 1 and get.stderr.count("\n") == 1
        assert "daemon cannot hand out a VM: no VM could be booted" in get.stderr
        assert "vmcache-init:" in get.stderr, "the reason is the guest's own line"
        shutil.copy(guest_image / "rootfs.erofs", image)  # the fix lands...
        daemon.wait_cached(1)  # ...and the cache fills by itself
        assert json.loads(daemon.cli("status", "--json").stdout)["last_boot_error"] == ""
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()
    assert qemu_pids() == before
    assert vm_dirs(run_dir) == set()


async def test_a_hundred_clients_that_come_and_go(daemon: Daemon, run_dir: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    fds = open_fds(daemon.pid)
    rng = random.Random(4)
    handles: list[vmcache.VMHandle] = []
    outcomes: dict[str, int] = {"served": 0, "deadline": 0, "hung up": 0}

    async def client(index: int) -> None:
        behaviour = rng.choice(["hang up", "short deadline", "patient"])
        async with vmcache.connect(daemon.endpoint) as cache:
            if behaviour == "hang up":
                with trio.move_on_after(rng.uniform(0, 3)):
                    handles.append(await cache.get_vm(timeout=30))
                    outcomes["served"] += 1
                    return
                outcomes["hung up"] += 1
                return
            try:
                handles.append(await cache.get_vm(timeout=rng.uniform(0.1, 3) if
                                                  behaviour == "short deadline" else 12))
                outcomes["served"] += 1
            except DeadlineExceededError:
                outcomes["deadline"] += 1

    try:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                for index in range(100):
                    nursery.start_soon(client, index)
        assert sum(outcomes.values()) == 100
        pids = [vm.pid for vm in handles]
        assert len(pids) == len(set(pids)), "a VM was handed out twice"
        assert all(pid_alive(pid) for pid in pids), daemon.log()
        cached = set(await trio.to_thread.run_sync(daemon.wait_cached, 2))
        assert qemu_pids() - before == cached | set(pids), "a VM was lost or orphaned"
    finally:
        for vm in handles:
            await vm.aclose()
    # Once the handed-out VMs are gone, so are the daemon's descriptors for them and the clients.
    assert await trio.to_thread.run_sync(wait_until, lambda: open_fds(daemon.pid) <= fds + 2, 10), (
        f"{open_fds(daemon.pid)} open fds, {fds} before")
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before
    assert vm_dirs(run_dir) == set()


def test_unusable_directories_are_clear_errors_at_start(tmp_path: Path, guest_image: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path / "c.toml", endpoint=tmp_path / "ok" / "cache.sock")
    env = {**os.environ, "VMCACHE_RUN_DIR": str(blocker / "run")}
    done = subprocess.run([*VMCACHE, "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"cannot create directory {blocker / 'run'}" in done.stderr

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    config = write_config(tmp_path / "d.toml", endpoint=foreign / "cache.sock")
    env = {**os.environ, "VMCACHE_RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run([*VMCACHE, "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"the socket's directory {foreign} belongs to uid 65534" in done.stderr


def hostile_connection(endpoint: Path, payload: bytes, hold: float = 0.0) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(endpoint))
        try:
            sock.sendall(payload)
        except OSError:
            pass
        time.sleep(hold)


def test_hostile_input_does_not_stop_the_daemon(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    daemon = Daemon(tmp_path, run_dir, cache=1).start()
    try:
        daemon.wait_cached(1)
        fds = open_fds(daemon.pid)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        rng = random.Random(7)
        payloads = {
            "random bytes": bytes(rng.getrandbits(8) for _ in range(4096)),
            "truncated HTTP/2": preface + settings + b"\x00\x10\x00\x01",
            "oversized frame": preface + settings + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"x" * 70000,
            "http/1": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        }
        for payload in payloads.values():
            hostile_connection(daemon.endpoint, payload)
        assert daemon.status()["pid"] == daemon.pid

        # A flood beyond MAX_CONNECTIONS, held open and silent, while a real client asks for
        # status: idle connections make room for it (the longest-idle is closed).
        flood = []
        for _ in range(MAX_CONNECTIONS + 100):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.endpoint))
            flood.append(sock)
        assert daemon.status()["pid"] == daemon.pid
        for sock in flood:
            sock.close()

        handle = daemon.cli("get").stdout  # the cache still hands out VMs
        stop_handed_out(handle, tmp_path)
        assert wait_until(lambda: open_fds(daemon.pid) <= fds + 2, 10), "connections leaked fds"
        log = daemon.log()
        assert "Traceback" not in log
        broken = [line for line in log.splitlines() if "closed a client connection:" in line]
        assert len(broken) >= len(payloads) - 1  # an HTTP/1 or random peer may end as plain EOF
        assert "closed the longest-idle one" in log
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()


def run_client_as(uid: int, gid: int, endpoint: Path) -> str:
    """As uid/gid (a forked child), call Status. Returns what happened."""

    async def ask() -> str:
        async with vmcache.connect(endpoint) as cache:
            return f"ok {(await cache.status()).pid}"

    return run_as(uid, gid, ask)


def test_peer_credentials_are_checked(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    daemon = Daemon(tmp_path, run_dir, cache=1).start()
    try:
        assert oct(daemon.endpoint.stat().st_mode & 0o777) == "0o600"
        os.chmod(run_dir, 0o755)
        os.chmod(daemon.endpoint, 0o666)  # as if someone loosened the socket: SO_PEERCRED still holds
        outcome = run_client_as(65534, 65534, daemon.endpoint)
        assert outcome.startswith("error the daemon refused this client"), outcome
        assert "refused a connection: peer pid" in daemon.log()
        assert run_client_as(0, 0, daemon.endpoint) == f"ok {daemon.pid}"
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()

    grouped = Daemon(tmp_path, run_dir, cache=1, factory={"socket_group": "nogroup"})
    grouped.start()
    try:
        mode = grouped.endpoint.stat()
        assert (oct(mode.st_mode & 0o777), mode.st_gid) == ("0o660", 65534)
        assert run_client_as(65534, 65534, grouped.endpoint) == f"ok {grouped.pid}"
        assert grouped.signal(signal.SIGTERM) == 0
    finally:
        grouped.ensure_stopped()


def test_qemu_runs_under_seccomp(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    daemon = Daemon(tmp_path, run_dir, cache=1).start()
    try:
        (pid,) = daemon.wait_cached(1)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-sandbox" in argv
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Seccomp:\t2" in status, "QEMU's seccomp filter is active"
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()

