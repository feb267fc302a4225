"""No VM lost or leaked on any exit path: acknowledged hand-outs, leases, TTLs, the ledger.

Real daemons, real CLI processes, real signals; after each, QEMU processes and run
directories are counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids, wait_running, wait_until, write_config
from daemon import Daemon, run_as, stop_handed_out

import vmcache
from vmcache import server as daemon_module
from vmcache._proto import cache_pb2
from vmcache.errors import CacheError, LeaseLostError
from vmcache.procfs import cmdline

pytestmark = pytest.mark.qemu


def vm_dirs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith("vm-")}


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path):  # type: ignore[no-untyped-def]
    instance = Daemon(tmp_path, run_dir, cache=1)
    yield instance
    instance.ensure_stopped()


def run_cli(daemon: Daemon, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*VMCACHE, "run", "--endpoint", str(daemon.endpoint), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_handed_out(daemon: Daemon, count: int = 1, timeout: float = 60) -> list[dict[str, object]]:
    assert wait_until(lambda: len(daemon.status()["handed_out_vms"]) >= count, timeout, 0.2), daemon.log()
    vms: list[dict[str, object]] = daemon.status()["handed_out_vms"]
    return vms


def daemons_qemu(run_dir: Path) -> set[int]:
    """The QEMU processes of the daemon whose run directory is ``run_dir``: other engineers'
    and other runs' VMs on this machine come and go, and are not this test's business."""
    return {pid for pid in qemu_pids() if f"{run_dir}/".encode() in cmdline(pid)}


def test_sigterm_and_sigkill_to_a_warm_run_leave_no_vm(daemon: Daemon, run_dir: Path) -> None:
    daemon.start()
    (cached,) = daemon.wait_cached(1)

    # `timeout -s TERM 3 vmcache run -- sleep 60`: exit 124, one line from us, VM gone within 5 s,
    # released by the run itself on its lease (not by a StopVM on a second connection).
    done = subprocess.run(["timeout", "-s", "TERM", "3", *VMCACHE, "run", "--endpoint",
                           str(daemon.endpoint), "--", "sleep", "60"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 124
    assert done.stderr == "vmcache: interrupted (SIGTERM)\n"
    assert wait_until(lambda: not pid_alive(cached) and not daemon.status()["handed_out_vms"], 5), \
        daemon.log()
    assert f"(pid {cached}) stopped: the client released it" in daemon.log()
    # Nothing else of this daemon's runs but its cache, refilled (a boot may take 10 s on a busy host).
    assert set(daemon.wait_cached(1)) == daemons_qemu(run_dir), daemon.log()

    # kill -9: the run cannot clean up; its connection closes and the daemon stops the VM.
    process = run_cli(daemon, "--", "sleep", "60")
    (leased,) = wait_handed_out(daemon)
    assert leased["state"] == "leased"
    process.kill()
    process.wait()
    assert wait_until(lambda: not pid_alive(int(leased["pid"])), 5), daemon.log()  # type: ignore[call-overload]
    assert wait_until(lambda: f"vm-{leased['id']}" not in vm_dirs(run_dir), 5)
    assert daemon.signal(signal.SIGTERM) == 0
    assert daemons_qemu(run_dir) == set()
    assert vm_dirs(run_dir) == set()


def test_get_with_a_ttl_is_stopped_also_across_a_daemon_restart(daemon: Daemon, run_dir: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(1)
    first = json.loads(daemon.cli("get", "--ttl", "5").stdout)
    started = time.monotonic()
    status = daemon.status()["handed_out_vms"]
    assert [(vm["id"], vm["state"]) for vm in status] == [(first["id"], "claimed")]
    assert 0 < status[0]["expires_at"] - time.time() <= 5
    assert "TTL ends in" in daemon.cli("status").stdout
    assert wait_until(lambda: not pid_alive(first["pid"]), 7), daemon.log()
    assert time.monotonic() - started >= 4.5
    assert wait_until(lambda: f"vm-{first['id']}" not in vm_dirs(run_dir), 2)

    # The same with the daemon killed (SIGKILL) and started again meanwhile.
    daemon.wait_cached(1)
    second = json.loads(daemon.cli("get", "--ttl", "5").stdout)
    started = time.monotonic()
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    assert wait_until(lambda: not pid_alive(second["pid"]), 7 - (time.monotonic() - started)), daemon.log()
    assert "adopted claimed VM" in daemon.log()
    daemon.wait_cached(1)
    assert daemon.signal(signal.SIGTERM) == 0
    assert qemu_pids() == before
    assert vm_dirs(run_dir) == set()


def test_stop_refuses_a_handle_edited_to_name_something_else(daemon: Daemon, tmp_path: Path,
                                                             run_dir: Path) -> None:
    daemon.start()
    daemon.wait_cached(1)
    handle = json.loads(daemon.cli("get").stdout)
    bystander = subprocess.Popen(["sleep", "60"])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    edits: dict[str, dict[str, object]] = {
        "another directory": {"run_dir": str(precious)},
        "a path escape": {"run_dir": f"{run_dir}/vm-{handle['id']}/../../{precious.name}"},
        "another process": {"pid": bystander.pid},
        "another process with its start time": {"pid": bystander.pid,
                                                "start_time": vmcache_start_time(bystander.pid)},
        "an id that is a path": {"id": "../../etc"},
    }
    try:
        for what, edit in edits.items():
            edited = tmp_path / "edited.json"
            edited.write_text(json.dumps({**handle, **edit}))
            done = subprocess.run([*VMCACHE, "stop", str(edited)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, what
            assert (done.stderr.count("\n") == 1 and "not touching it" in done.stderr) or \
                "not a VM handle of ours" in done.stderr, (what, done.stderr)
            assert bystander.poll() is None, f"{what}: the bystander was signalled"
            assert (precious / "keep.txt").read_text() == "mine", f"{what}: the directory was touched"
            assert pid_alive(handle["pid"]), f"{what}: the VM was stopped through an edited handle"
    finally:
        bystander.kill()
        bystander.wait()
    real = tmp_path / "real.json"
    real.write_text(json.dumps(handle))
    daemon.cli("stop", str(real))
    assert not pid_alive(handle["pid"])
    assert daemon.signal(signal.SIGTERM) == 0


def test_a_decoy_naming_the_vm_and_foreign_run_dirs_are_refused(daemon: Daemon, tmp_path: Path,
                                                                 run_dir: Path) -> None:
    """The handle names the victim's id and run directory, and the pid of a decoy whose
    command line names the victim (``exec -a vmcache-<id>``): neither the daemon nor a local
    stop may quit the victim's QEMU, signal the decoy or remove the victim's directory."""
    daemon.start()
    daemon.wait_cached(1)
    victim = json.loads(daemon.cli("get").stdout)
    vm_dir = run_dir / f"vm-{victim['id']}"
    record = vm_dir / "vm.json"
    info = record.lstat()
    assert (info.st_uid, oct(info.st_mode & 0o777)) == (os.geteuid(), "0o644")
    identity = json.loads(record.read_text())
    assert (identity["pid"], identity["start_time"], identity["uid"]) == (
        victim["pid"], victim["start_time"], victim["uid"])
    # QEMU runs as the VM's own uid (vmcache.jail), which the handle and the record both say.
    assert victim["uid"] != os.geteuid() and victim["endpoint"] == str(daemon.endpoint)
    decoy = subprocess.Popen(["bash", "-c", f"exec -a vmcache-{victim['id']} sleep 60"])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    try:
        assert wait_until(lambda: f"vmcache-{victim['id']}".encode() in
                          Path(f"/proc/{decoy.pid}/cmdline").read_bytes().split(b"\0"), 5)
        forged = {**victim, "pid": decoy.pid, "start_time": vmcache_start_time(decoy.pid)}
        foreign = {**victim, "run_dir": str(precious), "qmp_socket": str(precious / "qmp.sock"),
                   "agent_socket": str(precious / "agent-0.sock"),
                   "console_log": str(precious / "console.log")}
        data = tmp_path / "data.txt"
        data.write_text("x")
        attempts: dict[str, tuple[dict[str, object], list[str]]] = {}
        for name, handle in (("decoy", forged), ("foreign run_dir", foreign)):
            for via, variant in (("daemon", handle), ("local", {**handle, "endpoint": ""})):
                path = tmp_path / f"{name}-{via}.json".replace(" ", "-")
                path.write_text(json.dumps(variant))
                attempts[f"stop, {name}, {via}"] = (variant, ["stop", str(path)])
                if via == "local":  # exec and cp never ask the daemon
                    attempts[f"exec, {name}"] = (variant, ["exec", str(path), "--", "true"])
                    attempts[f"cp, {name}"] = (variant, ["cp", str(data), f"{path}:/tmp/x"])
        for what, (_variant, argv) in attempts.items():
            done = subprocess.run([*VMCACHE, *argv], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, (what, done.stderr)
            assert done.stderr.count("\n") == 1 and "not touching it" in done.stderr, (what, done.stderr)
            assert decoy.poll() is None, f"{what}: the decoy was signalled"
            assert pid_alive(victim["pid"]), f"{what}: the victim was stopped"
            assert {"vm.json", "qmp.sock", "agent-0.sock"} <= {p.name for p in vm_dir.iterdir()}, what
            assert (precious / "keep.txt").read_text() == "mine", what
        assert "stop asked" not in daemon.log()
    finally:
        decoy.kill()
        decoy.wait()
    real = tmp_path / "real.json"
    real.write_text(json.dumps(victim))
    assert daemon.cli("exec", str(real), "--", "true").returncode == 0
    daemon.cli("stop", str(real))
    assert not pid_alive(victim["pid"]) and not vm_dir.exists()
    assert "stop asked by pid" in daemon.log()  # the daemon stopped it (StopVM), not the client
    assert daemon.signal(signal.SIGTERM) == 0


def test_a_local_stop_checks_the_identity_record(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """With no daemon in the way (a handle without endpoint): the record decides, and a
    record that is not the launcher's (replaced, a symlink) makes stop refuse."""
    config = write_config(tmp_path / "c.toml")

    async def main() -> None:
        spec = vmcache.resolve_spec(vmcache.load_config(config))
        async with vmcache.launch_vm(spec) as vm:
            handle = await vm.release()
        vm_handle, process = handle
        record = run_dir / f"vm-{vm_handle.id}" / "vm.json"
        saved = record.read_bytes()
        try:
            record.unlink()
            other = tmp_path / "other.json"
            other.write_bytes(saved)
            record.symlink_to(other)
            with pytest.raises(vmcache.HandleError, match="not to be trusted"):
                await vm_handle.stop()
            record.unlink()
            with pytest.raises(vmcache.HandleError, match="no identity record"):
                await vm_handle.stop()
            record.write_bytes(saved)
            os.chown(record, 65534, 65534)
            with pytest.raises(vmcache.HandleError, match="not to be trusted"):
                await vm_handle.stop()
            os.chown(record, 0, 0)
            assert process.returncode is None
            await vm_handle.stop()
            assert not record.parent.exists()
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()

    trio.run(main)


def test_stop_vm_is_for_the_vms_owner(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """StopVM: the uid that took the VM may stop it, another uid (admitted by socket_group) may not."""
    daemon = Daemon(tmp_path, run_dir, cache=1, factory={"socket_group": "nogroup"}).start()
    try:
        daemon.wait_cached(1)

        async def take() -> str:
            async with vmcache.connect(daemon.endpoint) as cache:
                return (await cache.get_vm(timeout=60)).to_json()

        taken = run_as(12345, 65534, take)  # in the group by its gid
        handle = vmcache.VMHandle.from_json(taken)
        assert [(vm["id"], vm["owner_uid"]) for vm in daemon.status()["handed_out_vms"]] == [
            (handle.id, 12345)]

        async def stop() -> str:
            async with vmcache.connect(daemon.endpoint) as cache:
                return f"ok {await cache.stop_vm(handle)}"

        refused = run_as(65534, 65534, stop)
        assert refused == (f"error the daemon refused this client: VM {handle.id} belongs to uid 12345; "
                           "uid 65534 may not stop it (only its owner, root and uid 0)"), refused
        assert pid_alive(handle.pid) and (run_dir / f"vm-{handle.id}").is_dir()
        assert run_as(12345, 65534, stop) == "ok True"
        assert not pid_alive(handle.pid)
        assert wait_until(lambda: not daemon.status()["handed_out_vms"], 5)
        assert not (run_dir / f"vm-{handle.id}").exists()
        assert run_as(12345, 65534, stop).startswith("error the daemon does not know: no VM")
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()


def test_one_uid_gets_at_most_max_vms_per_uid_and_a_member_may_not_quit(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    daemon = Daemon(tmp_path, run_dir, cache=1, factory={"max_vms_per_uid": 1,
                                                         "socket_group": "nogroup"}).start()
    try:
        daemon.wait_cached(1)
        first = daemon.cli("get").stdout
        for argv in (["get", "--endpoint", str(daemon.endpoint)],
                     ["run", "--endpoint", str(daemon.endpoint), "--", "true"]):
            done = subprocess.run([*VMCACHE, *argv], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stderr
            assert done.stderr == ("vmcache: the daemon refused: uid 0 already holds 1 VMs of this daemon, "
                                   "the most one user may (factory.max_vms_per_uid = 1): stop one "
                                   "(vmcache stop HANDLE) and ask again\n"), done.stderr

        async def quit_daemon() -> str:
            async with vmcache.connect(daemon.endpoint) as cache:
                await cache.quit()
            return "ok"

        refused = run_as(65534, 65534, quit_daemon)  # admitted by socket_group, not to Quit
        assert refused.startswith("error the daemon refused this client: Quit is for root"), refused
        assert daemon.process is not None and daemon.process.poll() is None
        stop_handed_out(first, tmp_path)
        stop_handed_out(daemon.cli("get").stdout, tmp_path)  # room again
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()


def vmcache_start_time(pid: int) -> int:
    from vmcache.procfs import process_start_time

    return process_start_time(pid)


def test_the_ledger_cleans_up_after_a_vm_killed_from_outside(daemon: Daemon, run_dir: Path) -> None:
    daemon.start()
    daemon.wait_cached(1)
    handle = json.loads(daemon.cli("get").stdout)
    assert f"vm-{handle['id']}" in vm_dirs(run_dir)
    os.kill(handle["pid"], signal.SIGKILL)
    assert wait_until(lambda: f"vm-{handle['id']}" not in vm_dirs(run_dir), 5), daemon.log()
    assert wait_until(lambda: not daemon.status()["handed_out_vms"], 5)
    assert "was killed by SIGKILL" in daemon.log()
    assert daemon.signal(signal.SIGTERM) == 0
    assert vm_dirs(run_dir) == set()


def test_sigint_to_run_direct_at_twenty_moments(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """Booting, restoring nothing, running the command, stopping: SIGINT anywhere is
    exit 130, one line, and no QEMU left."""
    config = write_config(tmp_path / "vmcache.toml")
    before = qemu_pids()
    moments = [0.2 * index for index in range(20)]  # 0 .. 3.8 s: imports, boot, the command

    def one(moment: float) -> tuple[int, str]:
        argv = [*VMCACHE, "run", "--direct", "--config", str(config), "--", "sleep", "30"]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        wait_running(process.pid)  # its life: from when its own code runs
        time.sleep(moment)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's ^C does
        _, stderr = process.communicate(timeout=60)
        return process.returncode, stderr.decode()

    async def all_moments() -> list[tuple[float, int, str]]:
        results: list[tuple[float, int, str]] = []
        limiter = trio.CapacityLimiter(2)

        async def run(moment: float) -> None:
            status, stderr = await trio.to_thread.run_sync(one, moment, limiter=limiter)
            results.append((moment, status, stderr))

        async with trio.open_nursery() as nursery:
            for moment in moments:
                nursery.start_soon(run, moment)
        return results

    results = trio.run(all_moments)
    for moment, status, stderr in results:
        assert (status, stderr) == (130, "vmcache: interrupted (SIGINT)\n"), moment
    assert wait_until(lambda: qemu_pids() == before, 5)
    assert vm_dirs(run_dir) == set()


async def test_library_lease_and_unclaimed_offers(tmp_path: Path, run_dir: Path, guest_image: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process daemon: a lease stops its VM at the block's end; an offer that is never
    claimed (client silent, or gone) is killed, not handed to anyone."""
    monkeypatch.setattr(daemon_module, "CLAIM_TIMEOUT", 2.0)
    config = vmcache.load_config(write_config(tmp_path / "c.toml", cache=1, endpoint=run_dir / "c.sock"))
    before = qemu_pids()
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(vmcache.serve, config)
            async with vmcache.connect(config.endpoint()) as cache:
                async with cache.lease_vm(timeout=120) as vm:
                    assert (await vm.exec(["echo", "leased"])).stdout == b"leased\n"
                    status = await cache.status()
                    assert [(v.id, v.state) for v in status.handed_out_vms] == [(vm.id, "leased")]
                assert not vm.is_running(), "the lease's end stops the VM"
                assert (await cache.status()).handed_out_vms == []

                # Silent after the offer: killed after CLAIM_TIMEOUT.
                async with cache._channel.open_call("TakeVM", cache_pb2.TakeReply) as call:
                    await call.send(cache_pb2.TakeRequest(ask=cache_pb2.TakeAsk(wait_seconds=120)))
                    offer = await call.receive()
                    assert offer is not None
                    offered = json.loads(offer.offer.hypervisor)["vmcache"]  # type: ignore[attr-defined]
                    with pytest.raises(CacheError, match="not claimed"):
                        await call.receive()
                assert not pid_alive(offered["pid"])

                # Gone after the offer (the call is reset): killed at once.
                async with cache._channel.open_call("TakeVM", cache_pb2.TakeReply) as call:
                    await call.send(cache_pb2.TakeRequest(ask=cache_pb2.TakeAsk(wait_seconds=120)))
                    offer = await call.receive()
                    assert offer is not None
                    offered = json.loads(offer.offer.hypervisor)["vmcache"]  # type: ignore[attr-defined]
                await trio.to_thread.run_sync(wait_until, lambda: not pid_alive(offered["pid"]), 5)
                assert not pid_alive(offered["pid"])

                # A lease whose VM dies: the block is cancelled, LeaseLostError says why.
                with pytest.raises(LeaseLostError, match=r"exited|killed"):
                    async with cache.lease_vm(timeout=120) as vm:
                        os.kill(vm.pid, signal.SIGKILL)
                        await trio.sleep_forever()
                stats = await cache.status()
                assert stats.handed_out_vms == []
            nursery.cancel_scope.cancel()
    assert qemu_pids() == before
    assert vm_dirs(run_dir) == set()
