"""The network contract against a real daemon, real clients and a real guest: a request
beyond the config's permit is PERMISSION_DENIED in one line (and costs no VM); a cached VM
given a restricted policy at hand-out reaches what it allows and nothing else (enforced on
the host); a mode none request still gets a VM; the handle and Status say each VM's policy;
nothing is left when the VM goes."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import leaks
import pytest
import trio
from conftest import VMCACHE, qemu_pids, wait_until
from daemon import Daemon, stop_handed_out

import vmcache
from vmcache._proto import cache_pb2
from vmcache.errors import InvalidRequestError, PermissionDeniedError
from vmcache.procfs import open_fds
from vmcache.rpc.client import open_channel
from vmcache.wire import SERVICE

pytestmark = pytest.mark.qemu

@pytest.fixture
def servers() -> Iterator[tuple[int, int]]:
    """Two loopback servers: one the policy allows, one it leaves out."""
    with leaks.loopback_server("allowed") as allowed, leaks.loopback_server("other") as other:
        yield allowed, other


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path,  # type: ignore[no-untyped-def]
           servers: tuple[int, int]):
    instance = Daemon(tmp_path, run_dir, cache=1)
    with open(instance.config, "a") as file:
        file.write(f'[network]\npermit = ["host.vmcache.internal:{servers[0]}", "*.example.com:443"]\n')
    yield instance
    instance.ensure_stopped()


#: Run in the guest as root: every way out this test can try without sending a packet
#: anywhere but the host's loopback (through the gateway) and the guest's own link.
GUEST_PROBES = r"""
import json, socket, sys, urllib.request
allowed, other = int(sys.argv[1]), int(sys.argv[2])
out = {}
def attempt(name, call):
    try:
        out[name] = call()
    except Exception as error:
        reason = getattr(error, "reason", error)  # urllib wraps what the socket raised
        if isinstance(reason, socket.gaierror):
            out[name] = "no such name"
        elif isinstance(reason, TimeoutError):
            out[name] = "timed out"
        elif isinstance(reason, OSError):  # refused or reset: which one depends on timing
            out[name] = "refused"
        else:
            out[name] = "unexpected: " + repr(error)
def fetch(port, host="host.vmcache.internal"):
    return urllib.request.urlopen(f"http://{host}:{port}/", timeout=5).read().decode()
attempt("internal", lambda: socket.gethostbyname("host.vmcache.internal"))
attempt("allowed", lambda: fetch(allowed))
attempt("other_port", lambda: fetch(other))
attempt("by_gateway_ip", lambda: fetch(allowed, "10.0.2.2"))
attempt("unlisted_name", lambda: socket.gethostbyname("pypi.org"))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"x", ("10.0.2.2", other))
    return s.recv(10)
attempt("udp", udp)
def icmp():
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(2)
    s.sendto(bytes([8, 0, 0xf7, 0xff, 0, 0, 0, 0]), ("10.0.2.2", 0))
    return s.recv(100).hex()
attempt("icmp", icmp)
print(json.dumps(out))
"""


def test_the_permit_is_held_at_hand_out_and_status_says_each_vms_policy(
        daemon: Daemon, tmp_path: Path, servers: tuple[int, int]) -> None:
    allowed, other = servers
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(1)

    # Beyond the permit: PERMISSION_DENIED, one line naming what is beyond and the ceiling.
    denied = daemon.cli("get", "--allow", "api.example.com:443", "--allow", "pypi.org:443",
                        "--allow", f"host.vmcache.internal:{other}", check=False)
    assert denied.returncode == 1
    assert denied.stderr == (
        "vmcache: the daemon refused this client: network allow pypi.org:443, "
        f"host.vmcache.internal:{other} is beyond what pool 'default' permits (network.permit: "
        f"host.vmcache.internal:{allowed}, *.example.com:443); ask within it, or have its permit "
        "widened\n")

    async def library() -> tuple[str, str]:
        async with vmcache.connect(daemon.endpoint) as cache:
            with pytest.raises(PermissionDeniedError) as caught:
                await cache.get_vm(timeout=30, network=vmcache.NetworkPolicy.parse(
                    "restricted", ["10.0.0.0/8"]))
        # A request no client of ours would send: an entry the daemon must refuse itself.
        async with open_channel(daemon.endpoint, SERVICE) as channel, \
                channel.open_call("TakeVM", cache_pb2.TakeReply) as call:
            await call.send(cache_pb2.TakeRequest(ask=cache_pb2.TakeAsk(
                network=cache_pb2.NetworkPolicy(mode="restricted", allow=["fd00::1"]))))
            with pytest.raises(InvalidRequestError) as invalid, trio.fail_after(30):
                await call.receive()
        return str(caught.value), str(invalid.value)

    denied_text, invalid_text = trio.run(library)
    assert "network allow 10.0.0.0/8 is beyond what pool 'default' permits" in denied_text
    assert invalid_text == ("the daemon refused the request: TakeAsk.network: network allow entry "
                            "'fd00::1': IPv6 is not supported: the guest has no IPv6 (use an IPv4 "
                            "CIDR or a name)")

    # None of the refusals cost a VM: the one booted at start is still there.
    status = daemon.status()
    assert status["boots"] == 1 and len(status["vms"]) == 1 and status["handed_out_vms"] == []

    # Within the permit: the cached VM gets its policy at hand-out, enforced on the host.
    fds_before = open_fds(daemon.pid)
    handle_json = daemon.cli("get", "--allow", f"host.vmcache.internal:{allowed}", "--ttl", "600").stdout
    assert json.loads(handle_json)["network"] == {"mode": "restricted",
                                                  "allow": [f"host.vmcache.internal:{allowed}"]}
    probes = subprocess.run([*VMCACHE, "exec", "-", "--", "python3", "-c", GUEST_PROBES, str(allowed),
                             str(other)], input=handle_json, capture_output=True, text=True, timeout=120)
    assert probes.returncode == 0, probes.stderr
    seen = json.loads(probes.stdout)
    assert seen == {
        "internal": "10.0.2.2",  # our DNS answers the host's name ...
        "allowed": "allowed",  # ... and the allowed port reaches the host's 127.0.0.1
        "other_port": "refused",  # another loopback port of the host does not (a reset)
        "by_gateway_ip": "allowed",  # the name or its address: the same rule
        "unlisted_name": "no such name",  # no other name resolves (nothing is forwarded)
        "udp": "timed out",  # UDP, ICMP: dropped
        "icmp": "timed out",
    }, seen
    (held,) = daemon.status()["handed_out_vms"]
    assert held["network"] == {"mode": "restricted", "allow": [f"host.vmcache.internal:{allowed}"]}
    stop_handed_out(handle_json, tmp_path)
    # Its enforcement went with it: with the cache refilled, the daemon holds as many
    # descriptors as before the hand-out (the proxy's and DNS responder's sockets, and the
    # VM's namespace, are closed).
    daemon.wait_cached(1)
    assert wait_until(lambda: open_fds(daemon.pid) <= fds_before, 10), (fds_before, open_fds(daemon.pid))

    # Mode none works as before, and says so in the handle and in Status.
    handle_json = daemon.cli("get", "--network", "none", "--ttl", "600").stdout
    handle = json.loads(handle_json)
    assert handle["network"] == {"mode": "none", "allow": []}
    (held,) = daemon.status()["handed_out_vms"]
    assert held["id"] == handle["id"] and held["network"] == {"mode": "none", "allow": []}
    (line,) = [line for line in daemon.cli("status").stdout.splitlines() if line.startswith("Handed out:")]
    assert line.endswith(", network none")

    stop_handed_out(handle_json, tmp_path)
    assert daemon.signal(signal.SIGTERM) == 0
    assert wait_until(lambda: qemu_pids() == before, 10)
