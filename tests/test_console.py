"""The guest is hostile: what it writes on the host is bounded, what it says is escaped.

Unit tests of the console's rotation, drain and tail (a Unix socket stands in for QEMU's),
of ``printable`` and of the file size limit on QEMU's own output; then real (TCG) guests
that flood their console, fake a panic line with terminal escapes, and die.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import TCG_BOOT_TIMEOUT, write_config

from vmcache import console
from vmcache.config import load_config, resolve_spec
from vmcache.console import CONSOLE_LOG, RotatingLog, console_tail, drain, limit_qemu_output
from vmcache.errors import GuestProcessError, VMDiedError, printable
from vmcache.qemu import launch_vm

# ---------------------------------------------------------------------- printable


def test_printable_escapes_terminal_controls_and_leaves_text_alone() -> None:
    assert printable("Kernel panic - not syncing: boom é ✓") == "Kernel panic - not syncing: boom é ✓"
    assert printable("\x1b]0;pwned\x07\x1b[2J done\r") == "\\x1b]0;pwned\\x07\\x1b[2J done\\x0d"
    assert printable("C1 \x9b2J, NEL \x85, bidi \u202eevil") == "C1 \\x9b2J, NEL \\x85, bidi \\u202eevil"
    assert printable("two\nlines\t") == "two\\x0alines\\x09"
    assert printable("two\nlines", newlines=True) == "two\nlines"
    once = printable("\x1b[31mred\\x1b")
    assert printable(once) == once, "escaping twice changes nothing"


def test_a_commands_last_stderr_line_in_its_error_is_escaped() -> None:
    error = GuestProcessError(["false"], 1, b"", b"ok\n\x1b]0;pwned\x07 bad\n")
    assert str(error) == "guest command 'false' exited with status 1: \\x1b]0;pwned\\x07 bad"


def test_a_guest_files_mode_loses_its_special_bits_and_gets_the_umask() -> None:
    from vmcache import transfer

    umask = os.umask(0o027)
    os.umask(umask)
    assert transfer.process_umask() == umask  # read from /proc, left as it was
    assert transfer.host_mode(0o7777) == 0o777 & ~umask
    assert transfer.host_mode(0o4755) & 0o7000 == 0


# ---------------------------------------------------------------------- rotation


def test_the_console_log_is_capped_and_rotated_in_place(tmp_path: Path) -> None:
    path = tmp_path / CONSOLE_LOG
    log = RotatingLog(path, cap=1000)
    inodes = (os.stat(path).st_ino, os.stat(f"{path}.1").st_ino)
    for line in range(500):
        log.write(f"line {line:04d}\n".encode())
    log.write(b"x" * 5000)  # one write beyond the cap keeps its end
    log.write(b"\nlast\n")
    log.close()
    newest, older = path.read_bytes(), Path(f"{path}.1").read_bytes()
    assert len(newest) <= 1000 and len(older) <= 1000
    assert (older, newest) == (b"x" * 1000, b"\nlast\n")
    assert (os.stat(path).st_ino, os.stat(f"{path}.1").st_ino) == inodes, "readers keep their files"

    # An adopted VM's log goes on where it was.
    log = RotatingLog(path, cap=1000)
    log.write(b"again\n")
    log.close()
    assert path.read_bytes() == newest + b"again\n"


def test_the_tail_reads_both_files_and_quotes_the_panic_escaped(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / CONSOLE_LOG, cap=1024)
    log.write(b"boot\n\x1b]0;pwned\x07\x1b[2J Kernel panic - boom\n")
    for line in range(120):  # a flood after the panic line rotates it into console.log.1
        log.write(f"flood {line}\n".encode())
    log.close()
    assert b"Kernel panic" not in (tmp_path / CONSOLE_LOG).read_bytes()
    tail = console_tail(tmp_path)
    assert tail.startswith("\\x1b]0;pwned\\x07\\x1b[2J Kernel panic - boom | ... | flood 115 |")
    assert tail.endswith("flood 119")
    assert console.telling_console_line(console.read_console(tmp_path)).endswith("Kernel panic - boom")


def test_a_quoted_console_line_is_bounded(tmp_path: Path) -> None:
    """A guest that writes no newline makes its whole log one line: we quote a piece."""
    (tmp_path / CONSOLE_LOG).write_text("x" * 100000 + " Kernel panic - boom " + "y" * 100000)
    telling = console.telling_console_line(console.read_console(tmp_path))
    assert telling.startswith("...xxx") and "Kernel panic - boom yyy" in telling
    assert len(telling) <= console.QUOTED_LINE + 3
    assert len(console_tail(tmp_path)) < 3 * console.QUOTED_LINE


# ---------------------------------------------------------------------- the drain


async def fake_qemu_console(run_dir: Path) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(str(run_dir / console.CONSOLE_SOCKET))
    sock.listen(1)
    return trio.SocketListener(sock)


async def test_the_drain_is_rate_limited_bounded_and_ends_at_eof(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    listener = await fake_qemu_console(tmp_path)
    sent = 0
    reads: list[int] = []
    real_write = RotatingLog.write

    def counting_write(self: RotatingLog, data: bytes) -> None:
        reads.append(len(data))
        real_write(self, data)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            RotatingLog.write = counting_write  # type: ignore[method-assign]
            try:
                nursery.start_soon(drain, tmp_path, lambda: True)
                qemu = await listener.accept()
                started = trio.current_time()
                async with qemu:
                    with trio.move_on_after(10):  # a guest writing as fast as it can
                        while True:
                            await qemu.send_all(b"y" * 65536)
                            sent += 65536
            finally:
                RotatingLog.write = real_write  # type: ignore[method-assign]
        # Closing the socket (QEMU exits) ended the drain: the nursery is done.
    elapsed = trio.current_time() - started
    drained = sum(reads)
    assert max(reads) <= console.READ_SIZE
    assert drained <= console.DRAIN_RATE * elapsed + console.READ_SIZE
    assert drained > console.DRAIN_RATE * 5, "it keeps up to its rate"
    assert sent - drained < 1 << 20, "the rest waited in the socket: QEMU is back-pressured"
    sizes = [path.stat().st_size for path in tmp_path.glob(f"{CONSOLE_LOG}*")]
    assert len(sizes) == 2 and max(sizes) <= console.CONSOLE_CAP
    await listener.aclose()


async def test_the_drain_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "CONNECT_TIMEOUT", 0.2)
    with trio.fail_after(10):
        await drain(tmp_path / "gone", lambda: False)  # no socket, QEMU gone: nothing to do
        await drain(tmp_path / "gone", lambda: True)  # never made: gives up after a while
        listener = await fake_qemu_console(tmp_path)
        (tmp_path / CONSOLE_LOG).mkdir()  # cannot keep the log: drains into nothing
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, tmp_path, lambda: True)
            async with await listener.accept() as qemu:
                await qemu.send_all(b"dropped\n" * 10000)
        await listener.aclose()


# ---------------------------------------------------------------------- qemu.log


def test_a_process_limited_like_qemu_cannot_grow_its_log(tmp_path: Path) -> None:
    """What start_vm does to QEMU: restore_signals=False, then the file size limit."""
    log_path = tmp_path / "qemu.log"
    with open(log_path, "wb") as log:
        script = f"read _; head -c 4000000 /dev/zero >&2; echo $? > {tmp_path}/status"
        child = subprocess.Popen(["sh", "-c", script],
                                 stdin=subprocess.PIPE, stdout=log, stderr=log, restore_signals=False)
    limit_qemu_output(child.pid)
    child.communicate(b"go\n", timeout=30)
    assert log_path.stat().st_size == console.QEMU_LOG_CAP
    assert (tmp_path / "status").read_text() == "1\n", "head saw EFBIG: SIGXFSZ stayed ignored"
    assert child.returncode == 0


# ---------------------------------------------------------------------- real guests (TCG)


def du(path: Path) -> int:
    return sum(entry.stat().st_blocks * 512 for entry in path.iterdir() if entry.is_file())


#: The fastest flood found under TCG (about 14-30 KB/s: a kernel printk flood through
#: /dev/kmsg is no faster); it counts its rounds in the guest.
FLOOD = "n=0; while :; do cat /proc/cpuinfo > /dev/ttyS0; n=$((n+1)); echo $n > /tmp/rounds; done"


@pytest.mark.qemu
async def test_a_guest_flooding_its_console_for_a_minute_cannot_fill_the_host(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    """Must-show: a minute of a guest writing its console as fast as it can leaves the run
    directory less than 2 MiB bigger, the VM answering promptly, and the panic that ends
    it quoted."""
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml")), run_root=run_dir)
    with trio.fail_after(TCG_BOOT_TIMEOUT + 120):
        async with launch_vm(spec) as vm:
            before = du(vm.run_dir)
            limits = Path(f"/proc/{vm.pid}/limits").read_text()
            assert f"Max file size             {console.QEMU_LOG_CAP}" in limits
            async with vm.open_process(["sh", "-c", FLOOD]):
                started = time.monotonic()
                slowest = 0.0
                while time.monotonic() - started < 60:
                    with trio.fail_after(2):
                        asked = time.monotonic()
                        await vm.ping()
                        slowest = max(slowest, time.monotonic() - asked)
                    assert du(vm.run_dir) - before < 2 << 20
                    await trio.sleep(1)
                kept = [(vm.run_dir / name).stat().st_size for name in (CONSOLE_LOG, f"{CONSOLE_LOG}.1")]
                rounds = int((await vm.run(["cat", "/tmp/rounds"])).stdout or b"0")
                written = rounds * len((await vm.run(["cat", "/proc/cpuinfo"])).stdout or b"")
                assert written > 2 * console.CONSOLE_CAP, "the guest wrote more than the log keeps"
                assert max(kept) <= console.CONSOLE_CAP and kept[1] > console.CONSOLE_CAP // 2, kept
                assert slowest < 1.0
                with pytest.raises(VMDiedError, match=r"not syncing: sysrq triggered crash\): "):
                    await vm.run(["sh", "-c", "echo c > /proc/sysrq-trigger"])
            assert "Kernel panic - not syncing: sysrq triggered crash" in console_tail(vm.run_dir)
            assert du(vm.run_dir) - before < 2 << 20


@pytest.mark.qemu
async def test_a_fake_panic_line_with_terminal_escapes_is_quoted_escaped(
    tmp_path: Path, run_dir: Path, guest_image: Path
) -> None:
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml")), run_root=run_dir)
    with trio.fail_after(TCG_BOOT_TIMEOUT + 30):
        async with launch_vm(spec) as vm:
            await vm.run(["sh", "-c", r"printf '\033]0;pwned\007\033[2J Kernel panic - boom\n' > /dev/ttyS0"],
                         check=True)
            while b"boom" not in (vm.run_dir / CONSOLE_LOG).read_bytes():
                await trio.sleep(0.02)  # the drain reads every READ_INTERVAL
            os.kill(vm.pid, signal.SIGKILL)
            with pytest.raises(VMDiedError) as died:
                await vm.run(["true"])
            assert "(\\x1b]0;pwned\\x07\\x1b[2J Kernel panic - boom)" in str(died.value)
            assert "\x1b" not in str(died.value) and "\x07" not in str(died.value)
            assert "\\x1b]0;pwned\\x07\\x1b[2J Kernel panic - boom" in console_tail(vm.run_dir)
