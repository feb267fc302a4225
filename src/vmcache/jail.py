"""Every QEMU confined: its own uid, no capabilities, no_new_privs, its own namespaces,
a filesystem view of only what it needs, and a cgroup with limits.

The jail is made of two well-known tools rather than namespace code of our own:

- ``setpriv`` (util-linux), only when the daemon is root: QEMU's uid and gid become the
  VM's own (one per VM, from ``[jail] uid_base``/``uid_count``), supplementary groups
  are cleared (``kvm`` is kept where /dev/kvm is used), every capability set is emptied
  and ``no_new_privs`` is set;
- ``bwrap`` (bubblewrap, what Flatpak runs its apps in), run as that uid: new user,
  mount, pid, network, IPC, UTS and cgroup namespaces (the network namespace has only a
  loopback interface), nested user namespaces disabled, an empty environment, and a root
  filesystem that shows only /usr (QEMU, its libraries and firmware) read-only, the
  kernel, initrd and root image read-only, the VM's own run directory read-write, and a
  minimal /dev (null, zero, random, urandom, ...; /dev/kvm only under KVM). Every path
  that bubblewrap mounts is opened by us first and handed over as a file descriptor
  (``--ro-bind-fd``), so the VM's uid needs no access to the directories around them and
  a path swapped for a symlink meanwhile is never followed. QEMU runs as PID 1 of its pid
  namespace (``--as-pid-1``); bubblewrap stays as its parent and exits with its status.

Inside the sandbox, a gate (``bash -c 'read ... && exec QEMU'``, the shell exec'ing QEMU in
its place, with the descriptors we passed closed) waits for our word: by then we know
QEMU's host pid (``--info-fd``) and have put it into its cgroup (vmcache.cgroup) and
capped its log, so not one QEMU instruction runs outside its limits. If we go away first
(killed during those milliseconds), the gate reads EOF and the sandbox ends: it never
runs QEMU unlimited. (bubblewrap's own ``--block-fd`` would go on at EOF.) QEMU's own
``-sandbox`` seccomp filter comes on top (vmcache.qemu_binary).

A daemon that is not root runs QEMU as its own uid (it cannot choose another); the
namespaces and the filesystem view are the same, through an unprivileged user
namespace. What cannot be applied (no unprivileged user namespaces, no cgroup access)
is one line: a VM that cannot be confined is not started, a host without writable
cgroups runs VMs without limits and says so once (``CgroupManager.describe``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import stat
import subprocess
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import trio

from .cgroup import Cgroup, Limits, manager, remove_when_empty
from .config import JailConfig, VMSpec
from .console import QEMU_LOG_CAP
from .errors import BootError, ConfigError
from .process import PidfdProcess
from .vm_nic import Tap, attach_tap

log = logging.getLogger("vmcache.jail")

#: How long bubblewrap may take to set up the sandbox and say QEMU's pid.
SETUP_TIMEOUT = 10.0
#: Threads QEMU may need besides one per vCPU: the main loop, RCU, the block layer's
#: worker pool (up to 64), and spares.
BASE_PIDS = 128
#: QEMU's TCG translation cache when ``tb_size`` is 0 (QEMU 7.2's default on 64-bit hosts),
#: in MiB: filled as the guest runs new code, so it counts against a TCG VM's memory.
TCG_DEFAULT_TB_MIB = 1024
#: Top-level directories that are symlinks into /usr on merged-/usr systems (Debian 12),
#: or real directories of libraries and programs elsewhere.
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def is_root() -> bool:
    return os.geteuid() == 0


def pick_uid(jail: JailConfig, run_root: Path) -> int:
    """A uid for a new VM's QEMU: this process's own unless root; as root, one of the range
    that no VM under ``run_root`` uses (their run directories' group is their uid)."""
    if not is_root():
        return os.geteuid()
    used: set[int] = set()
    try:
        with os.scandir(run_root) as entries:
            for entry in entries:
                if entry.name.startswith("vm-"):
                    try:
                        used.add(entry.stat(follow_symlinks=False).st_gid)
                    except OSError:
                        pass
    except OSError:
        pass
    for _ in range(64):
        uid = jail.uid_base + secrets.randbelow(jail.uid_count)
        if uid not in used:
            return uid
    raise BootError(f"no free uid in jail.uid_base..+uid_count ({jail.uid_base}+{jail.uid_count})")


def limits(spec: VMSpec, accel: str) -> Limits:
    """The cgroup limits of one VM: the most guest RAM it may ever have, plus
    ``memory_overhead`` (and the translation cache under TCG); threads; CPU."""
    jail = spec.jail
    assert jail is not None
    memory_mib = spec.max_memory_mib + jail.memory_overhead
    if accel != "kvm":
        memory_mib += spec.tb_size_mib or TCG_DEFAULT_TB_MIB
    pids = jail.pids_max or BASE_PIDS + spec.max_vcpus
    cpus = jail.cpus or spec.max_vcpus + 1
    return Limits(memory_bytes=memory_mib << 20, pids=pids, cpus=cpus)


def describe_confinement(spec: VMSpec) -> str:
    """One line for the log and Status: how this daemon's QEMUs are confined."""
    if spec.jail is None:
        return f"none: QEMU runs unconfined as uid {os.geteuid()} (jail.enabled = false)"
    who = "a uid per VM" if is_root() else f"the daemon's own uid {os.geteuid()} (not root)"
    seccomp = f"seccomp ({spec.sandbox})" if spec.sandbox else "no seccomp (jail.allow_no_seccomp)"
    return (f"{who}, no capabilities, no_new_privs, own user/mount/pid/net/ipc/uts namespaces, "
            f"{seccomp}; {manager().describe()}")


def kvm_group(device: str = "/dev/kvm") -> int:
    """The group through which a VM's own uid may open ``device`` (udev's ``kvm``, mode
    0660), or a BootError saying why it cannot: QEMU is never given the root group."""
    try:
        info = os.stat(device)
    except OSError as error:
        raise BootError(f"{device}: {error.strerror}") from None
    if info.st_gid != 0 and info.st_mode & 0o060 == 0o060:
        return info.st_gid
    raise BootError(
        f"{device} (mode {stat.S_IMODE(info.st_mode):04o}, group {info.st_gid}) cannot be opened by "
        f"a VM's own uid: give it a group with read and write (udev's kvm group, mode 0660), "
        'or use accel = "tcg"')


def setpriv_args(uid: int, groups: Sequence[int]) -> list[str]:
    """Become ``uid`` (gid the same), with only ``groups`` besides, no capabilities at all,
    and no_new_privs (pure)."""
    group_option = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", group_option,
            "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def bwrap_args(*, binds: Sequence[tuple[int, str, bool]], devices: Sequence[str],
               links: Sequence[tuple[str, str]], info_fd: int) -> list[str]:
    """bubblewrap's command line up to ``--`` (pure). ``binds``: (fd, path, writable);
    ``links``: (target, path) symlinks; ``devices``: host device nodes to show."""
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1",
            "--new-session", "--clearenv", "--chdir", "/", "--dev", "/dev", "--proc", "/proc"]
    for target, path in links:
        args += ["--symlink", target, path]
    for fd, path, writable in binds:
        args += ["--bind-fd" if writable else "--ro-bind-fd", str(fd), path]
    for device in devices:
        args += ["--dev-bind", device, device]
    return [*args, "--info-fd", str(info_fd), "--"]


#: What the gate must read before it runs QEMU.
GATE_WORD = b"go\n"


def gate_args(gate_fd: int, close: Sequence[int]) -> list[str]:
    """The sandbox's first command (pure): wait for :data:`GATE_WORD` on ``gate_fd``, then
    exec the rest of the command line (QEMU's) with ``close`` and the gate closed; at EOF
    or any other word, exit without running it."""
    closes = " ".join(f"{fd}<&-" for fd in sorted({gate_fd, *close}))
    script = f'read -r word <&{gate_fd} && [ "$word" = go ] && exec "$@" {closes}'
    # bash, not sh: dash takes only one-digit descriptors in a redirection.
    return ["/usr/bin/bash", "-c", script, "vmcache-gate"]


class JailedProcess:
    """QEMU in its jail, shaped like :class:`trio.Process` (a ``ProcessLike``).

    ``pid`` is QEMU's host pid and signals go to QEMU itself, through a pidfd; the exit is
    bubblewrap's (our child, which exits when QEMU does, with its status), so the process
    is reaped by the ordinary means.
    """

    def __init__(self, monitor: trio.Process, qemu: PidfdProcess) -> None:
        self.monitor = monitor
        self.qemu = qemu
        self.pid = qemu.pid

    @property
    def returncode(self) -> int | None:
        status = self.monitor.returncode
        if status is None or self.qemu.returncode is None:
            return None
        # bubblewrap exits with 128 + N when a signal ended its command.
        return -(status - 128) if 128 < status < 128 + signal.NSIG else status

    async def wait(self) -> int:
        await self.monitor.wait()
        await self.qemu.wait()  # bubblewrap itself killed: QEMU may outlive it
        status = self.returncode
        assert status is not None
        return status

    def send_signal(self, sig: int) -> None:
        """Signal QEMU; nothing once it has exited (as :meth:`trio.Process.send_signal`)."""
        if self.qemu.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.qemu.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        self.qemu.close()


def _open_path(path: Path, stack: ExitStack, *, directory: bool = False) -> int:
    flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY | os.O_NOFOLLOW if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise BootError(f"cannot open {path} for the VM's jail: {error.strerror}") from None
    stack.callback(os.close, fd)
    return fd


def _links_and_dirs() -> tuple[list[tuple[str, str]], list[Path]]:
    links: list[tuple[str, str]] = []
    dirs: list[Path] = []
    for name in SYSTEM_DIRS:
        try:
            info = os.lstat(name)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode):
            links.append((os.readlink(name), name))
        elif stat.S_ISDIR(info.st_mode):
            dirs.append(Path(name))
    return links, dirs


def prepare_run_dir(run_dir: Path, uid: int) -> None:
    """Give the VM's uid what it needs of its run directory: as root, the directory is
    ours, its group the VM's, mode 1770, so QEMU can make its sockets there but cannot
    remove or replace our files (the sticky bit); otherwise it is simply ours (0700).

    bubblewrap, running as the VM's uid, reaches each path it mounts through its parent
    directories: the run root is made searchable (not readable) by others (o+x), and a
    parent that others cannot search is a BootError naming it.
    """
    if not is_root():
        return
    os.chown(run_dir, -1, uid)
    os.chmod(run_dir, 0o1770)
    root = run_dir.parent
    mode = os.stat(root).st_mode
    if not mode & stat.S_IXOTH:
        os.chmod(root, stat.S_IMODE(mode) | stat.S_IXOTH)


def check_jail_paths(spec: VMSpec) -> None:
    """At a daemon's start: a ConfigError (one line, exit 2) if a VM's uid could not reach
    the run root (which is itself made searchable) or a file QEMU needs, rather than every
    boot failing and being retried."""
    try:
        for path in (spec.run_root, spec.kernel, spec.initrd, spec.rootfs):
            if path is not None:
                check_reachable(path)
    except BootError as error:
        raise ConfigError(str(error)) from None


_REACHABLE: set[Path] = set()


def check_reachable(path: Path) -> None:
    """As root, a BootError unless every directory above ``path`` is searchable by any uid
    (asked once per directory): a VM's own uid must pass through them. Without root,
    QEMU's uid is ours, and what we can open it can reach."""
    if not is_root():
        return
    for parent in path.parents:
        if parent in _REACHABLE:
            return
        try:
            mode = os.stat(parent).st_mode
        except OSError as error:
            raise BootError(f"cannot reach {path}: {parent}: {error.strerror}") from None
        if not mode & stat.S_IXOTH:
            raise BootError(f"a VM's uid cannot reach {path}: {parent} is not searchable by "
                            f"others (chmod o+x {parent}, or move the file)")
    _REACHABLE.update(path.parents)


async def start_jailed(spec: VMSpec, vm_id: str, run_dir: Path, accel: str, uid: int,
                       argv: Sequence[str], output: IO[bytes], *, cgroup_limits: Limits,
                       tap: Tap | None = None) -> tuple[JailedProcess, Cgroup | None]:
    """Start ``argv`` (QEMU's command line) in its jail, in its cgroup, and return it.

    On any failure nothing is left running (the sandbox is killed before QEMU ran). A
    ``tap`` (vmcache.vm_nic; its descriptor named in ``argv``) is passed to QEMU and moved
    into its network namespace at the gate.
    """
    links, system_dirs = _links_and_dirs()
    with ExitStack() as stack:
        usr = _open_path(Path("/usr"), stack, directory=True)
        binds: list[tuple[int, str, bool]] = [(usr, "/usr", False)]
        binds += [(_open_path(path, stack, directory=True), str(path), False) for path in system_dirs]
        for path in (spec.qemu, spec.kernel, spec.initrd, spec.rootfs):
            if path is not None and not Path(path).is_relative_to("/usr"):
                check_reachable(path)
                binds.append((_open_path(path, stack), str(path), False))
        check_reachable(run_dir)
        binds.append((_open_path(run_dir, stack, directory=True), str(run_dir), True))
        devices = ["/dev/kvm"] if accel == "kvm" else []
        info_read, info_write = os.pipe2(os.O_CLOEXEC)
        gate_read, gate_write = os.pipe2(os.O_CLOEXEC)
        info = trio.lowlevel.FdStream(info_read)
        gate = trio.lowlevel.FdStream(gate_write)
        prefix: list[str] = []
        if is_root():
            prefix = setpriv_args(uid, [kvm_group()] if accel == "kvm" else [])
        # The log cap (vmcache.console) from the start: a process in the sandbox's user
        # namespace is not ours to prlimit() from outside.
        command = [*prefix, "prlimit", f"--fsize={QEMU_LOG_CAP}:{QEMU_LOG_CAP}", "--",
                   *bwrap_args(binds=binds, devices=devices, links=links, info_fd=info_write),
                   *gate_args(gate_read, [info_write, *(fd for fd, _, _ in binds)]), *argv]
        passed = [info_write, gate_read, *(fd for fd, _, _ in binds)]
        if spec.memory_fd is not None:
            passed.append(spec.memory_fd)
        if tap is not None:
            passed.append(tap.fd)
        try:
            monitor = await trio.lowlevel.open_process(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                start_new_session=True, pass_fds=passed,
                restore_signals=False)  # SIGXFSZ stays ignored (vmcache.console.limit_qemu_output)
        except OSError as error:
            info.close()
            gate.close()
            raise BootError(f"cannot start QEMU's jail: {error.strerror or error}") from None
        finally:
            os.close(info_write)
            os.close(gate_read)
    qemu_pid = 0
    jailed: JailedProcess | None = None
    cgroup: Cgroup | None = None
    try:
        with trio.fail_after(SETUP_TIMEOUT):
            qemu_pid = await _child_pid(info)
        qemu_process = PidfdProcess(qemu_pid, 0)
        jailed = JailedProcess(monitor, qemu_process)
        cgroup = await trio.to_thread.run_sync(_join_cgroup, vm_id, qemu_pid, cgroup_limits)
        if tap is not None:  # into QEMU's network namespace, dropping all
            await attach_tap(tap, qemu_pid, qemu_process)
        await gate.send_all(GATE_WORD)  # QEMU starts now, in its cgroup
    except BaseException as error:
        # The gate would end the sandbox at EOF anyway; kill it first, so it is gone for sure.
        with trio.CancelScope(shield=True):
            await _abandon(monitor, qemu_pid)
        if jailed is not None:
            jailed.close()
        if cgroup is not None:
            with trio.CancelScope(shield=True):
                await remove_when_empty(cgroup)  # its one process is reaped
        if isinstance(error, trio.TooSlowError):
            raise BootError(f"QEMU's jail (bwrap) did not start within {SETUP_TIMEOUT:g} s") from None
        raise
    finally:
        # Not aclose(): a checkpoint here could raise Cancelled once QEMU runs, and the
        # caller, never given the process, could not stop it.
        info.close()
        gate.close()
    return jailed, cgroup


async def _abandon(monitor: trio.Process, qemu_pid: int) -> None:
    """Kill a sandbox that is not to run: its first process (by pid, or as bubblewrap's
    children, bubblewrap stopped meanwhile), then bubblewrap, and reap it (bounded). A
    sandbox whose bubblewrap died during its set-up would wait for it for ever."""
    if monitor.returncode is None:
        monitor.send_signal(signal.SIGSTOP)  # it makes no new child while we look
    pids = [qemu_pid] if qemu_pid else _children(monitor.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if monitor.returncode is None:
        monitor.kill()
    with trio.move_on_after(SETUP_TIMEOUT):
        await monitor.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


async def _child_pid(info: trio.lowlevel.FdStream) -> int:
    """QEMU's host pid from bubblewrap's ``--info-fd`` (a JSON object, then EOF)."""
    data = b""
    while len(data) < 4096 and (chunk := await info.receive_some(4096)):
        data += chunk
    try:
        pid = json.loads(data)["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise BootError("QEMU's jail (bwrap) could not be set up; see qemu.log in the run "
                        "directory (unprivileged user namespaces may be disabled here)") from None
    if not isinstance(pid, int) or pid <= 1:
        raise BootError(f"QEMU's jail (bwrap) named no usable pid: {pid!r}")
    return pid


def _join_cgroup(vm_id: str, pid: int, cgroup_limits: Limits) -> Cgroup | None:
    cgroup = manager().create(vm_id, cgroup_limits)
    if cgroup is not None:
        try:
            cgroup.add(pid)
        except OSError as error:
            cgroup.remove()
            raise BootError(f"cannot put QEMU into its cgroup: {error.strerror}") from None
    return cgroup
