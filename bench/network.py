"""A guest's network, measured both ways on one VM, beside the agent; and what it costs a hand-out.

    VMCACHE_DATA_DIR=... flock /tmp/vmcache-qemu.lock python bench/network.py [--quick]
        [--size-mb 100] [--runs 3] [--handouts 5] [--output bench/results/network.json]

Starts, on the host's loopback, a download server (SIZE bytes per HTTP/1.0 request) and an
echo server, then a daemon (this tree; TCG, a cache of one VM per pool) with four pools:

  default   boot mode, no network (no NIC)
  net       boot mode, [pools.net.network] permit = both host servers' ports
  snap      snapshot mode, no network
  netsnap   snapshot mode, the same permit as net

It takes one VM from ``net`` with ``vmcache get --allow host.vmcache.internal:PORT ...``
(restricted: the guest's TCP goes to the daemon's egress proxy, which connects to the host's
127.0.0.1:PORT) and measures on it, interleaved, ``--runs`` times each:

  guest <- host   the guest (python3, a raw socket read into one buffer) downloads SIZE
                  bytes from http://host.vmcache.internal:PORT/, timed in the guest
                  (connect to the last byte), and the host's wall time of the whole command
  host <- guest   SIZE bytes from a server in the guest through ``vm.connect_tcp`` and
                  through a ``vmcache port-forward`` subprocess (read here from its port)
  stdout          ``head -c SIZE /dev/zero`` through ``open_process`` (the agent's stdout)

then connection set-up, 20 each: in the guest, connect to host.vmcache.internal (through
the proxy) and connect + a one-byte echo round trip, and the name's lookup (the daemon's DNS
responder); on the host, ``connect_tcp`` + a one-byte round trip, and the same through
port-forward. With each transfer, CPU seconds (utime + stime from /proc, host and guest) of
QEMU, the daemon (the egress proxy lives there), the host process at the other end, the
guest agent (PID 1), the guest process at the other end, and the whole guest (/proc/stat).

Then hand-outs: ``get_vm`` of a full cache over an open connection, the four pools in
turn (the order flipping every round), each followed by its refill (until Status shows
its pool full again); the network pools ask a restricted policy, so their hand-out
configures the guest's NIC and sets up the enforcement (ruleset, proxy, DNS responder) in
the VM's namespace. The daemon runs through this script (``--daemon``), which times those
two steps inside it (``configure_guest`` and ``HostNetwork._start``) and writes them to a
file: the hand-out's breakdown. Everything this starts is stopped at the end, whatever
happens (the run fails if a QEMU process it started is left).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from port_forward import REQUEST, SERVER, host_cpu, read_all, start_server  # noqa: E402

import vmcache  # noqa: E402
from vmcache.procfs import qemu_pids  # noqa: E402

POOLS = ("default", "net", "snap", "netsnap")
NETWORK_POOLS = ("net", "netsnap")
HOST_NAME = "host.vmcache.internal"

#: Guest CPU probe: utime + stime of each pid in argv, then the whole guest's busy and idle
#: seconds (/proc/stat's first line).
GUEST_CPU = r"""
import os, sys
t = os.sysconf("SC_CLK_TCK")
for p in sys.argv[1:]:
    f = open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()
    print((int(f[11]) + int(f[12])) / t)
c = [int(x) for x in open("/proc/stat").readline().split()[1:]]
print((sum(c) - c[3] - c[4]) / t)
"""

#: In the guest: download argv[3] bytes from argv[1]:argv[2] (the name looked up first),
#: read into one buffer; prints the times (s) and the process's own CPU seconds.
GUEST_DOWNLOAD = r"""
import json, os, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cpu0 = os.times(); start = time.perf_counter()
ip = socket.gethostbyname(host)
resolved = time.perf_counter()
s = socket.create_connection((ip, port), timeout=60)
s.sendall(b"GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % host.encode())
buffer = bytearray(1 << 20); total = 0
while True:
    n = s.recv_into(buffer)
    if not n:
        break
    total += n
end = time.perf_counter(); cpu1 = os.times()
s.close()
print(json.dumps({"resolve": resolved - start, "transfer": end - resolved, "bytes": total,
                  "cpu": cpu1.user + cpu1.system - cpu0.user - cpu0.system}))
"""

#: In the guest: 20 lookups of argv[1], then 20 connections to it on port argv[2] (an echo
#: server): connect alone, and connect + a one-byte round trip (ms each).
GUEST_SETUP = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
out = {"lookup": [], "connect": [], "connect + 1-byte round trip": []}
for _ in range(20):
    start = time.perf_counter()
    ip = socket.gethostbyname(host)
    out["lookup"].append((time.perf_counter() - start) * 1000)
for _ in range(20):
    start = time.perf_counter()
    s = socket.create_connection((ip, port), timeout=10)
    out["connect"].append((time.perf_counter() - start) * 1000)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    out["connect + 1-byte round trip"].append((time.perf_counter() - start) * 1000)
    s.close()
print(json.dumps(out))
"""


# ---------------------------------------------------------------- the daemon, timed inside


def serve_timed(timings: Path, argv: list[str]) -> None:
    """Run ``vmcache ARGV`` (the daemon) with the two steps of a network hand-out timed:
    each ``configure_guest`` and each enforcement set-up (``HostNetwork._start``: the VM's
    namespace opened, the ruleset, the proxy's and DNS responder's sockets) appends
    ``{"step", "vm", "seconds"}`` as a JSON line to ``timings``."""
    from vmcache import network_host, qemu
    from vmcache.vm_nic import GuestRunner

    def note(step: str, vm_id: str, seconds: float) -> None:
        with open(timings, "a") as file:
            file.write(json.dumps({"step": step, "vm": vm_id, "seconds": seconds}) + "\n")

    configure = getattr(qemu, "configure_guest")  # noqa: B009 - imported there by name, patched there

    async def configure_guest(agent: GuestRunner) -> None:
        started = time.perf_counter()
        await configure(agent)
        note("configure_guest", "at boot", time.perf_counter() - started)

    start = network_host.HostNetwork._start

    async def timed_start(self: network_host.HostNetwork, vm_id: str, pid: int, start_time: int,
                          policy: vmcache.NetworkPolicy, adopted: network_host._Held | None = None) -> None:
        started = time.perf_counter()
        await start(self, vm_id, pid, start_time, policy, adopted)
        note("enforce set-up", vm_id, time.perf_counter() - started)

    setattr(qemu, "configure_guest", configure_guest)  # noqa: B010
    network_host.HostNetwork._start = timed_start  # type: ignore[method-assign]
    sys.argv = ["vmcache", *argv]
    from vmcache.__main__ import run

    run()


# ---------------------------------------------------------------- measuring


class Samples:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def note(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])


async def guest_cpu(vm: vmcache.VMHandle, pids: list[int]) -> tuple[list[float], float]:
    """CPU seconds of guest processes, and of the whole guest, from the guest's /proc."""
    done = await vm.run(["python3", "-c", GUEST_CPU, *map(str, pids)], check=True)
    assert done.stdout is not None
    values = [float(line) for line in done.stdout.split()]
    return values[:-1], values[-1]


@contextmanager
def host_server(size: int, mode: str) -> Iterator[tuple[int, int]]:
    """The guest's download/echo server (port_forward.SERVER), run on the host's loopback:
    its port and pid, for the block's life."""
    process = subprocess.Popen([sys.executable, "-c", SERVER, "0", str(size), mode],
                               stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline()), process.pid
    finally:
        process.kill()
        process.wait(timeout=30)


async def throughput(vm: vmcache.VMHandle, daemon_pid: int, server: tuple[int, int], echo_port: int,
                     forwarder: Callable[[int], Awaitable[tuple[int, int]]], size: int, runs: int,
                     samples: Samples) -> None:
    """Parts 1 to 4 on one VM (see the module's docstring)."""
    host_port, host_server_pid = server
    me = os.getpid()
    async with trio.open_nursery() as nursery:
        guest_port, guest_server_pid = await start_server(vm, nursery, size, "download")
        guest_echo, _ = await start_server(vm, nursery, 0, "echo")
        local, forwarder_pid = await forwarder(guest_port)
        echo_local, _ = await forwarder(guest_echo)
        # The name lookup and python3's start-up warm once, untimed.
        await vm.run(["python3", "-c", GUEST_DOWNLOAD, HOST_NAME, str(host_port), "0"], check=True)

        async def cpu_around(name: str, work: Callable[[], Awaitable[tuple[float, float]]],
                             host_end: int, guest_end: int) -> None:
            """``work`` gives (MB/s, wall s); around it, every party's CPU seconds."""
            (guest_before, busy_before) = await guest_cpu(vm, [1, guest_end])
            host_before = [host_cpu(pid) for pid in (vm.pid, daemon_pid, host_end)]
            rate, wall = await work()
            host_after = [host_cpu(pid) for pid in (vm.pid, daemon_pid, host_end)]
            (guest_after, busy_after) = await guest_cpu(vm, [1, guest_end])
            samples.note(f"{name} MB/s", rate)
            samples.note(f"{name} wall s", wall)
            parts = ("qemu", "daemon", "host end")
            for part, before, after in zip(parts, host_before, host_after, strict=True):
                samples.note(f"{name} cpu {part}", after - before)
            samples.note(f"{name} cpu agent", guest_after[0] - guest_before[0])
            samples.note(f"{name} cpu guest end", guest_after[1] - guest_before[1])
            samples.note(f"{name} cpu guest total", busy_after - busy_before)

        async def guest_download() -> tuple[float, float]:
            start = time.perf_counter()
            done = await vm.run(["python3", "-c", GUEST_DOWNLOAD, HOST_NAME, str(host_port), str(size)],
                                check=True, timeout=300)
            wall = time.perf_counter() - start
            assert done.stdout is not None
            result = json.loads(done.stdout)
            assert result["bytes"] > size, result
            samples.note("guest download cpu client (self)", result["cpu"])
            samples.note("guest download lookup ms", result["resolve"] * 1000)
            return size / 1e6 / result["transfer"], wall

        async def stdout() -> tuple[float, float]:
            start = time.perf_counter()
            async with vm.open_process(["head", "-c", str(size), "/dev/zero"]) as process:
                assert process.stdout is not None
                assert await read_all(process.stdout) == size
            wall = time.perf_counter() - start
            return size / 1e6 / wall, wall

        async def download(open_stream: Callable[[], Awaitable[trio.abc.Stream]]) -> tuple[float, float]:
            start = time.perf_counter()
            async with await open_stream() as stream:
                await stream.send_all(REQUEST)
                received = await read_all(stream)
            wall = time.perf_counter() - start
            assert received > size, received
            return size / 1e6 / wall, wall

        library = functools.partial(download, functools.partial(vm.connect_tcp, guest_port))
        forwarded = functools.partial(download, functools.partial(trio.open_tcp_stream, "127.0.0.1", local))
        parts: list[tuple[str, Callable[[], Awaitable[tuple[float, float]]], int, int]] = [
            ("guest download", guest_download, host_server_pid, guest_server_pid),
            ("connect_tcp", library, me, guest_server_pid),
            ("port-forward", forwarded, forwarder_pid, guest_server_pid),
            ("stdout", stdout, me, guest_server_pid)]
        for number in range(runs):
            print(f"transfers, run {number + 1}/{runs}", file=sys.stderr, flush=True)
            for name, work, host_end, guest_end in (parts if number % 2 == 0 else parts[::-1]):
                await cpu_around(name, work, host_end, guest_end)

        done = await vm.run(["python3", "-c", GUEST_SETUP, HOST_NAME, str(echo_port)], check=True,
                            timeout=120)
        assert done.stdout is not None
        for name, values in json.loads(done.stdout).items():
            for value in values:
                samples.note(f"set-up guest -> host: {name}", value)
        for _ in range(20):
            start = time.perf_counter()
            stream = await vm.connect_tcp(guest_echo)
            samples.note("set-up host -> guest: connect_tcp", (time.perf_counter() - start) * 1000)
            await stream.send_all(b"x")
            assert await stream.receive_some() == b"x"
            samples.note("set-up host -> guest: connect_tcp + 1-byte round trip",
                         (time.perf_counter() - start) * 1000)
            await stream.aclose()
            start = time.perf_counter()
            async with await trio.open_tcp_stream("127.0.0.1", echo_local) as local_stream:
                await local_stream.send_all(b"x")
                assert await local_stream.receive_some() == b"x"
            samples.note("set-up host -> guest: port-forward + 1-byte round trip",
                         (time.perf_counter() - start) * 1000)
        nursery.cancel_scope.cancel()


async def pool_full(client: vmcache.CacheClient, pool: str | None = None, timeout: float = 300.0) -> None:
    """Until ``pool`` (None: every pool) has its whole cache ready and nothing booting."""
    with trio.fail_after(timeout):
        while True:
            pools = (await client.status()).pools
            if all(p.ready >= p.cache_size and not p.booting for p in pools if pool in (None, p.name)):
                return
            await trio.sleep(0.02)


#: Every VM this takes dies by itself after this long, whatever happens to this script.
TTL = 900.0


@asynccontextmanager
async def closing(handle: vmcache.VMHandle) -> AsyncIterator[None]:
    """Stop ``handle``'s VM at the block's end, even on an error or Ctrl-C (a handed-out VM
    outlives the daemon that handed it out)."""
    try:
        yield
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            await handle.aclose()


async def warm_snapshots(endpoint: Path, policy: vmcache.NetworkPolicy) -> None:
    """The first fill of a snapshot pool is plain boots (the template is made meanwhile):
    take and refill until a refill is a restore (well under a cold boot), so that no
    template is being made while anything is timed."""
    async with vmcache.connect(endpoint) as client:
        for pool in ("snap", "netsnap"):
            for _ in range(4):
                await pool_full(client)
                handle = await client.get_vm(timeout=60, size=vmcache.VMSize(pool=pool), ttl=TTL,
                                             network=policy if pool in NETWORK_POOLS else None)
                async with closing(handle):
                    start = time.perf_counter()
                    await pool_full(client, pool)
                    refill = time.perf_counter() - start
                if refill < 2.0:
                    break
        await pool_full(client)


async def handouts(endpoint: Path, policy: vmcache.NetworkPolicy, rounds: int, samples: Samples) -> list[str]:
    """Part 5: each pool's hand-out and refill, interleaved; the ids of the network pools' VMs
    taken timed, with their pool (to match the daemon's timings)."""
    taken: list[str] = []
    async with vmcache.connect(endpoint) as client:
        for number in range(rounds):
            print(f"hand-outs, round {number + 1}/{rounds}", file=sys.stderr, flush=True)
            for pool in (POOLS if number % 2 == 0 else POOLS[::-1]):
                await pool_full(client)
                start = time.perf_counter()
                handle = await client.get_vm(timeout=60, size=vmcache.VMSize(pool=pool), ttl=TTL,
                                             network=policy if pool in NETWORK_POOLS else None)
                samples.note(f"hand-out {pool} ms", (time.perf_counter() - start) * 1000)
                async with closing(handle):
                    await pool_full(client, pool)
                    samples.note(f"refill {pool} s", time.perf_counter() - start)
                    # The guest's first python3 since the hand-out (for a network pool the first
                    # was configure_guest's): what a python3 costs in a VM fresh from this pool.
                    started = time.perf_counter()
                    await handle.run(["python3", "-I", "-c", "pass"], check=True)
                    samples.note(f"python3 after hand-out {pool} ms", (time.perf_counter() - started) * 1000)
                    if pool in NETWORK_POOLS:
                        taken.append(f"{pool} {handle.id}")
    return taken


# ---------------------------------------------------------------- the run


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.size_mb * 1_000_000
    os.environ["VMCACHE_RUN_DIR"] = str(work / "run")
    endpoint = work / "cache.sock"
    timings = work / "timings.jsonl"
    handle_file = work / "vm.json"
    command = [sys.executable, "-m", "vmcache"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    samples = Samples()
    forwarders: list[subprocess.Popen[bytes]] = []
    daemon: subprocess.Popen[bytes] | None = None
    with host_server(size, "download") as server, host_server(0, "echo") as (echo_port, _):
        entries = [f"{HOST_NAME}:{server[0]}", f"{HOST_NAME}:{echo_port}"]
        permit = "[network]\npermit = [" + ", ".join(f'"{entry}"' for entry in entries) + "]\n"
        config = work / "daemon.toml"
        config.write_text(
            f'[factory]\nvm_cache_number = 1\nvm_cache_endpoint = "{endpoint}"\n'
            '[hypervisor.qemu]\naccel = "tcg"\nboot_timeout = 120.0\n'
            '[pools.net]\n' + permit.replace("[network]", "[pools.net.network]")
            + '[pools.snap]\nboot_mode = "snapshot"\n'
            '[pools.netsnap]\nboot_mode = "snapshot"\n'
            + permit.replace("[network]", "[pools.netsnap.network]"))
        policy = vmcache.NetworkPolicy.parse("restricted", entries)
        try:
            with open(work / "daemon.log", "wb") as log:
                daemon = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--daemon", str(timings), "--",
                     "serve", "--config", str(config)], env=env, stdout=log, stderr=log)
            daemon_pid = daemon.pid

            async def forwarder(guest_port: int) -> tuple[int, int]:
                """A `vmcache port-forward` of ``guest_port``: its local port and its pid."""
                process = subprocess.Popen([*command, "port-forward", str(handle_file), f"0:{guest_port}"],
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                forwarders.append(process)
                assert process.stdout is not None
                line = (await trio.to_thread.run_sync(process.stdout.readline)).decode()
                return int(line.split(" -> ")[0].rsplit(":", 1)[1]), process.pid

            async def main() -> list[str]:
                with trio.fail_after(300):
                    while True:
                        try:
                            async with vmcache.connect(endpoint) as client:
                                await pool_full(client)
                                break
                        except vmcache.DaemonNotRunningError:
                            await trio.sleep(0.1)
                await warm_snapshots(endpoint, policy)
                allow = [word for entry in entries for word in ("--allow", entry)]
                done = await trio.run_process(
                    [*command, "get", "--endpoint", str(endpoint), "--ttl", "900", "--pool", "net", *allow],
                    env=env, capture_stdout=True)
                handle_file.write_bytes(done.stdout)
                vm = vmcache.VMHandle.from_json(done.stdout.decode())
                try:
                    async with vmcache.connect(endpoint) as client:
                        await pool_full(client)  # no refill runs while anything is timed
                    await throughput(vm, daemon_pid, server, echo_port, forwarder, size, args.runs, samples)
                finally:
                    for process in forwarders:
                        process.send_signal(signal.SIGINT)
                        await trio.to_thread.run_sync(functools.partial(process.wait, timeout=30))
                    forwarders.clear()
                    await vm.aclose()
                    handle_file.unlink()
                return await handouts(endpoint, policy, args.handouts, samples)

            taken = trio.run(main)
        finally:
            for process in forwarders:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=30)
            if handle_file.exists() and handle_file.stat().st_size:
                subprocess.run([*command, "stop", str(handle_file)], env=env, timeout=120, check=False)
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=120)
    steps = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    for entry in taken:
        pool, vm_id = entry.split()
        for step in steps:
            if step["vm"] == vm_id:
                samples.note(f"hand-out {pool} {step['step']} ms", step["seconds"] * 1000)
    return {"size_mb": args.size_mb, "runs": args.runs, "handouts": args.handouts,
            "medians": {name: statistics.median(values) for name, values in samples.values.items()},
            "samples": samples.values}


def table(result: dict[str, Any]) -> str:
    m = result["medians"]
    lines = [f"{result['size_mb']} MB, one VM (TCG, 1 vCPU, 256 MiB; restricted network), medians of "
             f"{result['runs']}; CPU seconds during each transfer",
             f"{'':32}{'MB/s':>7}{'wall s':>8}{'qemu':>7}{'daemon':>8}{'host end':>9}{'agent':>7}"
             f"{'guest end':>10}{'guest all':>10}"]
    stdout = m["stdout MB/s"]
    rows = (("guest download", "guest <- host (egress proxy)", "guest download cpu client (self)"),
            ("connect_tcp", "host <- guest: vm.connect_tcp", "connect_tcp cpu guest end"),
            ("port-forward", "host <- guest: port-forward", "port-forward cpu guest end"),
            ("stdout", "agent stdout (head -c)", "stdout cpu guest end"))
    for name, label, end in rows:
        lines.append(f"{label:32}{m[name + ' MB/s']:>7.1f}{m[name + ' wall s']:>8.2f}"
                     f"{m[name + ' cpu qemu']:>7.2f}{m[name + ' cpu daemon']:>8.2f}"
                     f"{m[name + ' cpu host end']:>9.2f}{m[name + ' cpu agent']:>7.2f}"
                     f"{m[end] if name != 'stdout' else 0.0:>10.2f}{m[name + ' cpu guest total']:>10.2f}")
    lines.append("MB/s / agent stdout's: " + ", ".join(
        f"{name} {m[name + ' MB/s'] / stdout:.2f}" for name, _, _ in rows[:3]))
    lines.append("(guest <- host: MB/s timed in the guest, connect to last byte; wall s: the whole `vm.run` "
                 "from the host. host end: the host server / this process / the forwarder)")
    lines.append("")
    lines.append(f"{'connection set-up, ms (n=20)':58}{'p50':>7}{'max':>7}")
    for name in sorted(key for key in result["samples"] if key.startswith("set-up")):
        values = result["samples"][name]
        lines.append(f"{name[len('set-up '):]:58}{statistics.median(values):>7.1f}{max(values):>7.1f}")
    lines.append("")
    lines.append(f"hand-out (get_vm, client side), medians of {result['handouts']}; refill: from the "
                 "request until Status shows the pool full again")
    lines.append(f"{'':22}{'no network':>12}{'restricted':>12}{'ratio':>7}{'configure_guest':>17}"
                 f"{'enforce set-up':>16}{'refill none':>13}{'refill restr.':>14}")
    for mode, plain, net in (("boot", "default", "net"), ("snapshot", "snap", "netsnap")):
        lines.append(f"{mode + ' mode, ms / s':22}{m[f'hand-out {plain} ms']:>12.1f}"
                     f"{m[f'hand-out {net} ms']:>12.1f}"
                     f"{m[f'hand-out {net} ms'] / m[f'hand-out {plain} ms']:>7.2f}"
                     f"{m.get(f'hand-out {net} configure_guest ms', float('nan')):>17.1f}"
                     f"{m.get(f'hand-out {net} enforce set-up ms', float('nan')):>16.1f}"
                     f"{m[f'refill {plain} s']:>13.2f}{m[f'refill {net} s']:>14.2f}")
    lines.append("`python3 -I -c pass` in the VM just handed out, ms (none: its first; restricted: its "
                 "second, the first was configure_guest's):")
    for mode, plain, net in (("boot", "default", "net"), ("snapshot", "snap", "netsnap")):
        lines.append(f"{mode + ' mode':22}{m[f'python3 after hand-out {plain} ms']:>12.1f}"
                     f"{m[f'python3 after hand-out {net} ms']:>12.1f}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--daemon":  # the daemon of a run (see serve_timed)
        serve_timed(Path(sys.argv[2]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="transfers of each kind")
    parser.add_argument("--handouts", type=int, default=5, help="hand-outs of each pool")
    parser.add_argument("--quick", action="store_true", help="--runs 1 --handouts 2 --size-mb 50")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "network.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.handouts, args.size_mb = 1, 2, 50
    before = qemu_pids()
    work = Path(tempfile.mkdtemp(prefix="vmcache-bench-network-", dir="/tmp"))
    work.chmod(0o711)  # each VM's own uid passes through to its run directory
    started = time.monotonic()
    try:
        result = run_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        left = qemu_pids() - before
        if left:
            sys.exit(f"QEMU processes left behind: {sorted(left)}")
    result["seconds"] = time.monotonic() - started
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
