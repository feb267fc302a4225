"""The network contract against a real daemon and real clients: a request beyond the
config's permit is PERMISSION_DENIED in one line (and costs no VM), restricted is never
silently unenforced, a mode none request still gets a VM, and the handle and Status say
each VM's policy."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from conftest import qemu_pids, wait_until
from daemon import Daemon, stop_handed_out

import vmcache
from vmcache._proto import cache_pb2
from vmcache.errors import InvalidRequestError, PermissionDeniedError
from vmcache.rpc.client import open_channel
from vmcache.wire import SERVICE

pytestmark = pytest.mark.qemu

PERMIT = 'permit = ["host.vmcache.internal:8080", "*.example.com:443"]'


@pytest.fixture
def daemon(tmp_path: Path, run_dir: Path, guest_image: Path):  # type: ignore[no-untyped-def]
    instance = Daemon(tmp_path, run_dir, cache=1)
    with open(instance.config, "a") as file:
        file.write(f"[network]\n{PERMIT}\n")
    yield instance
    instance.ensure_stopped()


def test_the_permit_is_held_at_hand_out_and_status_says_each_vms_policy(
        daemon: Daemon, tmp_path: Path) -> None:
    before = qemu_pids()
    daemon.start()
    daemon.wait_cached(1)

    # Beyond the permit: PERMISSION_DENIED, one line naming what is beyond and the ceiling.
    denied = daemon.cli("get", "--allow", "api.example.com:443", "--allow", "pypi.org:443",
                        "--allow", "host.vmcache.internal:22", check=False)
    assert denied.returncode == 1
    assert denied.stderr == (
        "vmcache: the daemon refused this client: network allow pypi.org:443, "
        "host.vmcache.internal:22 is beyond what pool 'default' permits (network.permit: "
        "host.vmcache.internal:8080, *.example.com:443); ask within it, or have its permit widened\n")

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

    # Within the permit, but this build has no enforcement: refused, never handed out unenforced.
    unenforced = daemon.cli("get", "--allow", "host.vmcache.internal:8080", check=False)
    assert unenforced.returncode == 1
    assert "restricted is not enforced in this build" in unenforced.stderr
    assert unenforced.stderr.count("\n") == 1 and unenforced.stdout == ""

    # None of the refusals cost a VM: the one booted at start is still there.
    status = daemon.status()
    assert status["boots"] == 1 and len(status["vms"]) == 1 and status["handed_out_vms"] == []

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
