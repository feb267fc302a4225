"""Everyday use: warm `run`, handles from the shell, systemd notify, Watch, config show/check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids
from daemon import Daemon

import vmcache
from vmcache.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path):  # type: ignore[no-untyped-def]
    instance = Daemon(tmp_path, run_dir, cache=1)
    yield instance
    instance.ensure_stopped()


@pytest.mark.qemu
def test_warm_run_keep_exec_and_stop_from_the_shell(daemon: Daemon, tmp_path: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(1)
    done = subprocess.run([*VMCACHE, "run", "--endpoint", str(daemon.endpoint), "--",
                           "sh", "-c", "echo warm; echo err >&2; exit 3"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "warm\n")
    assert done.stderr.endswith("err\n")
    cached = set(daemon.wait_cached(1))
    assert qemu_pids() - before == cached, "run stops the VM it took"

    handle_file = tmp_path / "kept.json"
    done = subprocess.run([*VMCACHE, "run", "--keep", "--handle-file", str(handle_file), "--endpoint",
                           str(daemon.endpoint), "--", "touch", "/tmp/mark"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept = json.loads(handle_file.read_text())
    assert pid_alive(kept["pid"])
    # The handle on stdin works as well as from a file; the VM kept its state.
    done = subprocess.run([*VMCACHE, "exec", "-", "--", "ls", "/tmp/mark"], input=handle_file.read_text(),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "/tmp/mark\n")
    done = subprocess.run([*VMCACHE, "stop", "-"], input=handle_file.read_text(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not pid_alive(kept["pid"])
    for command in (["stop", str(handle_file)], ["exec", str(handle_file), "--", "true"]):
        done = subprocess.run([*VMCACHE, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not running" in done.stderr
    assert daemon.signal(signal.SIGTERM) == 0


def test_run_without_daemon_suggests_both_ways(tmp_path: Path) -> None:
    done = subprocess.run([*VMCACHE, "run", "--endpoint", str(tmp_path / "no.sock"), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "`vmcache serve`" in done.stderr and "`vmcache run --direct`" in done.stderr


def test_bad_handle_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "x"}')
    for text, needle in (("not json", "not JSON"), ('{"id": "x"}', "not a VM handle")):
        bad.write_text(text)
        done = subprocess.run([*VMCACHE, "stop", str(bad)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and needle in done.stderr


@pytest.mark.qemu
def test_systemd_notify_protocol(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(120)
    daemon = Daemon(tmp_path, run_dir, cache=2)
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    try:
        daemon.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    messages: list[dict[str, str]] = []

    def receive() -> dict[str, str]:
        fields = dict(line.split("=", 1) for line in listener.recv(4096).decode().splitlines())
        messages.append(fields)
        return fields

    try:
        while "READY" not in receive():
            pass
        assert messages[-1]["STATUS"] == "1/2 VMs ready", "READY=1 comes with the first VM"
        while receive().get("STATUS") != "2/2 VMs ready":
            pass
        assert sum("READY" in m for m in messages) == 1
        daemon.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while "STOPPING" not in receive():
            pass
        assert daemon.process.wait(timeout=30) == 0  # type: ignore[union-attr]
    finally:
        listener.close()
        daemon.ensure_stopped()
    statuses = [m["STATUS"] for m in messages if "STATUS" in m]
    assert statuses[0] == "0/2 VMs ready"  # booting announced before any VM is ready


@pytest.mark.qemu
async def test_watch_streams_boot_handout_refill_in_order(daemon: Daemon) -> None:
    daemon.start()
    await trio.to_thread.run_sync(daemon.wait_cached, 1)
    events: list[vmcache.CacheEvent] = []
    watcher = subprocess.Popen([*VMCACHE, "status", "--watch", "--endpoint", str(daemon.endpoint)],
                               stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None
    # `status --watch` prints the cache first, then streams: wait for that line before acting.
    first_line = await trio.to_thread.run_sync(watcher.stdout.readline)
    try:
        with trio.fail_after(120):
            async with vmcache.connect(daemon.endpoint) as cache, trio.open_nursery() as nursery:

                watching = trio.Event()

                async def collect() -> None:
                    async for event in cache.watch():
                        events.append(event)
                        if event.kind == "watching":
                            watching.set()
                        if event.kind == "ready":
                            nursery.cancel_scope.cancel()

                nursery.start_soon(collect)
                await watching.wait()  # registered: nothing from here on is missed
                async with vmcache.connect(daemon.endpoint) as other:
                    vm = await other.get_vm(timeout=30)
        assert [e.kind for e in events] == ["watching", "handed_out", "booting", "ready"]
        assert events[0].ready == 1 and events[0].cache_size == 1
        assert events[1].vm_id == vm.id and events[1].pid == vm.pid
        assert events[3].vm_id != vm.id and events[3].ready == 1 and events[3].cache_size == 1
        await vm.aclose()
    finally:
        daemon.signal(signal.SIGTERM)
        output, _ = watcher.communicate(timeout=30)
    lines = [first_line.rstrip("\n"), *output.splitlines()]
    assert lines[0].endswith(f"1/1 ready (daemon pid {daemon.pid})")
    assert any(f"handed_out VM {vm.id}" in line for line in lines), output
    assert any(line.split()[1] == "1/1" and "ready" in line.split()[3] for line in lines[1:]), output


def test_config_show_and_check(tmp_path: Path) -> None:
    done = subprocess.run([*VMCACHE, "config", "show"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    shown = tomllib.loads(done.stdout)
    assert config_from_dict(shown) == Config(source="<config>")
    assert shown["factory"]["vm_cache_number"] == 1 and shown["hypervisor"]["qemu"]["accel"] == "auto"

    sample = ROOT / "contrib" / "vmcache.toml"
    done = subprocess.run([*VMCACHE, "config", "check", str(sample)], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, f"{sample}: ok\n")

    bad = tmp_path / "bad.toml"
    bad.write_text("[factory]\nvm_cache_number = 0\n")
    done = subprocess.run([*VMCACHE, "config", "check", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"vmcache: {bad}: factory.vm_cache_number: must be at least 1, not 0\n"

    missing = tmp_path / "missing.toml"
    missing.write_text('[hypervisor.qemu]\nkernel = "/no/vmlinuz"\ninitrd = "/no/initrd"\n')
    done = subprocess.run([*VMCACHE, "config", "check", "--files", str(missing)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "kernel not found: /no/vmlinuz" in done.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["get"], ["status"], ["quit"], ["run"], ["exec"],
                                     ["stop"], ["config", "show"], ["config", "check"], ["image", "build"]])
def test_every_help_has_an_example(command: list[str]) -> None:
    done = subprocess.run([*VMCACHE, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "example" in done.stdout
