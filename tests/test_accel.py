"""accel = "auto": KVM probed once per host, its verdict kept; the fallback logged once, in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio
from conftest import write_config

from vmcache import accel
from vmcache.accel import AccelChooser
from vmcache.config import load_config, resolve_spec
from vmcache.errors import BootError
from vmcache.qemu import kvm_probe_file, launch_vm

QEMU_ASSERTION = "Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed."


class FakeBoots:
    """Records each boot's accel; KVM boots fail the way they do on hosts like this one."""

    def __init__(self, kvm_works: bool) -> None:
        self.kvm_works = kvm_works
        self.calls: list[tuple[str, float | None]] = []

    async def __call__(self, accel_name: str, timeout: float | None) -> str:
        self.calls.append((accel_name, timeout))
        if accel_name == "kvm" and not self.kvm_works:
            raise BootError(f"VM did not become ready; last console lines: {QEMU_ASSERTION}")
        return accel_name


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
    assert json.loads(cache.read_text())["kvm"] is False

    # Another daemon (or run --direct) on the same host: no probe, no warning.
    warnings_before = [r for r in caplog.records if r.levelno >= logging.WARNING]
    boots.calls.clear()
    second = AccelChooser(cache)
    assert await second.boot(qemu, 3.0, boots) == "tcg"
    assert boots.calls == [("tcg", None)]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_before) == 1 and warnings == warnings_before
    (line,) = [r.getMessage() for r in warnings]
    assert "KVM guests do not come up on this host; using TCG" in line
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
