"""Paused idle VMs (``idle_vms = "paused"``) on a real daemon with real QEMU guests.

With ``hot_vms = 0`` every cached VM is paused and every hand-out resumes one: the
guest must come back answering, with the host's clock (it stood still while paused);
a paused VM that died or whose QEMU is stopped must never be handed out; SIGINT
purges paused VMs like running ones.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import pid_alive, qemu_pids, wait_until
from daemon import Daemon, stop_handed_out

pytestmark = pytest.mark.qemu

PAUSED_ONLY = {"idle_vms": "paused", "hot_vms": 0, "health_interval": 1.0}


def paused_count(daemon: Daemon) -> int:
    count: int = daemon.status()["pools"][0]["paused"]
    return count


def guest_time(daemon: Daemon, handle_json: str, tmp_path: Path) -> float:
    handle_file = tmp_path / f"vm-{os.urandom(4).hex()}.json"
    handle_file.write_text(handle_json)
    ran = daemon.cli("exec", str(handle_file), "--", "python3", "-c", "import time; print(time.time())")
    return float(ran.stdout)


def test_paused_vms_come_back_answering_with_the_hosts_clock(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    before = qemu_pids()
    daemon = Daemon(tmp_path, run_dir, cache=2, factory=PAUSED_ONLY).start()
    try:
        cached = daemon.wait_cached(2)
        assert wait_until(lambda: paused_count(daemon) == 2, 30), daemon.log()
        assert "2/2 ready (2 paused)" in daemon.cli("status").stdout
        time.sleep(4)  # paused: the guests' clocks stand still meanwhile

        handle_json = daemon.cli("get").stdout
        handle = json.loads(handle_json)
        assert handle["pid"] in cached
        skew = guest_time(daemon, handle_json, tmp_path) - time.time()
        assert abs(skew) < 1.5, f"the resumed guest's clock is {skew:+.1f} s off the host's"
        stop_handed_out(handle_json, tmp_path)

        daemon.wait_cached(2)
        assert wait_until(lambda: paused_count(daemon) == 2, 30), daemon.log()
        assert daemon.signal(signal.SIGINT) == 0
        assert qemu_pids() - before == set(), "SIGINT must purge paused VMs"
        assert "stopped: 1 VMs handed out, 2 cached VMs killed" in daemon.log()
    finally:
        daemon.ensure_stopped()


def test_a_paused_vm_that_died_or_is_stopped_is_never_handed_out(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    before = qemu_pids()
    daemon = Daemon(tmp_path, run_dir, cache=3, factory=PAUSED_ONLY).start()
    stopped_pid = 0
    try:
        daemon.wait_cached(3)
        assert wait_until(lambda: paused_count(daemon) == 3, 60), daemon.log()
        dead_pid, stopped_pid, good_pid = daemon.cached_pids()
        os.kill(dead_pid, signal.SIGKILL)
        os.kill(stopped_pid, signal.SIGSTOP)

        handed = []
        for _ in range(2):
            handle_json = daemon.cli("get", "--timeout", "60").stdout
            handle = json.loads(handle_json)
            handed.append(handle["pid"])
            handle_file = tmp_path / f"vm-{handle['pid']}.json"
            handle_file.write_text(handle_json)
            assert daemon.cli("exec", str(handle_file), "--", "echo", "alive").stdout == "alive\n"
            stop_handed_out(handle_json, tmp_path)
        assert dead_pid not in handed and stopped_pid not in handed
        assert good_pid in handed
        assert wait_until(lambda: not pid_alive(stopped_pid), 30), "the stopped QEMU must be killed"

        assert daemon.signal(signal.SIGINT) == 0
        assert qemu_pids() - before == set()
    finally:
        if stopped_pid and pid_alive(stopped_pid):
            os.kill(stopped_pid, signal.SIGCONT)
        daemon.ensure_stopped()
