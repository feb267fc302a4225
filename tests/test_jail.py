"""Every QEMU confined (vmcache.jail, vmcache.cgroup), read from the host's /proc of each QEMU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, pid_alive, qemu_pids, wait_until, write_config
from daemon import Daemon, run_as

from vmcache.cgroup import CgroupManager, Layout, Limits, find_layout
from vmcache.config import JAIL_UID_BASE, load_config, resolve_spec
from vmcache.errors import BootError, ConfigError
from vmcache.jail import bwrap_args, describe_confinement, gate_args, kvm_group, limits, setpriv_args
from vmcache.qemu import launch_vm

V1_MOUNTS = """cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
"""


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def namespace(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def cgroup_of(pid: int) -> dict[str, str]:
    """controller -> path, from /proc/PID/cgroup (v1 lines name their controllers)."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            paths[controller] = path
    return paths


# --- pure parts: no QEMU --------------------------------------------------------------

def test_cgroup_layout_is_found_for_v1_and_v2_and_its_absence_said() -> None:
    v1 = find_layout(V1_MOUNTS)
    assert isinstance(v1, Layout) and v1.version == 1
    assert v1.parents == (Path("/sys/fs/cgroup/memory/vmcache"), Path("/sys/fs/cgroup/pids/vmcache"),
                          Path("/sys/fs/cgroup/cpu,cpuacct/vmcache"))
    v2 = find_layout("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n")
    assert isinstance(v2, Layout) and v2.version == 2 and v2.parents == (Path("/sys/fs/cgroup/vmcache"),)
    none = find_layout("proc /proc proc rw 0 0\n")
    assert isinstance(none, str) and "no cgroup" in none
    assert "no cgroup limits" in CgroupManager(none).describe()


def test_cgroup_v2_files_are_written_and_removed(tmp_path: Path) -> None:
    """cgroup v2 against a directory laid out like cgroupfs (this host has v1 controllers)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("")
    manager = CgroupManager(Layout(2, (root / "vmcache",)))
    cgroup = manager.create("abc", Limits(memory_bytes=3 << 30, pids=130, cpus=2.5))
    assert cgroup is not None
    vm = root / "vmcache" / "vm-abc"
    assert (vm / "memory.max").read_text() == str(3 << 30)
    assert (vm / "pids.max").read_text() == "130"
    assert (vm / "cpu.max").read_text() == "250000 100000"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (root / "vmcache" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    for name in os.listdir(vm):  # cgroupfs removes a group's files with it
        (vm / name).unlink()
    assert manager.sweep() == 1 and not vm.exists()


def test_cgroup_that_cannot_be_written_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    manager = CgroupManager(Layout(1, (parent / "vmcache",) * 3))
    if os.geteuid() == 0:  # root writes through modes: use a path that cannot exist instead
        manager = CgroupManager(Layout(1, (Path("/proc/vmcache"),) * 3))
    assert manager.create("a", Limits(1 << 30, 10, 1.0)) is None
    assert manager.create("b", Limits(1 << 30, 10, 1.0)) is None
    assert "cannot write" in manager.unavailable and "no cgroup limits" in manager.describe()
    assert sum("without cgroup limits" in record.message for record in caplog.records) == 1


def test_jail_command_lines() -> None:
    assert setpriv_args(2_000_000_007, []) == [
        "setpriv", "--reuid=2000000007", "--regid=2000000007", "--clear-groups", "--inh-caps=-all",
        "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    assert "--groups=993" in setpriv_args(1, [993])
    args = bwrap_args(binds=[(7, "/usr", False), (8, "/run/vmcache/vm-a", True)], devices=["/dev/kvm"],
                      links=[("usr/lib", "/lib")], info_fd=3)
    for option in ("--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--clearenv"):
        assert option in args
    assert "--share-net" not in args and "--die-with-parent" not in args  # VMs outlive the daemon
    joined = " ".join(args)
    assert "--ro-bind-fd 7 /usr" in joined and "--bind-fd 8 /run/vmcache/vm-a" in joined
    assert "--dev-bind /dev/kvm /dev/kvm" in joined and args[-1] == "--"
    assert "--block-fd" not in args, "bubblewrap's block fd would run QEMU at EOF: the gate does not"
    gate = gate_args(5, [3, 7, 8])
    assert gate[:2] == ["/usr/bin/bash", "-c"] and gate[2].endswith('exec "$@" 3<&- 5<&- 7<&- 8<&-')


def test_limits_cover_the_most_ram_a_vm_may_have(tmp_path: Path) -> None:
    spec = resolve_spec(load_config(write_config(tmp_path / "c.toml", default_maxmemory=1024)))
    assert spec.jail is not None
    tcg, kvm = limits(spec, "tcg"), limits(spec, "kvm")
    assert kvm.memory_bytes == (1024 + spec.jail.memory_overhead) << 20
    assert tcg.memory_bytes == kvm.memory_bytes + (1024 << 20)  # QEMU's default TCG cache
    assert kvm.pids == 128 + spec.max_vcpus and kvm.cpus == spec.max_vcpus + 1


def test_seccomp_is_required_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_no_seccomp"):
        resolve_spec(load_config(write_config(tmp_path / "c.toml", seccompsandbox="")))
    config = tmp_path / "d.toml"
    config.write_text('[hypervisor.qemu]\nseccompsandbox = ""\n[jail]\nallow_no_seccomp = true\n')
    assert resolve_spec(load_config(config)).sandbox == ""


def test_a_missing_jail_tool_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    config = tmp_path / "c.toml"
    config.write_text('[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\n')
    with pytest.raises(ConfigError, match=r"bwrap not found.*apt-get install bubblewrap.*jail.enabled"):
        resolve_spec(load_config(config))


# --- real QEMU ----------------------------------------------------------------------------

def assert_confined(pid: int, run_dir: Path) -> dict[str, str]:
    """What every confined QEMU shows the host; returns its /proc status fields."""
    fields = status_fields(pid)
    uids = fields["Uid"].split()
    assert len(set(uids)) == 1 and int(uids[0]) >= JAIL_UID_BASE, "its own uid, not root"
    assert fields["Gid"].split()[0] == uids[0] and fields["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[caps], 16) == 0, f"{caps} is empty"
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2", "QEMU's own -sandbox filter is on"
    for kind in ("mnt", "net", "pid", "user", "ipc", "uts"):
        assert namespace(pid, kind) != namespace("self", kind), f"its own {kind} namespace"
    assert fields["NSpid"].split()[-1] == "1", "PID 1 of its pid namespace"
    net_dev = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    interfaces = [line.split(":")[0].strip() for line in net_dev]
    assert interfaces == ["lo"], "no network but loopback"
    root = Path(f"/proc/{pid}/root")
    assert set(os.listdir(root)) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin",
                                     "tmp", "usr", "var"}
    assert not (root / "etc").exists() and not (root / "home").exists() and not (root / "root").exists()
    assert not (root / "dev/kvm").exists(), "no /dev/kvm under TCG"
    view = os.listdir(root / run_dir.relative_to("/"))
    assert len(view) == 1 and view[0] in os.listdir(run_dir), "of the run root, only its own VM"
    return fields


@pytest.mark.qemu
async def test_a_booted_vm_is_confined_and_leaves_nothing(tmp_path: Path, run_dir: Path,
                                                         guest_image: Path) -> None:
    config = write_config(tmp_path / "c.toml", default_maxmemory=512)
    spec = resolve_spec(load_config(config), run_root=run_dir)
    before = qemu_pids()
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            fields = assert_confined(vm.pid, run_dir)
            assert int(fields["Uid"].split()[0]) == vm.uid
            groups = cgroup_of(vm.pid)
            for controller in ("memory", "pids", "cpu"):
                assert groups[controller] == f"/vmcache/vm-{vm.id}"
            memory = Path(f"/sys/fs/cgroup/memory/vmcache/vm-{vm.id}")
            assert int((memory / "memory.limit_in_bytes").read_text()) == (512 + 256 + 1024) << 20
            assert (Path(f"/sys/fs/cgroup/pids/vmcache/vm-{vm.id}") / "pids.max").read_text().strip() == str(
                128 + spec.max_vcpus)
            assert Path(vm.run_dir / "qemu.pid").read_text().strip() == str(vm.pid), "the host pid"
            result = await vm.run(("sh", "-c", "echo inside"), timeout=20)
            assert result.stdout == b"inside\n"
            vm_id = vm.id
    assert qemu_pids() == before
    assert not Path(f"/sys/fs/cgroup/memory/vmcache/vm-{vm_id}").exists(), "its cgroup went with it"


@pytest.mark.qemu
async def test_a_kernel_the_vm_uid_cannot_reach_is_one_line(tmp_path: Path, run_dir: Path,
                                                           guest_image: Path) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    kernel = hidden / "vmlinuz"
    kernel.write_bytes((guest_image / "vmlinuz").read_bytes())
    spec = resolve_spec(load_config(write_config(tmp_path / "c.toml", kernel=str(kernel),
                                                 initrd=str(guest_image / "initramfs.cpio.gz"),
                                                 image=str(guest_image / "rootfs.erofs"))),
                        run_root=run_dir)
    before = qemu_pids()
    with pytest.raises(BootError, match=rf"cannot reach {kernel}: {hidden} is not searchable by others"):
        async with launch_vm(spec):
            pass
    assert qemu_pids() == before


@pytest.mark.qemu
def test_every_daemon_vm_is_confined_and_the_purge_kills_them_all(tmp_path: Path, run_dir: Path,
                                                                  guest_image: Path) -> None:
    """Cached VMs and snapshot clones alike; SIGINT kills every one; handed-out ones live on."""
    before = qemu_pids()
    daemon = Daemon(tmp_path, run_dir, cache=2, factory={"boot_mode": "snapshot"})
    daemon.start()
    handle = ""
    try:
        daemon.wait_cached(2)
        status = daemon.status()
        cached = [vm["pid"] for vm in status["vms"]]
        for pid in cached:
            assert_confined(pid, run_dir)
        assert len({status_fields(pid)["Uid"] for pid in cached}) == len(cached), "a uid per VM"
        assert "cgroup v1" in status["confinement"] and "uid per VM" in status["confinement"]
        handle = daemon.cli("get").stdout
        handed = json.loads(handle)
        assert_confined(handed["pid"], run_dir)
        assert handed["uid"] == int(status_fields(handed["pid"])["Uid"].split()[0])
        assert daemon.signal(signal.SIGINT) == 0
        assert not any(pid_alive(pid) for pid in cached if pid != handed["pid"])
        assert qemu_pids() - before == {handed["pid"]}, "only the handed-out VM lives on"
    finally:
        daemon.ensure_stopped()
        if handle:
            from daemon import stop_handed_out
            stop_handed_out(handle, tmp_path)
    assert qemu_pids() == before


@pytest.mark.qemu
def test_an_ordinary_user_gets_every_confinement_but_its_own_uid_and_cgroups(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """A process of an ordinary user (uid 65534 here) boots a VM: QEMU runs as that user, in
    the same namespaces and filesystem view, with no capabilities; cgroups cannot be written
    by it, which it says in one line instead of failing."""
    user_root = Path(f"{run_dir}-user")
    user_root.mkdir(mode=0o700)
    os.chown(user_root, 65534, 65534)
    spec = resolve_spec(load_config(write_config(tmp_path / "c.toml")), run_root=user_root)
    before = qemu_pids()

    async def boot() -> str:
        from vmcache import cgroup
        cgroup._MANAGER = None  # as a process of this user would find the host
        with trio.fail_after(120):
            async with launch_vm(spec) as vm:
                fields = status_fields(vm.pid)
                result = await vm.run(("echo", "ok"), timeout=20)
                return json.dumps({
                    "uid": fields["Uid"], "caps": fields["CapEff"], "nnp": fields["NoNewPrivs"],
                    "seccomp": fields["Seccomp"], "net": namespace(vm.pid, "net"),
                    "user": namespace(vm.pid, "user"), "out": (result.stdout or b"").decode(),
                    "cgroup": vm.cgroup is not None, "confinement": describe_confinement(spec),
                    "pid": vm.pid})

    try:
        answer = run_as(65534, 65534, boot)
        assert answer.startswith("{"), answer
        outcome = json.loads(answer)
        assert outcome["uid"].split() == ["65534"] * 4 and int(str(outcome["caps"]), 16) == 0
        assert outcome["nnp"] == "1" and outcome["seccomp"] == "2" and outcome["out"] == "ok\n"
        assert outcome["net"] != namespace("self", "net") and outcome["user"] != namespace("self", "user")
        assert outcome["cgroup"] is False
        assert "the daemon's own uid 65534 (not root)" in str(outcome["confinement"])
        assert "no cgroup limits (cannot write" in str(outcome["confinement"])
        assert not pid_alive(int(str(outcome["pid"])))
        assert qemu_pids() == before
    finally:
        shutil.rmtree(user_root, ignore_errors=True)


@pytest.mark.qemu
def test_run_direct_is_confined_too(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """``vmcache run --direct`` (no daemon) confines its QEMU the same way; Ctrl-C ends it."""
    before = qemu_pids()
    config = write_config(tmp_path / "vmcache.toml")
    run = subprocess.Popen([*VMCACHE, "run", "--direct", "--config", str(config), "--", "sleep", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: any((run_dir / name / "control.sock").exists()
                                      for name in os.listdir(run_dir)), 120)
        assert wait_until(lambda: len(qemu_pids() - before) == 1, 10)
        (pid,) = qemu_pids() - before
        assert_confined(pid, run_dir)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert wait_until(lambda: qemu_pids() == before, 15)


def test_the_gate_runs_nothing_if_we_go_away_and_closes_our_descriptors(tmp_path: Path) -> None:
    """The sandbox's gate (real bubblewrap): at EOF, its command never runs; at our word, it
    runs with the descriptors we passed closed."""
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chown(out, 2_000_000_123, 2_000_000_123)

    def sandbox(word: bytes) -> tuple[int, list[str], str]:
        usr = os.open("/usr", os.O_PATH | os.O_DIRECTORY)
        where = os.open(out, os.O_PATH | os.O_DIRECTORY)
        info_read, info_write = os.pipe()
        gate_read, gate_write = os.pipe()
        passed = [usr, where, info_write, gate_read]
        command = [*setpriv_args(2_000_000_123, []),
                   *bwrap_args(binds=[(usr, "/usr", False), (where, "/out", True)], devices=[],
                               links=[("usr/lib", "/lib"), ("usr/lib64", "/lib64"), ("usr/bin", "/bin")],
                               info_fd=info_write),
                   *gate_args(gate_read, [usr, where, info_write]),
                   "/usr/bin/sh", "-c", "ls /proc/self/fd > /out/fds"]
        process = subprocess.Popen(command, pass_fds=passed, stderr=subprocess.PIPE)
        for fd in passed:
            os.close(fd)
        with os.fdopen(info_read, "rb") as info:
            assert json.loads(info.read())["child-pid"] > 1
        with os.fdopen(gate_write, "wb") as gate:
            gate.write(word)
        status = process.wait(timeout=30)
        assert process.stderr is not None
        errors = process.stderr.read().decode()
        fds = (out / "fds").read_text().split() if (out / "fds").exists() else []
        return status, fds, errors

    status, fds, _ = sandbox(b"")
    assert status != 0 and fds == [], "EOF at the gate: the command never ran"
    status, fds, errors = sandbox(b"go\n")
    assert status == 0 and sorted(fds, key=int)[:3] == ["0", "1", "2"], errors
    assert len(fds) <= 4, f"only stdio (and ls's own directory) are open: {fds}"


def test_a_run_directory_the_vm_uids_cannot_reach_stops_the_daemon_at_start(tmp_path: Path) -> None:
    """One line, exit status 2, at once: not a boot failing and retried for ever."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    config = write_config(tmp_path / "c.toml", endpoint=hidden / "run" / "cache.sock")
    done = subprocess.run([*VMCACHE, "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "VMCACHE_RUN_DIR": str(hidden / "run")})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{hidden} is not searchable by others (chmod o+x {hidden}" in lines[0], lines


@pytest.mark.qemu
async def test_a_boot_cancelled_at_any_moment_of_the_jails_set_up_leaves_nothing(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """Cancelled every millisecond through bubblewrap's set-up, the cgroup, the gate and
    QEMU's first moments (a purge hits refills there): no QEMU, jail, cgroup or run
    directory is left."""
    from vmcache.cgroup import manager
    from vmcache.procfs import jail_pids
    from vmcache.qemu import boot_vm

    spec = resolve_spec(load_config(write_config(tmp_path / "c.toml")), run_root=run_dir)
    before, jails, cgroups = qemu_pids(), jail_pids(), set(manager().existing())
    for step in range(60):
        with trio.move_on_after(step / 1000) as scope:
            await boot_vm(spec)
        assert scope.cancelled_caught
        assert qemu_pids() == before, f"QEMU left after a cancel at {step} ms"
        assert jail_pids() == jails, f"a jail left after a cancel at {step} ms"
        assert set(manager().existing()) == cgroups, f"a cgroup left after a cancel at {step} ms"
        assert [name for name in os.listdir(run_dir) if name.startswith("vm-")] == []


def test_kvm_is_reached_through_its_group_never_root(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_text("")
    os.chmod(device, 0o600)
    with pytest.raises(BootError, match=r"cannot be opened by a VM's own uid.*kvm group, mode 0660"):
        kvm_group(str(device))
    os.chown(device, 0, 993)
    os.chmod(device, 0o660)
    assert kvm_group(str(device)) == 993
    os.chown(device, 0, 0)
    with pytest.raises(BootError):
        kvm_group(str(device))  # never the root group
