"""Snapshot refill: restored VMs are private, fresh (RNG, clock) and behave like booted ones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids, wait_until, write_config
from daemon import Daemon, stop_handed_out

from vmcache.config import load_config, resolve_spec
from vmcache.snapshot import SnapshotManager

pytestmark = pytest.mark.qemu


def test_snapshot_daemon_hands_out_fresh_private_vms(tmp_path: Path, run_dir: Path,
                                                     guest_image: Path) -> None:
    before = qemu_pids()
    daemon = Daemon(tmp_path, run_dir, cache=2, factory={"boot_mode": "snapshot", "health_interval": 1.0})
    daemon.start()
    handles: list[str] = []
    try:
        daemon.wait_cached(2)  # booted plainly while the template is made
        assert wait_until(lambda: "saved" in daemon.log(), 120), daemon.log()
        plain = [daemon.cli("get").stdout for _ in range(2)]  # the first fill: plain boots
        for handle in plain:
            stop_handed_out(handle, tmp_path)
        daemon.wait_cached(2)  # refilled from the snapshot
        handles += [daemon.cli("get").stdout for _ in range(2)]
        refilled = daemon.wait_cached(2)
        status = daemon.status()
        assert status["boot_mode"] == "snapshot"
        restored = {json.loads(h)["id"] for h in handles}
        assert all(f"VM {vm_id} restored" in daemon.log() for vm_id in restored), \
            "both VMs compared below are clones restored from the one snapshot"
        samples = []
        for number, handle in enumerate(handles):
            path = tmp_path / f"vm{number}.json"
            path.write_text(handle)
            asked = time.time()
            out = daemon.cli("exec", str(path), "--", "sh", "-c",
                             "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s").stdout
            random_hex, guest_time = out.split()
            samples.append(random_hex)
            assert asked - 1 <= int(guest_time) <= time.time() + 1, "guest clock within 1 s of the host"
        assert len(set(samples)) == len(samples), "two VMs shared RNG output"

        snapshots = list((run_dir / "state").rglob("*.vmstate"))
        assert len(snapshots) == 1
        assert snapshots[0].stat().st_size < 4 << 20, "guest RAM is not in the state file"
        assert not list((run_dir / "state").rglob("template-*.ram")), "the template's RAM is in no file"
        for handle in handles:  # each clone maps the template's RAM privately: shared until written
            pid = json.loads(handle)["pid"]
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            template = [line for line in maps if "/memfd:vmcache-template" in line]
            assert template and all(line.split()[1] == "rw-p" for line in template)
            # Sealed: not even root can write it through the clone's own descriptor.
            fd = next(entry for entry in Path(f"/proc/{pid}/fd").iterdir()
                      if "memfd:vmcache-template" in os.readlink(entry))
            with open(fd, "r+b", buffering=0) as memory, pytest.raises(PermissionError):
                memory.write(b"x")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"-kernel" not in argv, "a clone keeps no copy of the kernel: it is in the guest's RAM"
        assert daemon.signal(signal.SIGINT) == 0
        assert not snapshots[0].exists(), "the snapshot file is removed when the daemon exits"
        assert not any(pid_alive(pid) for pid in refilled)
        pids = {json.loads(h)["pid"] for h in handles}
        assert all(pid_alive(pid) for pid in pids)
        assert qemu_pids() - before == pids
    finally:
        daemon.ensure_stopped()
        for handle in handles:
            stop_handed_out(handle, tmp_path)
    assert qemu_pids() == before


async def test_corrupt_snapshot_is_discarded_and_rebuilt(tmp_path: Path, run_dir: Path,
                                                        guest_image: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    shutil.copy(guest_image / "vmlinuz", kernel)
    shutil.copy(guest_image / "initramfs.cpio.gz", initrd)
    config = write_config(tmp_path / "c.toml", kernel=str(kernel), initrd=str(initrd),
                          image=str(guest_image / "rootfs.erofs"))
    spec = resolve_spec(load_config(config), run_root=run_dir)
    manager = SnapshotManager(spec, run_dir / "snapshots")

    async def wait_for_snapshot() -> None:
        while manager.snapshot is None:
            await trio.sleep(0.05)

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await wait_for_snapshot()
            first = manager.snapshot
            assert first is not None
            vm = await manager.boot(spec)
            assert manager.restores == 1
            await vm.stop()

            # Truncate the file: the restore is refused, the VM boots plainly, a new snapshot is made.
            with open(first.path, "r+b") as handle:
                handle.truncate(first.size // 2)
            vm = await manager.boot(spec)
            assert (manager.restores, manager.fallbacks) == (1, 1)
            assert (await vm.exec(["echo", "ok"])).stdout == b"ok\n"
            await vm.stop()
            await wait_for_snapshot()
            assert manager.builds == 2

            # Change what shapes the guest (a new initrd): the snapshot is rebuilt for it.
            initrd.touch()
            vm = await manager.boot(spec)
            assert manager.fallbacks == 2
            await vm.stop()
            await wait_for_snapshot()
            assert manager.builds == 3
            vm = await manager.boot(spec)
            assert manager.restores == 2
            await vm.stop()
            nursery.cancel_scope.cancel()
    assert list((run_dir / "snapshots").iterdir()) == []
    assert [p for p in run_dir.iterdir() if p.name.startswith("vm-")] == []


def test_snapshot_mode_run_end_to_end(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    daemon = Daemon(tmp_path, run_dir, cache=1, factory={"boot_mode": "snapshot"}).start()
    try:
        daemon.wait_cached(1)
        done = subprocess.run([*VMCACHE, "run", "--endpoint", str(daemon.endpoint), "--", "uname", "-s"],
                              capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout) == (0, "Linux\n")
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.ensure_stopped()
