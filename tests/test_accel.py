"""accel = "auto": KVM probed once per host, its verdict kept; the fallback logged once, in one line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import write_config

from vmcache import accel
from vmcache.accel import AccelChooser
from vmcache.config import VMSpec, load_config, resolve_spec
from vmcache.errors import BootError, HardwareAccelRequiredError
from vmcache.pool import VMPool
from vmcache.qemu import kvm_probe_file, launch_vm

QEMU_ASSERTION = "Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed."
#: What vmcache.qemu.start_vm raises when QEMU dies under KVM, as on this machine (status -6).
QEMU_ABORTED = f"QEMU exited with status -6 during start-up; last console lines: {QEMU_ASSERTION}"
#: ... and when the KVM guest hangs (the other way KVM fails here).
GUEST_HUNG = ("VM 0123456789ab did not become ready within 3 s (accel kvm); "
              "last console lines: (no console output)")


class FakeBoots:
    """Records each boot's accel; KVM boots fail the way they do on hosts like this one."""

    def __init__(self, kvm_works: bool, failure: str = QEMU_ABORTED) -> None:
        self.kvm_works = kvm_works
        self.failure = failure
        self.calls: list[tuple[str, float | None]] = []

    async def __call__(self, accel_name: str, timeout: float | None) -> str:
        self.calls.append((accel_name, timeout))
        if accel_name == "kvm" and not self.kvm_works:
            raise BootError(self.failure)
        return accel_name


@pytest.fixture(autouse=True)
def accel_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmcache.accel")


@pytest.fixture
def kvm_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_opens", lambda: True)


async def test_the_probe_runs_once_per_host_and_its_verdict_is_kept(
    tmp_path: Path, kvm_opens: None, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "state" / "kvm-probe.json"
    qemu = Path("/usr/bin/true")
    boots = FakeBoots(kvm_works=False)
    caplog.set_level(logging.DEBUG, logger="vmcache.accel")
    first = AccelChooser(cache)
    assert await first.boot(qemu, 3.0, boots) == "tcg"
    assert await first.boot(qemu, 3.0, boots) == "tcg"
    assert boots.calls == [("kvm", 3.0), ("tcg", None), ("tcg", None)]
    kept = json.loads(cache.read_text())
    assert kept["kvm"] is False and kept["reason"] == "QEMU aborted (SIGABRT) when it started a KVM guest"

    # Another run --direct on the same host: no probe, no warning (the daemon's case: below).
    warnings_before = [r for r in caplog.records if r.levelno >= logging.WARNING]
    boots.calls.clear()
    second = AccelChooser(cache)
    assert await second.boot(qemu, 3.0, boots) == "tcg"
    assert boots.calls == [("tcg", None)]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_before) == 1 and warnings == warnings_before
    (line,) = [r.getMessage() for r in warnings]
    assert line.startswith("accel auto: VMs run on TCG (full emulation, outside what QEMU supports")
    assert "QEMU aborted (SIGABRT) when it started a KVM guest" in line
    assert QEMU_ASSERTION not in line and "\n" not in line
    assert any(QEMU_ASSERTION in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


async def test_a_changed_host_is_probed_again(tmp_path: Path, kvm_opens: None) -> None:
    cache = tmp_path / "kvm-probe.json"
    boots = FakeBoots(kvm_works=False)
    await AccelChooser(cache).boot(Path("/usr/bin/true"), 3.0, boots)
    boots.kvm_works = True
    boots.calls.clear()
    # Another QEMU binary: the old verdict does not apply.
    assert await AccelChooser(cache).boot(Path("/usr/bin/env"), 3.0, boots) == "kvm"
    assert boots.calls == [("kvm", 3.0)]


async def test_concurrent_boots_share_one_probe(tmp_path: Path, kvm_opens: None) -> None:
    boots = FakeBoots(kvm_works=True)
    chooser = AccelChooser(tmp_path / "kvm-probe.json")
    results: list[str] = []
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(lambda: _append(results, chooser.boot(Path("/usr/bin/true"), 3.0, boots)))
    assert results == ["kvm"] * 4
    assert [call for call in boots.calls if call[1] is not None] == [("kvm", 3.0)]


async def _append(results: list[str], boot: object) -> None:
    results.append(await boot)  # type: ignore[misc]


def daemon_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vmcache.accel" and r.levelno >= level]


async def test_kvm_never_falls_back_its_failures_are_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """accel = "kvm": no probe, no TCG, ever; even with no /dev/kvm at all (said at start)."""
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "no-kvm")
    chooser = AccelChooser(tmp_path / "kvm-probe.json", "kvm", daemon=True)
    verdict = chooser.announce_at_start(Path("/usr/bin/true"))
    assert verdict is not None and verdict.accel == "kvm"
    (line,) = daemon_lines(caplog, logging.WARNING)
    assert "never falls back to TCG" in line and f"there is no {tmp_path / 'no-kvm'}" in line
    boots = FakeBoots(kvm_works=False)
    spec = VMSpec(qemu=Path("/usr/bin/true"), kernel=Path("/k"), initrd=Path("/i"), kernel_params="",
                  machine_type="q35", vcpus=1, memory_mib=256, accel="kvm", boot_timeout=10,
                  kvm_probe_timeout=5, run_root=tmp_path)

    async def boot(_spec: VMSpec) -> str:
        return await chooser.boot(_spec.qemu, 5.0, boots)

    pool = VMPool(spec, 1, boot=boot)  # type: ignore[arg-type]
    with trio.move_on_after(60):
        await pool.run()
    assert len(boots.calls) >= 5, "retried"
    assert set(boots.calls) == {("kvm", None)}, "always KVM, never a probe or TCG"
    assert pool.stats.failures_in_row == len(boots.calls)
    assert "QEMU exited with status -6" in pool.stats.last_error
    assert not (tmp_path / "kvm-probe.json").exists()


@pytest.mark.parametrize(("situation", "reason"), [
    ("no device", "there is no "),
    ("not accessible", "is not accessible to uid"),
    ("guest hangs", "the KVM probe guest did not come up within 3 s (kvm_probe_timeout)"),
    ("QEMU aborts", "QEMU aborted (SIGABRT) when it started a KVM guest"),
])
async def test_auto_warns_why_it_falls_back_once_per_daemon_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    situation: str, reason: str,
) -> None:
    cache = tmp_path / "kvm-probe.json"
    qemu = Path("/usr/bin/true")
    boots = FakeBoots(kvm_works=False, failure=GUEST_HUNG if situation == "guest hangs" else QEMU_ABORTED)
    if situation == "no device":
        monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    elif situation == "not accessible":
        def refuse(path: object, flags: int) -> int:
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(os, "open", refuse)
    else:
        monkeypatch.setattr(accel, "kvm_device_problem", lambda: None)
    for start in range(2):  # the same host, two daemon starts: the second reads the probe file
        caplog.clear()
        chooser = AccelChooser(cache, "auto", daemon=True)
        chooser.announce_at_start(qemu)
        for _ in range(2):
            assert await chooser.boot(qemu, 3.0, boots) == "tcg"
        (line,) = [text for text in daemon_lines(caplog) if "VMs run on" in text]  # one verdict
        assert [r.levelno for r in caplog.records if r.getMessage() == line] == [logging.WARNING]
        assert line.startswith("accel auto: VMs run on TCG") and reason in line and "\n" not in line
        assert chooser.verdict is not None and reason in chooser.verdict.reason
        if start and situation in ("guest hangs", "QEMU aborts"):
            assert f"kept in {cache}" in line and "remove it to probe again" in line
    probes = [call for call in boots.calls if call[0] == "kvm"]
    assert probes == ([("kvm", 3.0)] if situation in ("guest hangs", "QEMU aborts") else [])


async def test_auto_says_kvm_at_info_when_it_works(tmp_path: Path, kvm_opens: None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "kvm-probe.json"
    boots = FakeBoots(kvm_works=True)
    chooser = AccelChooser(cache, "auto", daemon=True)
    assert chooser.announce_at_start(Path("/usr/bin/true")) is None  # the first boot probes
    assert await chooser.boot(Path("/usr/bin/true"), 3.0, boots) == "kvm"
    verdicts = [r.levelno for r in caplog.records if "VMs run on" in r.getMessage()]
    assert verdicts == [logging.INFO]
    assert "accel auto: VMs run on KVM (a KVM guest came up in" in daemon_lines(caplog)[-1]
    caplog.clear()
    again = AccelChooser(cache, "auto", daemon=True)
    verdict = again.announce_at_start(Path("/usr/bin/true"))
    assert verdict is not None and verdict.accel == "kvm" and "earlier probe" in verdict.reason
    assert len(daemon_lines(caplog)) == 1


@pytest.mark.parametrize("configured", ["tcg", "auto"])
async def test_require_hardware_accel_never_boots_tcg(
    tmp_path: Path, kvm_opens: None, caplog: pytest.LogCaptureFixture, configured: str,
) -> None:
    boots = FakeBoots(kvm_works=False)
    chooser = AccelChooser(tmp_path / "kvm-probe.json", configured, require_hardware=True, daemon=True)
    chooser.announce_at_start(Path("/usr/bin/true"))
    assert chooser.refused.is_set() == (configured == "tcg")  # auto: known after the probe
    for _ in range(3):
        with pytest.raises(HardwareAccelRequiredError) as raised:
            await chooser.boot(Path("/usr/bin/true"), 3.0, boots)
        assert "require_hardware_accel = false" in str(raised.value)
    assert chooser.refused.is_set()
    assert boots.calls == ([] if configured == "tcg" else [("kvm", 3.0)]), "never TCG"
    (line,) = daemon_lines(caplog, logging.WARNING)  # one line, at start or when the probe decides
    assert line.startswith("refusing to boot or hand out VMs: this host serves only hardware-accelerated")
    assert [r.levelno for r in caplog.records if r.getMessage() == line] == [logging.ERROR]
    refusal = chooser.refusal()
    assert refusal is not None and "Make KVM work on this host" in refusal
    if configured == "auto":
        assert "QEMU aborted (SIGABRT)" in refusal


async def test_require_hardware_accel_boots_kvm_where_it_works(tmp_path: Path, kvm_opens: None) -> None:
    boots = FakeBoots(kvm_works=True)
    chooser = AccelChooser(tmp_path / "kvm-probe.json", "auto", require_hardware=True, daemon=True)
    assert await chooser.boot(Path("/usr/bin/true"), 3.0, boots) == "kvm"
    assert await chooser.boot(Path("/usr/bin/true"), 3.0, boots) == "kvm"
    assert chooser.refusal() is None and not chooser.refused.is_set()


@pytest.mark.qemu
async def test_the_handle_names_the_accelerator_qemu_really_runs(tmp_path: Path, run_dir: Path,
                                                                 guest_image: Path) -> None:
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml", accel="tcg")), run_root=run_dir)
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            assert vm.qmp is not None
            kvm = await vm.qmp.execute("query-kvm")
            assert kvm == {"enabled": False, "present": accel.kvm_device_opens()}
            assert vm.handle().accel == "tcg"


@pytest.mark.qemu
async def test_auto_on_this_host_boots_and_remembers(tmp_path: Path, run_dir: Path, guest_image: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """For real: whatever KVM does here, auto gives a working VM, and the verdict is kept."""
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml", accel="auto",
                                                 kvm_probe_timeout=5.0)), run_root=run_dir)
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            first_accel = vm.accel
            assert (await vm.exec(["echo", "up"])).stdout == b"up\n"
    verdict = json.loads(kvm_probe_file(run_dir).read_text())["kvm"] if accel.kvm_device_opens() else None
    if verdict is not None:
        assert first_accel == ("kvm" if verdict else "tcg")
    caplog.clear()
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            assert vm.accel == first_accel
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "logged once, not again"
