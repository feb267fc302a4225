"""contrib/vmcache.service: hardened, yet handed-out VMs outlive the daemon and QEMU can run."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "vmcache.service"


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit's [Service] section (keys may repeat, as in systemd)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


SERVICE = directives(UNIT.read_text())


def one(key: str) -> str:
    (value,) = SERVICE[key]
    return value


def test_handed_out_vms_outlive_a_stop_a_restart_and_a_crash() -> None:
    # control-group (the default) or mixed would kill every process left in the cgroup.
    assert one("KillMode") == "process"
    assert one("RuntimeDirectoryPreserve") == "yes"  # their sockets live in /run/vmcache
    assert one("OOMPolicy") == "continue"  # one QEMU OOM-killed must not stop the service
    assert one("TasksMax") == "infinity"  # handed-out VMs' threads stay in the unit's cgroup
    assert one("Type") == "notify" and one("NotifyAccess") == "main"


def test_what_would_break_qemu_or_the_jail_is_left_out() -> None:
    for key in ("MemoryDenyWriteExecute", "ProtectControlGroups", "ProtectKernelTunables",
                "PrivateDevices", "PrivateUsers", "PrivateNetwork", "ProtectProc", "ProcSubset",
                "ProtectHostname", "DynamicUser", "User"):
        assert key not in SERVICE, f"{key} would break TCG, the cgroups, the jail or /dev/kvm"
    # Each one is commented where it is left out, saying why.
    text = UNIT.read_text()
    for key in ("MemoryDenyWriteExecute", "ProtectControlGroups", "ProtectKernelTunables",
                "PrivateUsers", "PrivateNetwork", "ProtectHostname"):
        assert f"#   {key}=yes" in text, key


def test_the_hardening_lines_are_there() -> None:
    assert one("ProtectSystem") == "strict"
    assert one("DevicePolicy") == "closed"
    assert "/dev/kvm rw" in SERVICE["DeviceAllow"]
    assert one("NoNewPrivileges") == "yes"
    assert set(one("RestrictNamespaces").split()) >= {"user", "mnt", "net", "pid", "ipc", "uts"}
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_NETLINK"}
    caps = set(one("CapabilityBoundingSet").split())
    assert caps >= {"CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN", "CAP_KILL", "CAP_DAC_OVERRIDE"}
    assert "CAP_SYS_ADMIN" not in caps, "bubblewrap makes its mounts in a user namespace of its own"
    assert not caps & {"CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_TIME", "CAP_SYS_BOOT", "CAP_MKNOD"}
    assert not one("SystemCallFilter").startswith("@"), "a deny list: QEMU inherits it"
    for key in ("LockPersonality", "RestrictSUIDSGID", "RestrictRealtime", "ProtectKernelModules",
                "PrivateTmp", "Delegate"):
        assert one(key) == "yes", key


def test_every_setting_is_commented() -> None:
    """Each [Service] line, or the block of lines it belongs to, has a comment before it."""
    lines = UNIT.read_text().splitlines()
    start = lines.index("[Service]")
    commented = False
    for line in lines[start + 1:]:
        if line.startswith("["):
            break
        if line.startswith("#"):
            commented = True
        elif not line.strip():
            commented = False
        elif line.split("=")[0] not in ("ExecStart", "KillSignal", "RestartSec", "StateDirectoryMode",
                                         "RuntimeDirectoryMode", "Restart"):
            assert commented, f"no comment says why: {line}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    vmcache = Path(sys.executable).parent / "vmcache"
    if not vmcache.exists():
        pytest.skip("no vmcache entry point next to this Python")
    unit = tmp_path / "vmcache.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/vmcache", f"ExecStart={vmcache}"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # an unknown key or a bad value is only a warning


@pytest.mark.qemu
def test_the_units_capabilities_and_no_new_privs_suffice_for_a_confined_vm(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """A VM boots, confined, from a process holding only the unit's CapabilityBoundingSet,
    with NoNewPrivileges, as systemd would start the daemon (PID 1 here is not systemd)."""
    from conftest import VMCACHE, qemu_pids, write_config

    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in one("CapabilityBoundingSet").split())
    assert one("NoNewPrivileges") == "yes"
    before = qemu_pids()
    done = subprocess.run(
        ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set=-all,{caps}", "--",
         *VMCACHE, "run", "--direct", "--config", str(write_config(tmp_path / "c.toml")), "--",
         "cat", "/proc/sys/kernel/random/boot_id"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) == 36
    assert qemu_pids() == before


def test_the_network_drop_in_adds_only_what_a_restricted_policy_needs() -> None:
    """contrib/vmcache-network.conf, for hosts whose pools grant network: the two capabilities,
    the tap's device and the address family the enforcement uses, nothing else."""
    drop_in = configparser.ConfigParser(strict=False, interpolation=None)
    drop_in.optionxform = str  # type: ignore[assignment,method-assign]
    drop_in.read(UNIT.parent / "vmcache-network.conf")
    assert dict(drop_in["Service"]) == {"CapabilityBoundingSet": "CAP_NET_ADMIN CAP_SYS_ADMIN",
                                        "DeviceAllow": "/dev/net/tun rw",
                                        "RestrictAddressFamilies": "AF_INET"}
