"""VMs sized per request, and pools of several shapes: a real daemon, real hot-add under TCG."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VMCACHE, qemu_pids
from daemon import Daemon
from test_daemon import grpcio_stubs

pytestmark = pytest.mark.qemu


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path) -> Iterator[Daemon]:
    instance = Daemon(tmp_path, run_dir, cache=1, pools={"big": {"vm_cache_number": 1, "vcpus": 2,
                                                                   "memory": 512}})
    yield instance
    instance.ensure_stopped()


def test_a_vm_grown_to_the_size_asked(daemon: Daemon, tmp_path: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    done = subprocess.run([*VMCACHE, "run", "--endpoint", str(daemon.endpoint), "--pool", "default",
                           "--cpus", "2", "--memory", "1024", "--", "sh", "-c",
                           "nproc; grep MemTotal /proc/meminfo"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr + daemon.log()
    nproc, meminfo = done.stdout.splitlines()
    assert nproc == "2"
    assert int(meminfo.split()[1]) >= 900 * 1024, meminfo
    assert "grew" in daemon.log() or "grown" in daemon.log()
    # The handle says the size handed out; the VM is the default pool's, grown.
    daemon.wait_cached(2)
    default_pids = {vm["pid"] for vm in daemon.status()["vms"] if vm["pool"] == "default"}
    handle = json.loads(daemon.cli("get", "--pool", "default", "--cpus", "2", "--memory", "1024").stdout)
    assert (handle["cpu"], handle["memory"]) == (2, 1024)
    assert handle["pid"] in default_pids
    stop = subprocess.run([*VMCACHE, "stop", "-"], input=json.dumps(handle), capture_output=True,
                          text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before


def test_two_pools_fill_and_serve_their_own_shapes(daemon: Daemon, tmp_path: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(2)
    status = daemon.status()
    assert [(p["name"], p["cpu"], p["memory"], p["ready"]) for p in status["pools"]] == [
        ("default", 1, 256, 1), ("big", 2, 512, 1)]
    by_pool = {vm["pool"]: vm["pid"] for vm in status["vms"]}
    text = daemon.cli("status").stdout
    assert "Pool big: 2 vCPU 512 MiB, 1/1 ready" in text
    big = json.loads(daemon.cli("get", "--cpus", "2", "--memory", "512").stdout)
    small = json.loads(daemon.cli("get").stdout)
    assert (big["pid"], big["cpu"], big["memory"]) == (by_pool["big"], 2, 512)
    assert (small["pid"], small["cpu"], small["memory"]) == (by_pool["default"], 1, 256)
    for handle in (big, small):
        assert subprocess.run([*VMCACHE, "stop", "-"], input=json.dumps(handle), capture_output=True,
                              text=True, timeout=60).returncode == 0

    # Beyond the maxima: one line, INVALID_ARGUMENT, and the cache is unharmed.
    cached = set(daemon.wait_cached(2))
    refused = daemon.cli("get", "--cpus", "64", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "at most" in refused.stderr and "default_maxvcpus" in refused.stderr
    assert set(daemon.cached_pids()) == cached

    # Kata's GetBaseVM still gets the default pool's base VM.
    import grpc
    from google.protobuf.empty_pb2 import Empty

    _pb2, pb2_grpc = grpcio_stubs(tmp_path)
    with grpc.insecure_channel(f"unix://{daemon.endpoint}") as channel:
        vm = pb2_grpc.CacheServiceStub(channel).GetBaseVM(Empty(), timeout=30)
    assert (vm.cpu, vm.memory, vm.cpuDelta) == (1, 256, 0)
    kata = json.loads(vm.hypervisor)["vmcache"]
    assert kata["pid"] in cached
    assert subprocess.run([*VMCACHE, "stop", "-"], input=json.dumps(kata), capture_output=True,
                          text=True, timeout=60).returncode == 0
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before
