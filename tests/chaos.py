"""Chaos soak: clients of every kind killed at random moments, VMs and the daemon too; then count.

    python tests/chaos.py [--rounds 300] [--cache 4] [--output bench/results/chaos.json]

Run by ``nox -s chaos`` (and so by scripts/test and CI). Each round starts one
client, a real process: ``vmcache run`` (a lease), ``vmcache get`` (a claim, the VM
stopped later with ``vmcache stop``), a library lease (``lease_vm`` in a Python
script), or Kata's ``GetBaseVM`` through grpcio; and, at a random moment, sends it
SIGKILL, SIGTERM or SIGINT, or lets it finish. Kata's clients come with a deadline of
60 s, or a short one (5-200 ms: a hand-out racing the client's giving up, the reply must
then not be written and the VM stays cached). Now and then a cached VM is killed or
SIGSTOPped, and a few times the daemon itself is SIGKILLed and started again.

At the end every QEMU process must be accounted for: cached, or claimed by a client
that got its handle (then stopped), or, for Kata's GetBaseVM (which has no
acknowledgement), claimed in the daemon's ledger: a reply written but never read, by a
client killed or out of time just after it was written (counted). Nothing
may be lost or leaked:
QEMU processes, the daemon's file descriptors, run directories; and no output of
any process may hold a traceback. Exits non-zero if anything does.

Its VMs have a NIC (the config permits a loopback server the run starts): ``run-net``
and ``get-net`` rounds ask for ``--allow host.vmcache.internal:PORT`` (``run-net``'s guest
fetches from the server through the egress proxy), so that VMs with an enforcement up are
killed, leased, claimed and adopted by a restarted daemon like the others; then what a
VM's network could leave is counted too (tests/leaks.py): interfaces and named namespaces
in the host's namespace, its nftables ruleset, the daemon's descriptors holding another
namespace, its helper processes, connections to the server.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

import vmcache
from vmcache.cgroup import manager as cgroup_manager
from vmcache.ledger import OFFER_DEADLINE, STOP_WAIT
from vmcache.procfs import jail_pids, open_fds, qemu_pids

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leaks
from conftest import handles_sigterm

OVERALL_DEADLINE = 900.0
ROUND_DEADLINE = 120.0
CONCURRENCY = 4
ROOT = Path(__file__).resolve().parent.parent

# The library clients are written as a careful user would: one line and a status for
# what can go wrong (the daemon restarting under them, a signal), never a traceback.
LEASE_SCRIPT = """
import signal, sys
signal.signal(signal.SIGTERM, signal.default_int_handler)  # until trio runs: as for Ctrl-C
try:
    import trio, vmcache
    async def main():
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_sigterm():
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                nursery.start_soon(stop_on_sigterm)
                async with vmcache.connect(sys.argv[1]) as cache:
                    async with cache.lease_vm(timeout=60) as vm:
                        print(vm.id, flush=True)
                        await vm.exec(["sleep", "2"])
                nursery.cancel_scope.cancel()
    trio.run(main)
except BaseException as error:  # a careful script: one line, whatever ended it
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        sys.exit(130)
    print(f"lease client: {error}", file=sys.stderr)
    sys.exit(1)
"""

KATA_SCRIPT = """
import signal, sys
signal.signal(signal.SIGTERM, signal.default_int_handler)
try:
    import json, grpc
    sys.path.insert(0, sys.argv[2])
    import cache_pb2_grpc
    from google.protobuf.empty_pb2 import Empty
    with grpc.insecure_channel("unix://" + sys.argv[1]) as channel:
        vm = cache_pb2_grpc.CacheServiceStub(channel).GetBaseVM(Empty(), timeout=float(sys.argv[3]))
        print(json.dumps(json.loads(vm.hypervisor)["vmcache"]), flush=True)
except KeyboardInterrupt:
    sys.exit(130)
except ImportError as error:  # a signal during grpc's C start-up comes out as an ImportError
    print(f"kata client: could not start: {error}", file=sys.stderr)
    sys.exit(1)
except Exception as error:  # grpc.RpcError and its kin have code(); one line, whatever it is
    code = getattr(error, "code", None)
    print(f"kata client: {code().name if callable(code) else type(error).__name__}", file=sys.stderr)
    sys.exit(1)
"""

#: A client's life starts when its own code runs (it has installed its SIGTERM handler):
#: before that, the Python interpreter itself is starting up, and a SIGINT there is
#: Python's own KeyboardInterrupt. See the README's Limitations.
EARLIEST_SIGNAL = 0.0
#: The most claimed VMs (``get`` and Kata's) left running at once; older ones are stopped.
MAX_CLAIMED = 24
#: The share of ``run`` and ``get`` rounds that ask for a network (``run-net``, ``get-net``):
#: about one round in six, so the run keeps the mix of kinds it had before networks. With the
#: two added as kinds of their own, four rounds in seven were run or get, more VMs were claimed
#: and left running to the end (80 on 2 cores), and chaos took 391 s in CI instead of 250-290.
NET_SHARE = 0.4
#: What a ``run-net`` guest runs: a fetch from the loopback server through the egress proxy.
FETCH = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
         "f'http://host.vmcache.internal:{sys.argv[1]}/', timeout=10).read().decode())")
#: The counters of what a VM's network could leave (each must be empty, false or 0).
LEAKS = ("leaked_host_links", "leaked_netns_mounts", "host_ruleset_changed",
         "daemon_fds_in_vm_namespaces", "daemon_helpers_left", "proxied_connections_left")


class Chaos:
    def __init__(self, work: Path, cache_size: int, seed: int, port: int) -> None:
        self.work = work
        self.port = port
        self.run_dir = work / "run"
        self.endpoint = self.run_dir / "cache.sock"
        self.config = work / "chaos.toml"
        self.config.write_text(
            f'[factory]\nvm_cache_number = {cache_size}\nvm_cache_endpoint = "{self.endpoint}"\n'
            'boot_mode = "snapshot"\nhealth_interval = 1.0\n'
            '[hypervisor.qemu]\naccel = "tcg"\nboot_timeout = 60.0\n'
            f'[network]\npermit = ["host.vmcache.internal:{port}"]\n'
        )
        self.env = {**os.environ, "VMCACHE_RUN_DIR": str(self.run_dir), "PYTHONUNBUFFERED": "1"}
        self.cache_size = cache_size
        self.rng = random.Random(seed)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_logs: list[Path] = []
        self.handles: list[str] = []  # claimed VMs a client printed: stopped at the end
        self.kata_handles: list[str] = []
        self.stopping = trio.Lock()  # keep_claimed_bounded's
        #: Kata clients ended by a signal before they printed a VM: each may have had its
        #: reply written and never read (Kata's GetBaseVM has no claim).
        self.kata_killed = 0
        self.outcomes: Counter[str] = Counter()
        self.problems: list[str] = []
        self.stubs = work / "stubs"

    # ------------------------------------------------------------ the daemon

    def start_daemon(self) -> None:
        log_path = self.work / f"daemon-{len(self.daemon_logs)}.log"
        self.daemon_logs.append(log_path)
        with open(log_path, "wb") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "vmcache", "--log-level", "debug", "serve", "--config",
                 str(self.config)], stdout=log, stderr=log, env=self.env)

    async def status(self) -> vmcache.CacheStatus:
        async with vmcache.connect(self.endpoint) as cache:
            return await cache.status()

    async def wait_full(self, timeout: float = 180.0) -> vmcache.CacheStatus:
        with trio.fail_after(timeout):
            while True:
                try:
                    status = await self.status()
                    if len(status.vms) >= self.cache_size:
                        return status
                except vmcache.CacheError:
                    pass
                await trio.sleep(0.1)

    async def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        await trio.to_thread.run_sync(self.daemon.wait)
        self.outcomes["daemon SIGKILLed and restarted"] += 1
        self.start_daemon()

    async def hurt_a_cached_vm(self) -> None:
        try:
            status = await self.status()
        except vmcache.CacheError:
            return
        if status.vms:
            victim = self.rng.choice(status.vms)
            how = self.rng.choice([signal.SIGKILL, signal.SIGSTOP])
            try:
                os.kill(victim.pid, how)
                self.outcomes[f"cached VM sent {how.name}"] += 1
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------ clients

    def client_argv(self, kind: str) -> list[str]:
        endpoint = str(self.endpoint)
        vmcache_command = str(Path(sys.executable).parent / "vmcache")
        allow = ["--allow", f"host.vmcache.internal:{self.port}"]
        if kind == "run":
            return [vmcache_command, "run", "--endpoint", endpoint, "--", "sleep", "2"]
        if kind == "run-net":
            return [vmcache_command, "run", "--endpoint", endpoint, *allow, "--",
                    "python3", "-c", FETCH, str(self.port)]
        if kind == "get":
            return [vmcache_command, "get", "--endpoint", endpoint]
        if kind == "get-net":
            return [vmcache_command, "get", "--endpoint", endpoint, *allow]
        if kind == "lease":
            return [sys.executable, "-c", LEASE_SCRIPT, endpoint]
        timeout = 60.0 if kind == "kata" else self.rng.uniform(0.005, 0.2)
        return [sys.executable, "-c", KATA_SCRIPT, endpoint, str(self.stubs), f"{timeout:.3f}"]

    async def one_round(self, index: int) -> None:
        kind = self.rng.choice(["run", "get", "lease", "kata", "kata-short"])
        if kind in ("run", "get") and self.rng.random() < NET_SHARE:
            kind += "-net"
        cli = kind.removesuffix("-net")  # run or get: the CLI's contract
        action = self.rng.choice(["finish", "SIGKILL", "SIGTERM", "SIGINT"])
        delay = self.rng.uniform(EARLIEST_SIGNAL, 2.5)
        process = await trio.lowlevel.open_process(
            self.client_argv(kind), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        assert process.stdout is not None and process.stderr is not None
        output: dict[str, bytes] = {"stdout": b"", "stderr": b""}

        async def drain(name: str, stream: trio.abc.ReceiveStream) -> None:
            while chunk := await stream.receive_some(65536):
                output[name] += chunk

        with trio.fail_after(ROUND_DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, "stdout", process.stdout)
                nursery.start_soon(drain, "stderr", process.stderr)
                if action != "finish":
                    with trio.move_on_after(10):
                        while not handles_sigterm(process.pid) and process.returncode is None:
                            await trio.sleep(0.005)
                    with trio.move_on_after(delay):
                        await process.wait()
                    if process.returncode is None:
                        process.send_signal(getattr(signal, action))
                await process.wait()
        status = process.returncode
        stdout, stderr = output["stdout"].decode(errors="replace"), output["stderr"].decode(errors="replace")
        self.outcomes[f"{kind}: {action if status != 0 or action == 'finish' else 'finished first'}"] += 1
        if "Traceback" in stdout + stderr:
            self.problems.append(f"round {index} ({kind}, {action}): a traceback:\n{stderr[-2000:]}")
        if kind == "run-net" and action == "finish" and status == 0 and stdout != "chaos":
            self.problems.append(f"round {index} (run-net): fetched {stdout[-200:]!r}")
        if cli in ("run", "get") and status not in (0, -9) and stderr.count("\n") != 1:
            self.problems.append(f"round {index} ({kind}, {action}): exit {status} with "
                                 f"{stderr.count(chr(10))} lines on stderr: {stderr[-500:]!r}")
        if cli in ("run", "get") and action in ("SIGTERM", "SIGINT") and status not in (0, 1):
            expected = 128 + getattr(signal, action)
            if status != expected or not stderr.endswith(f"interrupted ({action})\n"):
                self.problems.append(f"round {index} ({kind}, {action}): exit {status}, stderr {stderr!r}")
        if cli == "get" and stdout.strip():
            self.handles.append(stdout.strip().splitlines()[0])
        if kind.startswith("kata") and stdout.strip():
            self.kata_handles.append(stdout.strip().splitlines()[0])
        elif kind.startswith("kata") and status != 0 and action != "finish":
            self.kata_killed += 1
        await self.keep_claimed_bounded()
        if kind == "kata-short" and status in (0, 1):
            self.outcomes["kata-short: " + ("got a VM" if stdout.strip() else stderr.strip()[-40:])] += 1

    # ------------------------------------------------------------ the whole run

    async def run(self, rounds: int) -> dict[str, Any]:
        self.stubs.mkdir()
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                        f"--python_out={self.stubs}", f"--grpc_python_out={self.stubs}",
                        str(ROOT / "protos" / "cache.proto")], check=True, timeout=60)
        before = qemu_pids()
        self.jails_before, self.cgroups_before = jail_pids(), set(cgroup_manager().existing())
        self.host_before = leaks.census()
        started = time.monotonic()
        self.start_daemon()
        restarts_at = set(self.rng.sample(range(rounds // 5, rounds - rounds // 5), 3))
        try:
            with trio.fail_after(OVERALL_DEADLINE):
                await self.wait_full()
                slots = trio.Semaphore(CONCURRENCY)
                async with trio.open_nursery() as nursery:
                    for index in range(rounds):
                        await slots.acquire()
                        if index in restarts_at:
                            await self.kill_daemon()
                        elif self.rng.random() < 0.05:
                            await self.hurt_a_cached_vm()

                        async def one(index: int = index) -> None:
                            try:
                                await self.one_round(index)
                            finally:
                                slots.release()

                        nursery.start_soon(one)
                        await trio.sleep(self.rng.uniform(0, 0.3))
                result = await self.settle(before)
        finally:
            if self.daemon is not None and self.daemon.poll() is None:
                self.daemon.kill()
                self.daemon.wait()
            for pid in qemu_pids() - before:
                os.kill(pid, signal.SIGKILL)
        result["rounds"] = rounds
        result["seconds"] = round(time.monotonic() - started, 1)
        result["outcomes"] = dict(sorted(self.outcomes.items()))
        return result

    async def stop_handle(self, handle: str) -> bool:
        """Stop a claimed VM by its handle through the real CLI (True if it stopped)."""
        path = self.work / "handle.json"
        path.write_text(handle)
        done = await trio.run_process([sys.executable, "-m", "vmcache", "stop", str(path)],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env=self.env)
        if b"Traceback" in done.stderr:
            self.problems.append(f"stop: a traceback: {done.stderr.decode()[-1000:]}")
        return done.returncode == 0

    async def keep_claimed_bounded(self) -> None:
        """At most :data:`MAX_CLAIMED` claimed VMs run at once: the oldest is stopped, as its
        client would (a claimed VM runs until then: 80 idle TCG guests on 2 cores starved the
        refill's boots past their 60 s, and the kernel's timer check, once in CI)."""
        async with self.stopping:  # rounds run concurrently: one stops at a time
            for handles in (self.handles, self.kata_handles):
                while handles and len(self.handles) + len(self.kata_handles) > MAX_CLAIMED:
                    if not await self.stop_handle(handles[0]):
                        break  # counted at the end, as any claimed VM
                    handles.pop(0)
                    self.outcomes["claimed VM stopped by its client during the run"] += 1

    async def settle(self, before: set[int]) -> dict[str, Any]:
        """Account for every QEMU process, stop what clients claimed, stop the daemon, count."""
        status = await self.wait_full()
        await trio.sleep(2)  # leases released by dying clients finish stopping
        status = await self.wait_full()
        # An offer or a lease is the daemon's to end within its own bounds (the offer
        # deadline, then stopping the VM): wait that long, no longer, before counting.
        unresolved_at_first = sum(vm.state != "claimed" for vm in status.handed_out_vms)
        with trio.move_on_after(OFFER_DEADLINE + STOP_WAIT):
            while any(vm.state != "claimed" for vm in status.handed_out_vms):
                await trio.sleep(0.5)
                status = await self.wait_full()
        fds_before = open_fds(self.daemon.pid) if self.daemon else 0
        cached = {vm.pid for vm in status.vms}
        ledger = {vm.pid: vm for vm in status.handed_out_vms}
        claimed_by_clients = {json.loads(h)["pid"] for h in self.handles + self.kata_handles}
        alive = qemu_pids() - before
        unaccounted = alive - cached - set(ledger)
        leases_left = [vm.id for vm in status.handed_out_vms if vm.state != "claimed"]
        kata_unread = [pid for pid in ledger if pid not in claimed_by_clients]
        stopped = 0
        for handle in self.handles + self.kata_handles:
            stopped += await self.stop_handle(handle)
        for pid in kata_unread:  # Kata's GetBaseVM has no claim: a client killed mid-reply
            os.kill(pid, signal.SIGKILL)
        with trio.fail_after(30):
            while (await self.status()).handed_out_vms:
                await trio.sleep(0.1)
        await trio.sleep(1)
        fds_after = open_fds(self.daemon.pid) if self.daemon else 0
        assert self.daemon is not None
        foreign, helpers = leaks.foreign_fds(self.daemon.pid), leaks.helpers(self.daemon.pid)
        self.daemon.send_signal(signal.SIGTERM)
        exit_status = await trio.to_thread.run_sync(self.daemon.wait, 60)
        leftover_qemu = qemu_pids() - before
        leftover_dirs = [p.name for p in self.run_dir.iterdir() if p.name.startswith("vm-")]
        leftover_jails = jail_pids() - self.jails_before
        leftover_cgroups = set(cgroup_manager().existing()) - self.cgroups_before
        tracebacks = sum("Traceback" in log.read_text(errors="replace") for log in self.daemon_logs)
        host_leaks = leaks.leaked(self.host_before, leaks.census())
        return {
            "cache": self.cache_size,
            "boot_mode": "snapshot",
            "handed_out_claimed_by_get": len(self.handles),
            "handed_out_by_kata_getbasevm": len(self.kata_handles),
            "kata_replies_never_read": len(kata_unread),
            # Unread replies more than the Kata clients a signal ended: VMs handed out to a
            # client out of time (a reply written in the last moment and read too late).
            "kata_replies_unread_by_clients_not_killed": max(0, len(kata_unread) - self.kata_killed),
            "stopped_at_the_end": stopped,
            "lost_vms": len(unaccounted),
            "leases_left_running": len(leases_left),
            "offers_or_leases_still_ending_at_settle": unresolved_at_first,
            "leaked_qemu_processes": len(leftover_qemu),
            "leaked_fds": max(0, fds_after - fds_before),
            "leaked_run_dirs": len(leftover_dirs),
            "leaked_jail_processes": len(leftover_jails),
            "leaked_cgroups": len(leftover_cgroups),
            **host_leaks,
            "daemon_fds_in_vm_namespaces": foreign,
            "daemon_helpers_left": helpers,
            "proxied_connections_left": leaks.established(self.port),
            "tracebacks": tracebacks + sum("traceback" in p for p in self.problems),
            "daemon_exit_status": exit_status,
            "problems": self.problems[:20],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--cache", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmcache-chaos-", dir="/tmp"))
    work.chmod(0o711)  # each VM's own uid passes through to its run directory
    with leaks.loopback_server("chaos") as port:
        chaos = Chaos(work, args.cache, args.seed, port)
        result = trio.run(chaos.run, args.rounds)
    result["seed"] = args.seed
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    bad = {key: result[key] for key in ("lost_vms", "leases_left_running", "leaked_qemu_processes",
                                         "leaked_fds", "leaked_run_dirs", "leaked_jail_processes",
                                         "leaked_cgroups", *LEAKS, "tracebacks",
                                         "daemon_exit_status") if result[key]}
    if bad or result["problems"]:
        print(f"chaos: FAILED {bad}; work directory kept: {work}", file=sys.stderr)
        raise SystemExit(1)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"chaos: ok, {result['rounds']} rounds in {result['seconds']} s, nothing lost or leaked")


if __name__ == "__main__":
    main()
