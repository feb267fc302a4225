"""Shared fixtures: QEMU process counting, private run directories, test configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcache import procfs
from vmcache.paths import default_image_dir
from vmcache.procfs import qemu_pids as qemu_pids

TCG_BOOT_TIMEOUT = 60.0


def pid_alive(pid: int) -> bool:
    return procfs.alive(pid)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


#: Every private run directory of this test session starts with this (see ``run_dir``).
RUN_DIR_PREFIX = f"/tmp/vmcache-test-{os.getpid()}-"


def ours(pid: int) -> bool:
    """A QEMU of this test session (its sockets live in one of our run directories); only
    those are ever killed here, never another engineer's or another run's."""
    return RUN_DIR_PREFIX.encode() in procfs.cmdline(pid)


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Every test must leave the set of QEMU processes as it found it."""
    before = qemu_pids()
    yield
    leaked: set[int] = set()

    def settled() -> bool:
        nonlocal leaked
        leaked = qemu_pids() - before
        return not leaked

    if not wait_until(settled, 10.0):
        for pid in leaked:
            if ours(pid):
                os.kill(pid, 9)
        pytest.fail(f"test leaked QEMU processes: {sorted(leaked)}")


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's tmp_path, searchable (o+x) down from /tmp: a jailed QEMU runs as a VM's own uid
    and must pass through the directories of the kernels and images tests put there."""
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path("/tmp"):
            break
        directory.chmod(directory.stat().st_mode | 0o001)
    return tmp_path


@pytest.fixture
def run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private VMCACHE_RUN_DIR (short path: Unix sockets live there) that must end empty."""
    path = Path(f"{RUN_DIR_PREFIX}{time.monotonic_ns() % 10**9}")
    path.mkdir(mode=0o700)
    monkeypatch.setenv("VMCACHE_RUN_DIR", str(path))
    yield path
    leftovers = [p.name for p in path.iterdir() if p.name.startswith("vm-")]
    subprocess.run(["rm", "-rf", str(path)], check=False)
    assert not leftovers, f"run directories left behind: {leftovers}"


@pytest.fixture(scope="session")
def guest_image() -> Path:
    image = default_image_dir()
    if not (image / "vmlinuz").is_file():
        pytest.fail(f"no guest image at {image}: run scripts/setup (vmcache image build)")
    return image


def write_config(path: Path, *, cache: int = 1, endpoint: Path | None = None,
                 factory: dict[str, object] | None = None,
                 pools: dict[str, dict[str, object]] | None = None, **qemu: object) -> Path:
    """A TOML config for tests: TCG, generous boot timeout; overrides from ``factory``/``qemu``."""
    settings: dict[str, object] = {"accel": "tcg", "boot_timeout": TCG_BOOT_TIMEOUT} | qemu
    lines = ["[factory]", f"vm_cache_number = {cache}"]
    if endpoint is not None:
        lines.append(f'vm_cache_endpoint = "{endpoint}"')
    lines += [f"{key} = {json.dumps(value)}" for key, value in (factory or {}).items()]
    lines.append("[hypervisor.qemu]")
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for name, pool in (pools or {}).items():
        lines.append(f"[pools.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in pool.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


VMCACHE = [sys.executable, "-m", "vmcache"]


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler: its own code runs (Python's start-up is over)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) & (1 << (15 - 1)))


def wait_running(pid: int, timeout: float = 10.0) -> None:
    """Wait until a freshly started Python process runs its own code (see handles_sigterm)."""
    wait_until(lambda: handles_sigterm(pid), timeout, interval=0.005)
