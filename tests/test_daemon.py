"""A real daemon process, real QEMU guests, real gRPC on a real Unix socket, real signals."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids, wait_until
from daemon import Daemon, stop_handed_out

import vmcache
from vmcache.errors import DeadlineExceededError

pytestmark = pytest.mark.qemu


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path):  # type: ignore[no-untyped-def]
    instance = Daemon(tmp_path, run_dir, cache=2)
    yield instance
    instance.ensure_stopped()


def test_fill_hand_out_refill_and_sigint(daemon: Daemon, tmp_path: Path, run_dir: Path) -> None:
    before = qemu_pids()
    daemon.start()
    cached = daemon.wait_cached(2)
    assert daemon.status()["pid"] == daemon.pid
    assert set(cached) == qemu_pids() - before

    assert wait_until(lambda: daemon.status()["pools"][0]["paused"] == 1, 10), daemon.log()
    text = daemon.cli("status").stdout.splitlines()
    assert text[0] == f"VM cache server pid = {daemon.pid}"
    vm_lines = [line for line in text[1:] if line.startswith("VM pid")]
    assert sorted(vm_lines) == sorted(f"VM pid = {pid} Cpu = 1 Memory = 256MiB" for pid in cached)
    assert "Cache: 2/2 ready (1 paused), 0 booting, boot mode boot" in text  # the next in line runs
    assert 'Accel: tcg (accel = "tcg" in the config)' in text
    status = daemon.status()
    assert [vm["accel"] for vm in status["vms"]] == ["tcg", "tcg"]
    assert (status["accel"], status["require_hardware_accel"], status["refusal"]) == ("tcg", False, "")

    handle_json = daemon.cli("get").stdout
    handle = json.loads(handle_json)
    assert {"id", "pid", "qmp_socket", "agent_socket", "cpu", "memory"} <= handle.keys()
    assert handle["pid"] in cached and pid_alive(handle["pid"])
    assert (handle["cpu"], handle["memory"]) == (1, 256)
    assert handle["accel"] == "tcg"
    (ledger,) = daemon.status()["handed_out_vms"]
    assert (ledger["id"], ledger["accel"]) == (handle["id"], "tcg")
    assert handle["pid"] not in daemon.cached_pids()

    refilled = daemon.wait_cached(2)
    assert handle["pid"] not in refilled

    handle_file = tmp_path / "vm.json"
    handle_file.write_text(handle_json)
    ran = daemon.cli("exec", str(handle_file), "--", "cat", "/proc/sys/kernel/random/boot_id")
    assert ran.stdout.strip() == handle["boot_id"]

    assert daemon.signal(signal.SIGINT) == 0
    assert not any(pid_alive(pid) for pid in refilled)
    assert pid_alive(handle["pid"]), "the handed-out VM must outlive the daemon"
    assert not daemon.endpoint.exists()
    assert qemu_pids() - before == {handle["pid"]}
    assert "stopped: 1 VMs handed out, 2 cached VMs killed" in daemon.log()

    # The VM is ours: it still answers, and we can stop it.
    ran = daemon.cli("exec", str(handle_file), "--", "echo", "still here")
    assert ran.stdout == "still here\n"
    daemon.cli("stop", str(handle_file))
    assert not pid_alive(handle["pid"])
    assert not Path(handle["run_dir"]).exists()
    again = daemon.cli("stop", str(handle_file), check=False)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "not running" in again.stderr


def test_quit_stops_the_daemon_with_nothing_left(daemon: Daemon, run_dir: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    done = daemon.cli("quit")
    assert "stopped" in done.stderr
    assert daemon.process is not None and daemon.process.wait(timeout=5) == 0
    assert qemu_pids() == before
    assert not daemon.endpoint.exists()
    assert [p for p in run_dir.iterdir() if p.name.startswith("vm-")] == []


def test_endpoint_from_environment_then_config(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    env = {**os.environ, "VMCACHE_ENDPOINT": str(daemon.endpoint)}
    done = subprocess.run([*VMCACHE, "status", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(done.stdout)["pid"] == daemon.pid
    done = subprocess.run([*VMCACHE, "status", "--json", "--config", str(daemon.config)],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["pid"] == daemon.pid
    assert daemon.signal(signal.SIGTERM) == 0


def test_client_without_daemon_gets_one_line(tmp_path: Path) -> None:
    for command in (["status"], ["get"], ["quit"]):
        done = subprocess.run([*VMCACHE, *command, "--endpoint", str(tmp_path / "none.sock")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        endpoint = tmp_path / "none.sock"
        assert done.stderr == f"vmcache: no vmcache daemon at {endpoint}: start one with `vmcache serve`\n"


def test_stale_socket_is_taken_over_and_a_live_one_refused(daemon: Daemon) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(daemon.endpoint))
    stale.close()  # the file stays, with nothing behind it: what a crash leaves
    assert daemon.endpoint.is_socket()
    daemon.start()
    assert oct(daemon.endpoint.stat().st_mode & 0o777) == "0o600"
    assert daemon.status()["pid"] == daemon.pid

    second = subprocess.run([*VMCACHE, "serve", "--config", str(daemon.config)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert second.stderr == f"vmcache: another vmcache daemon is already serving {daemon.endpoint}\n"
    assert daemon.status()["pid"] == daemon.pid
    assert daemon.signal(signal.SIGTERM) == 0


def zombie_children(parent: int) -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z" and int(fields[1]) == parent:
                zombies.append(int(entry.name))
    return zombies


def grpcio_stubs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Kata's proto compiled with grpcio's own generator: an independent client."""
    proto_dir = Path(__file__).resolve().parent.parent / "protos"
    out = tmp_path / "grpcio_stubs"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}",
                    f"--grpc_python_out={out}", str(proto_dir / "cache.proto")], check=True, timeout=60)
    sys.path.insert(0, str(out))
    try:
        for name in ("cache_pb2", "cache_pb2_grpc"):
            sys.modules.pop(name, None)
        return importlib.import_module("cache_pb2"), importlib.import_module("cache_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def test_grpcio_client_calls_all_four_rpcs(daemon: Daemon, tmp_path: Path) -> None:
    import grpc
    from google.protobuf.empty_pb2 import Empty

    _pb2, pb2_grpc = grpcio_stubs(tmp_path)
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    with grpc.insecure_channel(f"unix://{daemon.endpoint}") as channel:
        stub = pb2_grpc.CacheServiceStub(channel)
        config = stub.Config(Empty(), timeout=10)
        assert json.loads(config.Data)["memory"] == 256
        assert json.loads(config.AgentConfig)["port"] == "vmcache.agent"
        status = stub.Status(Empty(), timeout=10)
        assert status.pid == daemon.pid and len(status.vmstatus) == 2
        vm = stub.GetBaseVM(Empty(), timeout=30)
        hypervisor = json.loads(vm.hypervisor)
        assert hypervisor["ID"] == vm.id and hypervisor["State"]["Pid"] in [s.pid for s in status.vmstatus]
        assert os.path.exists(hypervisor["QmpChannelpath"])
        assert (vm.cpu, vm.memory) == (1, 256)
        stub.Quit(Empty(), timeout=10)
    assert daemon.process is not None and daemon.process.wait(timeout=30) == 0
    assert qemu_pids() - before == {hypervisor["State"]["Pid"]}
    stop_handed_out(json.dumps(hypervisor["vmcache"]), tmp_path)


async def test_twenty_concurrent_clients_are_served_in_arrival_order(daemon: Daemon) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    outcomes: dict[int, str | int] = {}
    served_at: dict[int, float] = {}
    gave_up_at: dict[int, float] = {}
    handles: list[vmcache.VMHandle] = []

    async def client(index: int) -> None:
        await trio.sleep(index * 0.05)  # arrive in index order
        async with vmcache.connect(daemon.endpoint) as cache:
            asked = trio.current_time()
            try:
                vm = await cache.get_vm(timeout=8)
            except DeadlineExceededError:
                outcomes[index] = "deadline"
                gave_up_at[index] = asked + 8
                return
        outcomes[index] = vm.pid
        served_at[index] = trio.current_time()
        handles.append(vm)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(client, index)
        served = [i for i in range(20) if outcomes[i] != "deadline"]
        assert len(outcomes) == 20
        # First come, first served: no served client got its VM after a later one. Two VMs that
        # become ready in the same instant reach their clients a few ms apart in either order
        # (each is pinged first), hence the 0.1 s of slack.
        for early, late in itertools.combinations(served, 2):
            assert served_at[early] <= served_at[late] + 0.1, f"not in arrival order: {outcomes}"
        # A client may only be overtaken by a later one once its own deadline has passed.
        for early, deadline in gave_up_at.items():
            for late in served:
                assert late < early or served_at[late] >= deadline - 0.2, (
                    f"client {late} was served before client {early} gave up: {outcomes}")
        assert served[:2] == [0, 1]
        handed_pids = {vm.pid for vm in handles}
        assert len(handed_pids) == len(handles), "a VM was handed out twice"
        cached = set(daemon.wait_cached(2))  # refilled: no boot in progress any more
        assert not cached & handed_pids
        assert qemu_pids() - before == cached | handed_pids, "an orphaned QEMU"
        assert all(pid_alive(pid) for pid in handed_pids)
    finally:
        for vm in handles:
            await vm.aclose()
    # The daemon reaps the VMs it handed out once they exit: no zombies stay behind.
    assert wait_until(lambda: not zombie_children(daemon.pid), 10), zombie_children(daemon.pid)
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before


async def test_library_serve_in_a_nursery(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    from conftest import write_config

    before = qemu_pids()
    endpoint = run_dir / "lib.sock"
    config = vmcache.load_config(write_config(tmp_path / "lib.toml", cache=1, endpoint=endpoint))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(vmcache.serve, config)
            assert endpoint.is_socket()  # started() means the socket listens
            async with vmcache.connect(endpoint) as cache:
                vm = await cache.get_vm(timeout=60)
                while not (await cache.status()).vms:
                    await trio.sleep(0.2)
                cached_pid = (await cache.status()).vms[0].pid
            nursery.cancel_scope.cancel()
    assert not pid_alive(cached_pid), "cancelling the nursery purges the cache"
    assert not endpoint.exists()
    async with vm:
        assert pid_alive(vm.pid), "the handed-out VM outlives the cancelled server"
        result = await vm.exec(["uname", "-s"])
        assert result.stdout == b"Linux\n"
    assert not pid_alive(vm.pid)
    assert wait_until(lambda: qemu_pids() == before, 10)


async def test_giving_up_on_a_shared_connection_costs_no_vm(tmp_path: Path, run_dir: Path,
                                                            guest_image: Path) -> None:
    """A library caller cancels get_vm but keeps its connection: the daemon must stop
    waiting on its behalf (RST_STREAM), not hand the next VM to a call nobody reads."""
    daemon = Daemon(tmp_path, run_dir, cache=1).start()
    try:
        await trio.to_thread.run_sync(daemon.wait_cached, 1)
        async with vmcache.connect(daemon.endpoint) as cache:
            taken = await cache.get_vm(timeout=30)
            with trio.move_on_after(0.5) as gave_up:
                await cache.get_vm(timeout=60)  # waits for the refill; we give up first
            assert gave_up.cancelled_caught
            refilled = await trio.to_thread.run_sync(daemon.wait_cached, 1)
            status = await cache.status()
            assert status.handed_out == 1, "a VM went to the call we gave up"
            assert [vm.pid for vm in status.vms] == refilled
            assert all(vm.rss_bytes > 16 << 20 for vm in status.vms), "Status reports each VM's RSS"
        await taken.aclose()
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()
