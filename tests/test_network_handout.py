"""The network contract from config to hand-out, without QEMU: [network] and
[pools.NAME.network], the ceiling the daemon holds requests to, the applier hook at hand-out
and its release, the policy in the handle, on the wire, in Status and on the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from conftest import VMCACHE
from fakes import FakeProcess
from test_pool import FakeBooter

from vmcache._proto import cache_pb2
from vmcache.cli import status_lines
from vmcache.config import (
    Config,
    VMSpec,
    check_network_privilege,
    config_from_dict,
    load_config,
    render_toml,
)
from vmcache.errors import ConfigError, DaemonError, NetworkPolicyError, NotAllowedError, VmcacheError
from vmcache.handle import VMHandle
from vmcache.ledger import Ledger
from vmcache.lifecycle import Phase, VMLife
from vmcache.network_host import HostNetwork, UnenforcedNetwork
from vmcache.network_policy import NetworkPolicy
from vmcache.placement import Placement
from vmcache.pool import VMPool
from vmcache.qemu import VM
from vmcache.server import CacheDaemon
from vmcache.state import VMRegistry
from vmcache.wire import (
    CacheStatus,
    HandedOutVMStatus,
    policy_from_message,
    policy_message,
    status_from_message,
    status_message,
)

R = NetworkPolicy.parse


def config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(f'[factory]\nvm_cache_endpoint = "{tmp_path / "s.sock"}"\n' + text)
    return load_config(path)


def spec(run_root: Path) -> VMSpec:
    return VMSpec(qemu=Path("/fake/qemu"), kernel=Path("/k"), initrd=Path("/i"), kernel_params="",
                  machine_type="q35", vcpus=1, memory_mib=256, accel="tcg", boot_timeout=10,
                  kvm_probe_timeout=5, run_root=run_root, max_vcpus=8)


class Recorder:
    """A NetworkApplier that records what it is asked (and fails when told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.checked: list[NetworkPolicy] = []
        self.applied: list[tuple[str, NetworkPolicy]] = []
        self.released: list[str] = []
        self.adopted: list[tuple[str, int, int, NetworkPolicy]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def check(self, policy: NetworkPolicy) -> None:
        self.checked.append(policy)

    async def apply(self, vm: VM, policy: NetworkPolicy) -> None:
        self.applied.append((vm.id, policy))
        if self.fail:
            raise DaemonError("the egress proxy could not start")

    async def release(self, vm_id: str) -> None:
        self.released.append(vm_id)

    def adopt(self, vm_id: str, pid: int, start_time: int, policy: NetworkPolicy) -> None:
        self.adopted.append((vm_id, pid, start_time, policy))


POOLS = """
[network]
mode = "restricted"
allow = ["pypi.org:443"]
permit = ["*.org:443", "10.0.0.0/8", "host.vmcache.internal:8080"]

[pools.open]
vcpus = 2
[pools.open.network]
permit = ["*.example.com"]

[pools.closed]
vcpus = 3
[pools.closed.network]

[pools.same]
vcpus = 4
"""


# ---------------------------------------------------------------- config


def test_each_pool_has_its_network_and_a_pools_table_replaces_the_top_one_whole(tmp_path: Path) -> None:
    shapes = {shape.name: shape.network for shape in config(tmp_path, POOLS).pool_shapes()}
    assert shapes["default"].policy == R("restricted", ["pypi.org:443"])
    assert [str(entry) for entry in shapes["default"].ceiling] == [
        "*.org:443", "10.0.0.0/8", "host.vmcache.internal:8080"]
    # Its own table: mode and allow take their defaults, not [network]'s.
    assert shapes["open"].policy == NetworkPolicy.none()
    assert [str(entry) for entry in shapes["open"].ceiling] == ["*.example.com"]
    assert shapes["closed"].policy == NetworkPolicy.none() and shapes["closed"].ceiling == ()
    assert shapes["same"] == shapes["default"]  # no table: the top one
    assert {name: network.needs_nic for name, network in shapes.items()} == {
        "default": True, "open": True, "closed": False, "same": True}


def test_permit_defaults_to_allow_and_mode_none_needs_no_nic(tmp_path: Path) -> None:
    network = config(tmp_path, '[network]\nmode = "restricted"\nallow = ["a.example:80"]\n').network
    assert [str(entry) for entry in network.ceiling] == ["a.example:80"]
    default = Config().network
    assert default.policy == NetworkPolicy.none() and default.ceiling == ()
    assert not default.needs_nic
    # Restricted with nothing allowed still has a NIC (its DNS answers nothing).
    assert config(tmp_path, '[network]\nmode = "restricted"\n').network.needs_nic
    assert config(tmp_path, '[network]\npermit = ["a.b"]\n').network.needs_nic  # requests may ask


@pytest.mark.parametrize(("text", "message"), [
    ('[network]\nmode = "open"\n', "network.mode: must be one of none, restricted, not 'open'"),
    ('[network]\nmode = "restricted"\nallow = ["::1"]\n',
     "network.allow: entry '::1': IPv6 is not supported: the guest has no IPv6"),
    ('[network]\npermit = ["a.b", "x.y:99999"]\n',
     "network.permit: entry 'x.y:99999': the port '99999' must be a number from 1 to 65535"),
    ('[pools.p]\n[pools.p.network]\npermit = ["10.0.0.1/8"]\n',
     "pools.p.network.permit: entry '10.0.0.1/8': has host bits set: did you mean 10.0.0.0/8?"),
    ('[network]\nallow = ["a.b"]\n', 'network.allow: needs mode = "restricted"'),
    ('[network]\nmode = "restricted"\nallow = ["a.b:1"]\npermit = ["a.b:2"]\n',
     "network.allow: entry 'a.b:1' is beyond permit: add it to permit"),
    ('[network]\nallow = "a.b"\n', "network.allow: must be a list of strings, not 'a.b'"),
    ('[network]\npermit = [443]\n', "network.permit: must be a string, not 443"),
    ('[network]\nports = []\n', "unknown key network.ports"),
    ('[pools.p.network]\nmode = "restricted"\nallow = ["localhost:80"]\n',
     "pools.p.network.allow: entry 'localhost:80': the host's loopback is reached as "
     "host.vmcache.internal:PORT"),
])
def test_bad_network_config_is_one_line_naming_key_and_entry(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and str(tmp_path / "c.toml") in str(caught.value)


def test_rendered_config_reads_back_the_same(tmp_path: Path) -> None:
    loaded = config(tmp_path, POOLS)
    text = render_toml(loaded)
    assert "[network]\nmode = \"restricted\"\nallow = [\"pypi.org:443\"]\n" in text
    assert '[pools.open.network]\nmode = "none"\nallow = []\npermit = ["*.example.com"]\n' in text
    assert "[pools.same.network]" not in text
    import tomllib
    again = config_from_dict(tomllib.loads(text), loaded.source)
    assert again == loaded
    assert "permit" not in render_toml(Config()).split("[network]")[1].split("[")[0]  # unset: = allow


def test_a_pool_that_can_grant_network_needs_a_root_daemon_and_the_jail(tmp_path: Path) -> None:
    loaded = config(tmp_path, '[pools.p]\n[pools.p.network]\npermit = ["a.b:443"]\n')
    with pytest.raises(ConfigError) as caught:
        check_network_privilege(loaded, euid=1000)
    assert str(caught.value) == (
        "[pools.p.network] can grant network (mode restricted or a non-empty permit): restricted "
        "networking needs root (the daemon makes each VM's tap device); run vmcache serve as root, "
        'or set mode = "none" and permit = []')
    check_network_privilege(loaded, euid=0)
    check_network_privilege(config(tmp_path, ""), euid=1000)  # no network: anyone may run it
    unjailed = attrs.evolve(loaded, jail=attrs.evolve(loaded.jail, enabled=False))
    with pytest.raises(ConfigError, match=r"needs the jail .*set jail.enabled = true"):
        check_network_privilege(unjailed, euid=0)


def test_each_pools_vm_spec_says_whether_it_needs_a_nic(tmp_path: Path) -> None:
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path))
    assert {name: pool.spec.nic for name, pool in daemon.pools.items()} == {
        "default": True, "open": True, "closed": False, "same": True}
    assert not CacheDaemon(config(tmp_path, ""), spec(tmp_path)).pool.spec.nic


# ---------------------------------------------------------------- the ceiling


def test_a_request_gets_its_policy_or_the_pools_default_within_the_permit(tmp_path: Path) -> None:
    recorder = Recorder()
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path), network=recorder)
    assert daemon._network_policy(None, "default") == R("restricted", ["pypi.org:443"])
    asked = R("restricted", ["api.python.org:443", "10.2.0.0/16:5432", "host.vmcache.internal:8080"])
    assert daemon._network_policy(asked, "default") == asked
    assert daemon._network_policy(NetworkPolicy.none(), "default") == NetworkPolicy.none()
    assert daemon._network_policy(None, "open") == NetworkPolicy.none()
    assert daemon._network_policy(R("restricted", ["a.example.com:1"]), "open").is_restricted
    assert daemon._network_policy(None, None) == R("restricted", ["pypi.org:443"])  # a cold boot: top
    assert recorder.checked[-1] == R("restricted", ["pypi.org:443"])  # the applier saw each


@pytest.mark.parametrize(("pool", "allow", "message"), [
    ("default", ["pypi.org:80", "10.0.0.0/8:22", "host.vmcache.internal:22"],
     "network allow pypi.org:80, host.vmcache.internal:22 is beyond what pool 'default' permits "
     "(network.permit: *.org:443, 10.0.0.0/8, host.vmcache.internal:8080); ask within it, or have "
     "its permit widened"),
    ("open", ["example.com"],
     "network allow example.com is beyond what pool 'open' permits (pools.open.network.permit: "
     "*.example.com)"),
    ("closed", ["a.b"], "beyond what pool 'closed' permits (pools.closed.network.permit: nothing)"),
    ("same", ["11.0.0.1"], "beyond what pool 'same' permits (network.permit: "),
    (None, ["11.0.0.1"], "beyond what a VM booted for this size permits (network.permit: "),
])
def test_beyond_the_permit_is_permission_denied_naming_the_entries(
        tmp_path: Path, pool: str | None, allow: list[str], message: str) -> None:
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path), network=Recorder())
    with pytest.raises(NotAllowedError) as caught:
        daemon._network_policy(R("restricted", allow), pool)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_restricted_in_a_pool_without_a_nic_says_which_key_to_set(tmp_path: Path) -> None:
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path), network=Recorder())
    with pytest.raises(NotAllowedError) as caught:
        daemon._network_policy(R("restricted"), "closed")
    assert str(caught.value) == (
        "pool 'closed' has no network: its VMs boot without a NIC; network mode restricted needs "
        'pools.closed.network.mode = "restricted" or a pools.closed.network.permit in the daemon\'s config')
    plain = CacheDaemon(config(tmp_path, ""), spec(tmp_path))
    with pytest.raises(NotAllowedError, match=r'needs network.mode = "restricted" or a network.permit'):
        plain._network_policy(R("restricted"), "default")
    assert plain._network_policy(None, "default") == NetworkPolicy.none()


def test_without_enforcement_restricted_is_refused_not_ignored(tmp_path: Path) -> None:
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path), network=UnenforcedNetwork())
    with pytest.raises(DaemonError, match="restricted is not enforced in this build"):
        daemon._network_policy(None, "default")
    assert daemon._network_policy(NetworkPolicy.none(), "default") == NetworkPolicy.none()


# ---------------------------------------------------------------- the hook at hand-out


async def take(daemon: CacheDaemon, needs_nic: bool, policy: NetworkPolicy,
               booter: FakeBooter) -> VMHandle | BaseException:
    """A hand-out from a one-VM pool of fake VMs (with a NIC or not): the handle, or what it
    raised; the pool runs on a while after, to replace what it lost."""
    pool = VMPool(attrs.evolve(daemon.spec, nic=needs_nic), 1, boot=booter)  # type: ignore[arg-type]
    placement = Placement(pool="default", vcpus=1, memory_mib=256)
    outcome: VMHandle | BaseException
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            outcome, _ = await daemon._take_from_pool(pool, placement, trio.Event(), policy)
        except VmcacheError as error:
            outcome = error
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    return outcome


async def test_the_policy_is_applied_to_a_vm_with_a_nic_before_it_leaves_the_pool(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder()
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path), network=recorder)
    policy = R("restricted", ["pypi.org:443"])
    booter = FakeBooter()
    handle = await take(daemon, True, policy, booter)
    assert isinstance(handle, VMHandle)
    assert recorder.applied == [(booter.vms[0].id, policy)]
    assert recorder.released == []
    assert handle.id == booter.vms[0].id
    # No NIC (mode none everywhere): nothing to apply, the hand-out path is as before.
    recorder.applied.clear()
    await take(daemon, False, NetworkPolicy.none(), FakeBooter())
    assert recorder.applied == []


async def test_a_vm_the_applier_fails_on_is_discarded_and_released(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder(fail=True)
    daemon = CacheDaemon(config(tmp_path, POOLS), spec(tmp_path), network=recorder)
    booter = FakeBooter()
    outcome = await take(daemon, True, R("restricted", ["pypi.org:443"]), booter)
    assert isinstance(outcome, DaemonError) and str(outcome) == "the egress proxy could not start"
    first = booter.vms[0]
    assert recorder.released == [first.id]
    assert not first.released, "a VM whose network failed was handed out"
    assert first.stopped and len(booter.vms) == 2, "the pool did not replace the discarded VM"


async def test_the_ledger_releases_a_vms_network_when_it_is_gone(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    registry = VMRegistry(tmp_path / "state", tmp_path)
    registry.prepare()
    released: list[tuple[str, bool]] = []
    entries: list[object] = []

    async def on_gone(vm_id: str) -> None:
        released.append((vm_id, entries[0].gone.is_set()))  # type: ignore[attr-defined]

    ledger = Ledger(registry, on_gone=on_gone)
    run_dir = tmp_path / "vm-0123456789ab"
    handle = VMHandle(id="0123456789ab", pid=4242, start_time=1, qmp_socket=str(run_dir / "qmp.sock"),
                      agent_socket=str(run_dir / "agent-0.sock"), console_log=str(run_dir / "console.log"),
                      run_dir=str(run_dir), cpu=1, memory=256, network=R("restricted", ["a.b:1"]))
    qemu = FakeProcess(dies_of={signal.SIGKILL})
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        entry = ledger.adopt(handle, qemu, 0, Phase.CLAIMED)
        entries.append(entry)
        qemu.kill()  # it died, by whatever hand
        with trio.fail_after(10):
            await entry.gone.wait()
        nursery.cancel_scope.cancel()
    assert released == [("0123456789ab", False)], "released once, before the VM counted as gone"


def test_the_state_record_keeps_the_policy(tmp_path: Path) -> None:
    registry = VMRegistry(tmp_path / "state", tmp_path)
    registry.prepare()
    handle = VMHandle(id="0123456789ab", pid=4242, start_time=1, qmp_socket="q", agent_socket="a",
                      console_log="c", run_dir="r", cpu=1, memory=256,
                      network=R("restricted", ["host.vmcache.internal:8080"]))
    life = VMLife("0123456789ab", 4242, 1, Phase.CLAIMED, owner_uid=0, handed_at=time.time(), handle=handle)
    registry.write(life)
    (path,) = [p for p in (tmp_path / "state").rglob("*.json")]
    assert json.loads(path.read_text())["handle"]["network"] == {
        "mode": "restricted", "allow": ["host.vmcache.internal:8080"]}
    read = registry.life("0123456789ab")
    assert read is not None and read.handle is not None
    assert read.handle.network == R("restricted", ["host.vmcache.internal:8080"])


# ---------------------------------------------------------------- handle, wire, status, CLI


def test_the_handle_carries_the_policy_and_an_old_handle_means_none() -> None:
    handle = VMHandle(id="0123456789ab", pid=1, start_time=1, qmp_socket="q", agent_socket="a",
                      console_log="c", run_dir="r", cpu=1, memory=256, network=R("restricted", ["a.b:1"]))
    data = json.loads(handle.to_json())
    assert data["network"] == {"mode": "restricted", "allow": ["a.b:1"]}
    assert VMHandle.from_json(handle.to_json()).network == handle.network
    del data["network"]
    assert VMHandle.from_dict(data).network == NetworkPolicy.none()
    data["network"] = {"mode": "restricted", "allow": ["[::1]:22"]}
    with pytest.raises(VmcacheError, match=r"^not a VM handle: network allow entry '\[::1\]:22': IPv6"):
        VMHandle.from_dict(data)


def test_the_wire_carries_a_policy_both_ways() -> None:
    for policy in (NetworkPolicy.none(), R("restricted"), R("restricted", ["*.a.b:443", "10.0.0.0/8"])):
        assert policy_from_message(policy_message(policy)) == policy
    assert policy_from_message(cache_pb2.NetworkPolicy()) == NetworkPolicy.none()  # unset
    with pytest.raises(NetworkPolicyError, match="IPv6"):
        policy_from_message(cache_pb2.NetworkPolicy(mode="restricted", allow=["::1"]))
    sent = cache_pb2.TakeAsk(network=policy_message(R("restricted"))).SerializeToString()
    ask = cache_pb2.TakeAsk.FromString(sent)
    assert ask.HasField("network") and not cache_pb2.TakeAsk().HasField("network")
    assert cache_pb2.TakeAsk.DESCRIPTOR.fields_by_name["network"].number == 7
    assert cache_pb2.GrpcHandedOutVM.DESCRIPTOR.fields_by_name["network"].number == 10


def status_with(network: NetworkPolicy | str) -> CacheStatus:
    return CacheStatus(pid=1, vms=[], handed_out_vms=[HandedOutVMStatus(
        "0123456789ab", 42, 1000, time.time(), Phase.CLAIMED, network=network)])


def test_status_shows_each_vms_policy() -> None:
    policy = R("restricted", ["pypi.org:443", "host.vmcache.internal:8080"])
    status = status_from_message(status_message(status_with(policy)))
    assert status.handed_out_vms[0].network == policy
    (line,) = [line for line in status_lines(status) if line.startswith("Handed out:")]
    assert line.endswith(", network restricted: pypi.org:443, host.vmcache.internal:8080")
    assert json.loads(json.dumps(status.to_dict()))["handed_out_vms"][0]["network"] == {
        "mode": "restricted", "allow": ["pypi.org:443", "host.vmcache.internal:8080"]}
    none = status_from_message(status_message(status_with(NetworkPolicy.none())))
    line = next(line for line in status_lines(none) if line.startswith("Handed out:"))
    assert line.endswith(", network none")
    # A newer daemon's policy this client cannot read stays its words; Status keeps working.
    message = status_message(status_with(NetworkPolicy.none()))
    message.handed_out_vms[0].network.CopyFrom(cache_pb2.NetworkPolicy(mode="restricted", allow=["fd00::/8"]))
    odd = status_from_message(message)
    assert odd.handed_out_vms[0].network == "restricted: fd00::/8"
    assert "network restricted: fd00::/8" in "\n".join(status_lines(odd))
    json.dumps(odd.to_dict())


@pytest.mark.parametrize(("args", "message"), [
    (["get", "--allow", "::1"], "vmcache: --allow: network allow entry '::1': IPv6 is not supported"),
    (["get", "--network", "restricted", "--allow", "pypi.org:0"], "the port '0' must be a number"),
    (["run", "--allow", "*.", "--", "true"], "a wildcard is *.DOMAIN"),
    (["get", "--network", "none", "--allow", "a.b"], "--network none: network mode none allows nothing"),
    (["run", "--direct", "--network", "restricted", "--", "true"],
     "--network restricted is enforced by the daemon: not with --direct"),
])
def test_bad_network_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    endpoint = ["--endpoint", str(tmp_path / "none.sock")] if "--direct" not in args else []
    command = [*args[:1], *endpoint, *args[1:]]
    done = subprocess.run([*VMCACHE, *command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


class OfferOnly:
    """A TakeVM call whose daemon offers one VM (a handle saying ``network``) and records
    what the client sends."""

    def __init__(self, network: NetworkPolicy) -> None:
        self.sent: list[cache_pb2.TakeRequest] = []
        self.handle = VMHandle(id="0123456789ab", pid=1, start_time=1, qmp_socket="q", agent_socket="a",
                               console_log="c", run_dir="r", cpu=1, memory=256, network=network)

    async def send(self, message: cache_pb2.TakeRequest) -> None:
        self.sent.append(message)

    async def receive(self) -> cache_pb2.TakeReply:
        from vmcache.wire import grpc_vm
        if len(self.sent) == 1:
            return cache_pb2.TakeReply(offer=grpc_vm(self.handle))
        return cache_pb2.TakeReply(claimed=cache_pb2.TakeClaimed(vm_id=self.handle.id))


async def test_the_client_never_claims_a_vm_offered_with_another_policy() -> None:
    """A daemon older than network policies ignores TakeAsk.network: its VM is not claimed
    (so the daemon stops it), and the caller hears why."""
    from vmcache.client import ANY_SIZE, CacheClient
    from vmcache.errors import CacheError

    client = CacheClient(channel=type("C", (), {"endpoint": "/x.sock"})())
    asked = R("restricted", ["pypi.org:443"])
    call = OfferOnly(NetworkPolicy.none())
    with pytest.raises(CacheError, match=r"asked for network restricted: pypi.org:443, the daemon offered "
                                         r"VM 0123456789ab with none \(a daemon too old"):
        await client._take(call, 10, None, ANY_SIZE, lease=False, network=asked)  # type: ignore[arg-type]
    assert [message.WhichOneof("step") for message in call.sent] == ["ask"]
    assert policy_from_message(call.sent[0].ask.network) == asked
    # The policy asked for is the one offered: claimed.
    call = OfferOnly(asked)
    handle = await client._take(call, 10, None, ANY_SIZE, lease=False, network=asked)  # type: ignore[arg-type]
    assert handle.network == asked
    assert [message.WhichOneof("step") for message in call.sent] == ["ask", "claim"]
    # Nothing asked: the ask carries no network field (the pool's default applies).
    call = OfferOnly(NetworkPolicy.none())
    await client._take(call, 10, None, ANY_SIZE, lease=False)  # type: ignore[arg-type]
    assert not call.sent[0].ask.HasField("network")


def test_a_daemon_whose_pools_can_grant_network_enforces_it(tmp_path: Path) -> None:
    """The default applier of a daemon with a pool that can grant network is the host's
    enforcement; one with no such pool refuses restricted (never leaves it unenforced)."""
    assert isinstance(CacheDaemon(config(tmp_path, POOLS), spec(tmp_path))._network, HostNetwork)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert isinstance(CacheDaemon(config(plain, ""), spec(plain))._network, UnenforcedNetwork)
