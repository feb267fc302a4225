"""``vmcache port-forward``'s specs and its command line, without QEMU (the forwarding itself is
tested against the real agent in test_agent_host.py and against a real VM in test_guest.py)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VMCACHE

from vmcache.port_forward import ForwardSpec, parse_spec


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """No QEMU here: other runs' QEMU processes are not ours to count."""
    yield


@pytest.mark.parametrize(("text", "spec"), [
    ("8080:80", ForwardSpec("127.0.0.1", 8080, 80)),
    ("0:80", ForwardSpec("127.0.0.1", 0, 80)),
    (":80", ForwardSpec("127.0.0.1", 0, 80)),
    ("5432", ForwardSpec("127.0.0.1", 5432, 5432)),
    ("127.0.0.2:8080:80", ForwardSpec("127.0.0.2", 8080, 80)),
    ("0.0.0.0:1:65535", ForwardSpec("0.0.0.0", 1, 65535)),
    ("localhost:8080:80", ForwardSpec("127.0.0.1", 8080, 80)),
    ("[::1]:8080:80", ForwardSpec("::1", 8080, 80)),
])
def test_specs(text: str, spec: ForwardSpec) -> None:
    assert parse_spec(text) == spec


@pytest.mark.parametrize(("text", "problem"), [
    ("8080:0", "guest port '0'"),
    ("8080:65536", "guest port '65536'"),
    ("70000:80", "local port '70000'"),
    ("a:b", "local port 'a'"),
    ("", "guest port ''"),
    ("1:2:3:4", "is not [ADDR:]LOCAL_PORT:GUEST_PORT"),
    ("example.com:8080:80", "'example.com' is not an IP address"),
    ("[::1:8080:80", "brackets"),
    ("8080:-1", "guest port '-1'"),
])
def test_bad_specs_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_spec(text)


def test_the_command_refuses_a_bad_spec_in_one_line_before_reading_the_handle(tmp_path: Path) -> None:
    done = subprocess.run([*VMCACHE, "port-forward", str(tmp_path / "missing.json"), "8080:80", "8081:0"],
                          capture_output=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "vmcache: port-forward: guest port '0' is not a port number (1 to 65535)"]


def test_the_command_refuses_a_handle_it_cannot_read(tmp_path: Path) -> None:
    done = subprocess.run([*VMCACHE, "port-forward", str(tmp_path / "missing.json"), "8080:80"],
                          capture_output=True, timeout=60)
    assert done.returncode == 1
    [line] = done.stderr.decode().splitlines()
    assert line.startswith("vmcache: cannot read the VM handle")
