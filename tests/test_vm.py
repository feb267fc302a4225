"""One real QEMU guest under Trio (TCG): boot, exec, stop, and every way a boot can end badly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids, write_config

from vmcache.config import VMSpec, load_config, resolve_spec
from vmcache.errors import AgentError, BootError, ConfigError
from vmcache.hugepages import no_huge_pages_for_children
from vmcache.image.build import AGENT_DIR
from vmcache.image.cpio import directory, gzip_deterministic, regular_file, write_cpio
from vmcache.lifecycle import Phase
from vmcache.qemu import boot_vm, launch_vm
from vmcache.qemu_argv import qemu_argv

pytestmark = pytest.mark.qemu


def spec_for(tmp_path: Path, run_dir: Path, **qemu: object) -> VMSpec:
    config = write_config(tmp_path / "vmcache.toml", **qemu)  # type: ignore[arg-type]
    return resolve_spec(load_config(config), run_root=run_dir)


def test_argv_is_a_list_with_private_sockets(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir)
    argv = qemu_argv(spec, run_dir / "vm-x", "tcg", "vmcache-x")
    assert argv[0] == str(spec.qemu)
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    joined = " ".join(argv)
    assert f"path={run_dir}/vm-x/qmp.sock" in joined and f"path={run_dir}/vm-x/control.sock" in joined
    assert all(f"path={run_dir}/vm-x/agent-{n}.sock" in joined for n in range(16))
    weird = spec_for(tmp_path, Path("/tmp/a,b"))
    assert "path=/tmp/a,,b/vm-x/agent-0.sock" in " ".join(qemu_argv(weird, Path("/tmp/a,b/vm-x"), "tcg", "n"))


async def test_two_vms_boot_run_commands_and_leave_nothing(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    spec = spec_for(tmp_path, run_dir)
    boot_ids = []
    pids = []

    async def one() -> None:
        async with launch_vm(spec) as vm:
            assert vm.life.phase is Phase.READY
            # Ours, its group the VM's own uid (QEMU makes its sockets there), nothing for others.
            info = vm.run_dir.stat()
            assert (oct(info.st_mode & 0o7777), info.st_uid, info.st_gid) == ("0o1770", 0, vm.uid)
            assert os.getsid(vm.pid) == vm.pid  # its own session: a terminal's ^C is ours to relay
            # No transparent huge pages: each guest page touched costs 4 KiB of RSS, not 2 MiB.
            assert "THP_enabled:\t0" in Path(f"/proc/{vm.pid}/status").read_text()
            # ...while the process that started it keeps its own setting.
            assert "THP_enabled:\t1" in Path("/proc/self/status").read_text()
            pids.append(vm.pid)
            result = await vm.exec(["cat", "/proc/sys/kernel/random/boot_id"])
            assert result.returncode == 0
            boot_ids.append((result.stdout or b"").decode().strip())
            assert boot_ids[-1] == vm.boot_id

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
    assert len(set(boot_ids)) == 2
    assert not any(pid_alive(pid) for pid in pids)
    assert list(run_dir.iterdir()) == []


def test_run_direct_relays_output_and_status(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    config = write_config(tmp_path / "vmcache.toml")
    before = qemu_pids()
    done = subprocess.run(
        [*VMCACHE, "run", "--direct", "--config", str(config), "--",
         "sh", "-c", "printf 'out\\0put'; echo oops >&2; exit 42"],
        capture_output=True, timeout=120,
    )
    assert done.returncode == 42
    assert done.stdout == b"out\0put"
    assert done.stderr.endswith(b"oops\n")
    assert qemu_pids() == before
    assert list(run_dir.iterdir()) == []


async def test_cancelled_boot_leaves_nothing(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir)
    for delay in (0.0, 0.05, 0.5):
        before = qemu_pids()
        with trio.move_on_after(delay) as scope:
            await boot_vm(spec)
        assert scope.cancelled_caught
        assert qemu_pids() == before
        assert list(run_dir.iterdir()) == []


async def test_boot_timeout_kills_and_quotes_console(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    spec = spec_for(tmp_path, run_dir, boot_timeout=1.5, kernel_params="loglevel=7 ignore_loglevel")
    before = qemu_pids()
    with trio.fail_after(60), pytest.raises(BootError) as caught:
        await boot_vm(spec)
    message = str(caught.value)
    assert "did not become ready within 1.5 s" in message
    assert "last console lines:" in message and "\n" not in message
    assert qemu_pids() == before
    assert list(run_dir.iterdir()) == []


async def test_qemu_exiting_mid_boot_is_a_boot_error(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    spec = spec_for(tmp_path, run_dir)
    before = qemu_pids()

    async def kill_qemu_once_started() -> None:
        while True:
            started = qemu_pids() - before
            if started:
                await trio.sleep(0.3)
                for pid in started:
                    os.kill(pid, signal.SIGKILL)
                return
            await trio.sleep(0.01)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_qemu_once_started)
            with pytest.raises(BootError, match="QEMU exited with status -9 during start-up"):
                await boot_vm(spec)
    assert qemu_pids() == before
    assert list(run_dir.iterdir()) == []


def test_an_initrd_that_is_not_one_is_a_config_error(tmp_path: Path, run_dir: Path,
                                                     guest_image: Path) -> None:
    bogus = tmp_path / "bogus.cpio.gz"
    bogus.write_bytes(b"this is not an initramfs")
    with pytest.raises(ConfigError, match="not a cpio archive"):
        spec_for(tmp_path, run_dir, kernel=str(guest_image / "vmlinuz"), initrd=str(bogus))


async def test_bad_initrd_fails_fast_with_console_lines(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    """An initramfs that looks right (python3 and the agent are there) but has no /init:
    the kernel panics, QEMU exits, and the boot fails at once quoting the panic."""
    no_init = tmp_path / "no-init.cpio.gz"
    no_init.write_bytes(gzip_deterministic(write_cpio([
        directory("usr"), directory("usr/bin"), regular_file("usr/bin/python3", b"", 0o755),
        directory("vmcache"), directory(AGENT_DIR),
        regular_file(f"{AGENT_DIR}/vmcache_agent.py", b""),
        regular_file(f"{AGENT_DIR}/agent_protocol.py", b""),
        regular_file(f"{AGENT_DIR}/agent_base.py", b""),
        regular_file(f"{AGENT_DIR}/agent_process.py", b""),
        regular_file(f"{AGENT_DIR}/agent_files.py", b""),
        regular_file(f"{AGENT_DIR}/agent_tcp.py", b""),
    ])))
    spec = spec_for(tmp_path, run_dir, kernel=str(guest_image / "vmlinuz"), initrd=str(no_init),
                    kernel_params="loglevel=4")
    started = time.monotonic()
    with trio.fail_after(60), pytest.raises(BootError) as caught:
        await boot_vm(spec)
    # Not the 60 s boot timeout: the kernel panics, QEMU exits, and we say so at once,
    # quoting what the guest printed.
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert "QEMU exited" in message and "last console lines:" in message
    assert "Kernel panic" in message, message
    assert list(run_dir.iterdir()) == []


async def test_clock_and_entropy_reach_the_guest(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir)
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            assert vm.agent is not None
            await vm.agent.set_clock(2_000_000_000)
            result = await vm.exec(["date", "+%s"])
            assert abs(int(result.stdout or b"") - 2_000_000_000) <= 2
            await vm.agent.set_clock()
            result = await vm.exec(["date", "+%s"])
            assert abs(int(result.stdout or b"") - time.time()) <= 2
            await vm.agent.add_entropy(b"\x00\xff" * 32)
            assert (await vm.exec(["true"])).returncode == 0


async def test_cancel_while_running_a_command_stops_the_vm(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    spec = spec_for(tmp_path, run_dir)
    before = qemu_pids()
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            with trio.move_on_after(0.5) as scope:
                await vm.exec(["sleep", "30"])
            assert scope.cancelled_caught
            pid = vm.pid
    assert not pid_alive(pid)
    assert qemu_pids() == before
    assert list(run_dir.iterdir()) == []


def test_ctrl_c_during_run_direct_stops_the_vm(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """SIGINT to our process group: QEMU (its own session) does not get it; we stop it."""
    config = write_config(tmp_path / "vmcache.toml")
    before = qemu_pids()
    process = subprocess.Popen([*VMCACHE, "run", "--direct", "--config", str(config), "--", "sleep", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (qemu_pids() - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(4)  # booted by now, running `sleep 60`
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's ^C does
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert stderr.decode().strip().endswith("vmcache: interrupted (SIGINT)")
    assert "Traceback" not in stderr.decode()
    assert qemu_pids() == before
    assert list(run_dir.iterdir()) == []


async def test_a_guest_panic_ends_qemu_so_the_pool_notices(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    """panic=-1 and -no-reboot turn a guest kernel panic into QEMU exiting: the exit the
    pool watches for every cached VM."""
    spec = spec_for(tmp_path, run_dir)
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            console = vm.run_dir / "console.log"
            with pytest.raises(AgentError):
                await vm.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"])
            assert await vm.wait_exited() == 0
            assert "Kernel panic" in console.read_text(errors="replace")
            assert not vm.alive
    assert list(run_dir.iterdir()) == []


def test_starting_qemus_leaves_this_process_its_huge_pages() -> None:
    """Starts that overlap (slots refilling at once) share the flag; the last one puts it back."""
    def this_process() -> str:
        return next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("THP_enabled:"))

    assert this_process().endswith("1")
    with no_huge_pages_for_children:
        with no_huge_pages_for_children:
            assert this_process().endswith("0")
        assert this_process().endswith("0"), "one start is still in progress"
    assert this_process().endswith("1")
