"""What the QEMU binary can do, asked once per binary and off the event loop.

``qemu -version`` (for the snapshot key) and ``qemu -sandbox ... -version`` (is
QEMU built with seccomp?) are child processes: they run through
``trio.run_process`` with a timeout, and their answers are kept per binary (path,
size and mtime), so a daemon asks once.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import attrs
import trio

from .config import VMSpec
from .errors import BootError

log = logging.getLogger("vmcache.qemu")

PROBE_TIMEOUT = 30.0
_ANSWERS: dict[tuple[object, ...], tuple[int, str]] = {}


def _binary_key(binary: Path) -> tuple[object, ...]:
    try:
        info = binary.stat()
    except OSError:
        return (str(binary),)
    return (str(binary), info.st_size, info.st_mtime_ns)


async def _ask(binary: Path, *args: str) -> tuple[int, str]:
    """Run ``binary args`` once (per binary and args); its status and first line of output."""
    key = (*_binary_key(binary), *args)
    if key not in _ANSWERS:
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                done = await trio.run_process([str(binary), *args], capture_stdout=True,
                                              capture_stderr=True, check=False,
                                              stdin=subprocess.DEVNULL)
            lines = done.stdout.decode(errors="replace").splitlines()
            _ANSWERS[key] = (done.returncode, lines[0] if lines else "")
        except (OSError, trio.TooSlowError) as error:
            return -1, f"{type(error).__name__}: {error}"  # not kept: may work next time
    return _ANSWERS[key]


async def qemu_version(binary: Path) -> str:
    """QEMU's version line ("" if it would not say)."""
    status, line = await _ask(binary, "-version")
    return line if status == 0 else ""


async def sandbox_supported(binary: Path, value: str) -> bool:
    """Whether this QEMU accepts ``-sandbox value`` (it was built with seccomp)."""
    if not value:
        return False
    status, _ = await _ask(binary, "-sandbox", value, "-version")
    return status == 0


_WARNED: set[tuple[str, str]] = set()


async def usable_spec(spec: VMSpec) -> VMSpec:
    """``spec`` as this QEMU can run it: without ``-sandbox`` if QEMU lacks seccomp and that is
    allowed (warned once), else a BootError."""
    if not spec.sandbox or await sandbox_supported(spec.qemu, spec.sandbox):
        return spec
    if spec.require_sandbox:
        raise BootError(f"{spec.qemu} does not accept -sandbox {spec.sandbox} (built without "
                        "seccomp?): refusing to run it; set jail.allow_no_seccomp = true to accept that")
    if (str(spec.qemu), spec.sandbox) not in _WARNED:
        _WARNED.add((str(spec.qemu), spec.sandbox))
        log.warning("%s does not accept -sandbox %s; running QEMU without its seccomp filter",
                    spec.qemu, spec.sandbox)
    return attrs.evolve(spec, sandbox="")
