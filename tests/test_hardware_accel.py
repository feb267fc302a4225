"""require_hardware_accel with a real daemon on a host where only TCG works (this one):
the refusal is said in one line, Status says why, and no TCG VM is ever booted or handed out."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from conftest import qemu_pids, wait_until
from daemon import Daemon

import vmcache
from vmcache.errors import CacheError

pytestmark = pytest.mark.qemu

REFUSAL = "refusing to boot or hand out VMs: this host serves only hardware-accelerated VMs"


@pytest.mark.parametrize("configured", ["tcg", "auto"])
async def test_only_tcg_here_and_required_hand_outs_fail_precondition(
    tmp_path: Path, run_dir: Path, guest_image: Path, configured: str
) -> None:
    before = qemu_pids()
    daemon = Daemon(tmp_path, run_dir, cache=2, accel=configured, require_hardware_accel=True,
                    kvm_probe_timeout=10.0)
    try:
        daemon.start()
        # tcg: known at start; auto: once the first boot (the KVM probe) fails.
        assert wait_until(lambda: daemon.status()["accel"] != "", 60, interval=0.2), daemon.log()
        status = daemon.status()
        if status["accel"] == "kvm":
            pytest.skip("KVM guests work on this host: nothing to refuse")
        assert status["require_hardware_accel"] is True
        assert "require_hardware_accel = false" in status["refusal"]
        if configured == "tcg":
            assert 'accel = "tcg" in the config' in status["accel_reason"]
        else:
            assert "KVM" in status["accel_reason"] or "/dev/kvm" in status["accel_reason"]

        # TakeVM, through the CLI: one line, saying what to do.
        got = daemon.cli("get", "--timeout", "20", check=False)
        assert got.returncode == 1 and got.stdout == "", got.stderr
        assert got.stderr.count("\n") == 1, got.stderr
        assert "FAILED_PRECONDITION" in got.stderr and "Make KVM work on this host" in got.stderr

        # Kata's GetBaseVM, through the library: the same refusal.
        async with vmcache.connect(daemon.endpoint) as cache:
            with trio.fail_after(30), pytest.raises(CacheError) as raised:
                await cache.get_base_vm(timeout=20)
        assert "FAILED_PRECONDITION" in str(raised.value)
        assert "require_hardware_accel" in str(raised.value)

        text = daemon.cli("status").stdout.splitlines()
        assert any(line.startswith("Accel: tcg, required (") for line in text), text
        assert any(line.startswith("Refusing hand-outs: this host serves only") for line in text), text
        status = daemon.status()
        assert status["vms"] == [] and status["handed_out_vms"] == [] and status["booting"] == 0
        assert status["boots"] == 0
        log = daemon.log()
        assert log.count(REFUSAL) == 1, log
        retried = [line for line in log.splitlines() if "boot failed" in line and "KVM probe" not in line]
        assert retried == [], "nothing is tried again and again (the KVM probe's one verdict aside)"
        assert daemon.signal(signal.SIGINT) == 0
    finally:
        daemon.ensure_stopped()
    assert qemu_pids() - before == set(), "no TCG VM was left (nor booted)"
    if configured == "tcg":
        assert not (run_dir / "state" / "kvm-probe.json").exists()
    else:
        kept = json.loads((run_dir / "state" / "kvm-probe.json").read_text())
        assert kept["kvm"] is False and kept["reason"]
