"""Requests about the guest as a whole: entropy, the clock, hot-added CPUs and memory."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmcache.guest import agent_loop as base
else:
    import agent_loop as base

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def count_cpu_list(text: str) -> int:
    """How many CPUs a list like ``0-3,5`` names."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class System:
    """What the agent does to the guest as a whole; paths are configurable for tests."""

    def __init__(self, sys_dir: str, proc_dir: str, random_device: str, set_clock: bool) -> None:
        self.sys_dir = sys_dir
        self.proc_dir = proc_dir
        self.random_device = random_device
        self.clock_allowed = set_clock
        try:
            with open(os.path.join(proc_dir, "sys/kernel/random/boot_id")) as file:
                self.boot_id = file.read().strip()
        except OSError as error:
            base.log(f"no boot id: {base.os_error_text(error)}")
            self.boot_id = "unknown"

    def add_entropy(self, data: bytes) -> None:
        """Credit ``data`` to the kernel's pool (RNDADDENTROPY), then reseed the CRNG."""
        if not data or len(data) > 4096:
            raise base.RequestFailed("entropy must be 1 to 4096 bytes")
        try:
            fd = os.open(self.random_device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as error:
            raise base.RequestFailed(f"cannot open {self.random_device}: {base.os_error_text(error)}",
                                     error.errno) from None
        try:
            for name, number, argument in (
                ("RNDADDENTROPY", RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data),
                ("RNDRESEEDCRNG", RNDRESEEDCRNG, 0),
            ):
                try:
                    fcntl.ioctl(fd, number, argument)
                except OSError as error:
                    raise base.RequestFailed(
                        f"{name} on {self.random_device} failed: {base.os_error_text(error)}",
                        error.errno) from None
        finally:
            os.close(fd)

    def set_clock(self, seconds: float) -> None:
        if not self.clock_allowed:
            raise base.RequestFailed("setting the clock is disabled (--no-set-clock)", errno.EPERM)
        try:
            time.clock_settime(time.CLOCK_REALTIME, seconds)
        except OSError as error:
            raise base.RequestFailed(f"cannot set the clock: {base.os_error_text(error)}",
                                     error.errno) from None

    def online(self) -> Generator[None, None, dict[str, Any]]:
        """Bring hot-added CPUs and memory online; report what the guest now sees.

        A generator that yields after each sysfs write: onlining many memory
        blocks can take a while under TCG, and the loop keeps answering pings
        in between.
        """
        problems: list[str] = []
        memory = os.path.join(self.sys_dir, "devices/system/memory")
        for name in sorted(_listdir(memory)):
            state = os.path.join(memory, name, "state")
            if name.startswith("memory") and _read(state) == "offline":
                for wanted in ("online_movable", "online"):
                    try:
                        _write(state, wanted)
                        break
                    except OSError as error:
                        failure = f"{name}: {base.os_error_text(error)}"
                else:
                    problems.append(failure)
                yield
        cpus = os.path.join(self.sys_dir, "devices/system/cpu")
        for name in sorted(_listdir(cpus)):
            online = os.path.join(cpus, name, "online")
            if name.startswith("cpu") and name[3:].isdigit() and _read(online) == "0":
                try:
                    _write(online, "1")
                except OSError as error:
                    problems.append(f"{name}: {base.os_error_text(error)}")
                yield
        online_list = _read(os.path.join(cpus, "online"))
        try:
            online_cpus = count_cpu_list(online_list) if online_list else os.cpu_count() or 1
        except ValueError:
            online_cpus = os.cpu_count() or 1
        mem_total = 0
        for line in (_read(os.path.join(self.proc_dir, "meminfo")) or "").splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1])
        return {"online_cpus": online_cpus, "mem_total_kib": mem_total, "problems": problems}


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
