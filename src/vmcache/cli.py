"""The ``vmcache`` command line.

Whatever happens, the user sees one line on stderr and an exit status, never a
traceback: a :class:`~vmcache.errors.VmcacheError` gives its message and its
``exit_status``; SIGINT, SIGTERM and SIGHUP, whenever they arrive, give
``interrupted (SIGINT)`` and 128 + the signal number (130, 143, 129), after the
command cleaned up (a VM it booted or leased is stopped); anything else is a bug,
reported in one line (the traceback goes to the debug log).

Signals are taken in charge first thing, before the heavy imports: the package
imports lazily for that reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from .client import VMSize
    from .handle import VMHandle
    from .network_policy import NetworkPolicy
    from .relay import ProcessRequest
    from .wire import CacheStatus

EPILOG = """\
examples:
  vmcache serve --config /etc/vmcache/vmcache.toml    keep VMs booted, hand them out
  vmcache run -- uname -a                             run a command in a warm VM
  vmcache run --direct -- uname -a                    the same in a freshly booted VM
  vmcache get --ttl 600 > vm.json; vmcache exec vm.json -- ls /; vmcache stop vm.json
  vmcache port-forward vm.json 8080:80                reach port 80 in the VM as localhost:8080
  vmcache status
  vmcache image build                                  build the default guest image
"""

DEFAULT_CLIENT_TIMEOUT = 60.0
T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERNAL_ERROR_STATUS = 70


class Interrupted(BaseException):
    """A stop signal arrived: the command was cancelled and cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_in_trio = False
_pending_signal: int | None = None


def _early_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP before (or between) event loops: stop at once, or note it for the loop."""
    global _pending_signal
    if _in_trio:
        _pending_signal = signum  # the loop's receiver is being set up: it picks this up
        return
    raise Interrupted(signum)


def run_async(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run(function, *args)``, with SIGINT, SIGTERM and SIGHUP cancelling it cleanly.

    The function is cancelled (so its cleanup runs: VMs stopped, leases released),
    then :class:`Interrupted` is raised.
    """
    import trio

    global _in_trio

    async def main() -> T:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            got: list[int] = [] if _pending_signal is None else [_pending_signal]
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        got.append(signum)
                        nursery.cancel_scope.cancel()
                        return

                if got:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(watch)
                result = await function(*args)
                nursery.cancel_scope.cancel()
            if got:
                raise Interrupted(got[0])
            return result

    from .errors import raise_unwrapped

    _in_trio = True
    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # the nursery wrapped the command's own error
        raise_unwrapped(group)
    finally:
        _in_trio = False


def _fail(message: str, status: int) -> NoReturn:
    from .errors import printable

    # Escaped once more here: a message may quote a daemon's words, or a guest's.
    print(f"vmcache: {printable(message, newlines=True)}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _endpoint(args: argparse.Namespace) -> Path:
    """--endpoint, else $VMCACHE_ENDPOINT, else the config's, else the default."""
    from .config import load_config

    if getattr(args, "endpoint", None):
        return Path(args.endpoint)
    if env := os.environ.get("VMCACHE_ENDPOINT"):
        return Path(env)
    return load_config(getattr(args, "config", None)).endpoint()


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _fail("no command given: vmcache run [options] -- CMD [ARG...]", 2)
    return command


def _size(args: argparse.Namespace) -> VMSize:
    """``--cpus``, ``--memory``, ``--pool``: what size of VM to ask the daemon for."""
    from .client import VMSize

    for name in ("cpus", "memory"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _fail(f"--{name} must be at least 1", 2)
    return VMSize(args.cpus or 0, args.memory or 0, args.pool or "")


def _network(args: argparse.Namespace) -> NetworkPolicy | None:
    """``--network``, ``--allow``: the VM's network policy (None: the pool's default). An
    ``--allow`` without ``--network`` means restricted."""
    from .errors import NetworkPolicyError
    from .network_policy import NetworkPolicy

    allow: list[str] = getattr(args, "allow", None) or []
    mode: str | None = getattr(args, "network", None)
    if mode is None and not allow:
        return None
    try:
        return NetworkPolicy.parse(mode or "restricted", allow)
    except NetworkPolicyError as error:
        _fail(f"--allow: {error}" if mode != "none" else f"--network none: {error}", 2)


def _ttl(args: argparse.Namespace) -> float | None:
    ttl: float | None = getattr(args, "ttl", None)
    if ttl is not None and not 0 < ttl <= 30 * 24 * 3600:
        _fail("--ttl must be more than 0 and at most 30 days (in seconds)", 2)
    return ttl


# ----------------------------------------------------------------- commands


def cmd_config_show(args: argparse.Namespace) -> int:
    from .config import load_config, render_toml

    config = load_config(args.config)
    print(f"# effective configuration{f' from {config.source}' if config.source else ' (defaults)'}")
    print(render_toml(config), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from .config import load_config, resolve_spec

    config = load_config(args.file)
    if args.files:
        resolve_spec(config)
    print(f"{args.file}: ok")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from .config import load_config
    from .image import build_image

    def progress(message: str) -> None:
        print(f"vmcache image: {message}", file=sys.stderr, flush=True)

    image = load_config(args.config).image
    packages = [*image.packages, *(name for name in (args.packages or "").split(",") if name.strip())]
    started = time.monotonic()
    result = build_image(
        output=Path(args.output) if args.output else None,
        kernel=Path(args.kernel) if args.kernel else None,
        modules=Path(args.modules) if args.modules else None,
        progress=progress,
        packages=packages,
        mirror=args.mirror or image.mirror,
        rootfs=not args.no_rootfs,
        force=args.force,
    )
    if result.changed:
        rootfs = result.manifest.get("rootfs")
        size = f", root image {rootfs['size'] / 1e6:.0f} MB" if isinstance(rootfs, dict) else ""
        progress(f"built {result.image_dir} (kernel {result.manifest['kernel_version']}{size}) "
                 f"in {time.monotonic() - started:.1f} s")
    else:
        progress(f"{result.image_dir} is up to date; nothing to do")
    return 0


def _process_request(args: argparse.Namespace) -> ProcessRequest:
    """The process to run, from ``exec``/``run``'s options."""
    from .relay import ProcessRequest

    env: dict[str, str] = {}
    for item in args.env or []:
        key, equals, value = item.partition("=")
        if not equals or not key:
            _fail(f"--env takes KEY=VALUE, not {item!r}", 2)
        env[key] = value
    return ProcessRequest(
        argv=_command(args), env=env, cwd=args.cwd,
        forward_stdin=args.interactive or not sys.stdin.isatty(),
        tty=args.tty, timeout=args.timeout or None,
    )


def cmd_run(args: argparse.Namespace) -> NoReturn:
    from .relay import relay_process

    request = _process_request(args)
    network = _network(args)
    if args.direct:
        from .config import load_config, resolve_spec

        if network is not None and network.is_restricted:
            _fail("--network restricted is enforced by the daemon: not with --direct", 2)
        from .qemu import launch_vm

        spec = resolve_spec(load_config(args.config))

        async def direct() -> int:
            async with launch_vm(spec) as vm:
                return await relay_process(vm, request, forward_sigint=False)

        raise SystemExit(run_async(direct))
    from .client import connect
    from .errors import DaemonNotRunningError

    endpoint = _endpoint(args)
    ttl = _ttl(args)

    async def warm() -> int:
        async with connect(endpoint) as cache:
            if args.keep:
                vm = await cache.get_vm(timeout=args.wait, ttl=ttl, size=_size(args), network=network)
                _keep(vm.to_json(), args.handle_file)
                try:
                    return await relay_process(vm, request, forward_sigint=False)
                finally:
                    await vm.disconnect()
            async with cache.lease_vm(timeout=args.wait, ttl=ttl, size=_size(args),
                                      network=network) as vm:
                try:
                    return await relay_process(vm, request, forward_sigint=False)
                finally:
                    await vm.disconnect()

    try:
        raise SystemExit(run_async(warm))
    except DaemonNotRunningError as error:
        raise DaemonNotRunningError(
            f"{error}, or boot a VM just for this with `vmcache run --direct`") from None


def _keep(handle_json: str, handle_file: str | None) -> None:
    if handle_file:
        Path(handle_file).write_text(handle_json + "\n")
    else:
        print(f"vmcache: kept VM {handle_json}", file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .config import load_config
    from .errors import check_h2

    check_h2()  # before purerpc is imported (below)
    from .server import serve_until_signalled

    config = load_config(args.config)
    trio.run(serve_until_signalled, config)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from .client import connect

    endpoint = _endpoint(args)
    ttl = _ttl(args)
    network = _network(args)

    def print_handle(handle: VMHandle) -> None:
        # Out before the claim: a VM is never claimed by a client that could not pass it on.
        print(handle.to_json(), flush=True)

    async def get() -> None:
        async with connect(endpoint) as cache:
            await cache.get_vm(timeout=args.timeout, ttl=ttl, size=_size(args), on_offer=print_handle,
                               network=network)

    run_async(get)
    return 0


def status_lines(status: CacheStatus) -> list[str]:
    """What ``vmcache status`` prints: Kata's lines, then ours."""
    from .errors import printable

    lines = [f"VM cache server pid = {status.pid}"]
    lines += [f"VM pid = {vm.pid} Cpu = {vm.cpu} Memory = {vm.memory}MiB" for vm in status.vms]
    paused = f" ({status.pools[0].paused} paused)" if status.pools and status.pools[0].paused else ""
    lines += [
        f"Cache: {len(status.vms)}/{status.cache_size} ready{paused}, {status.booting} booting, "
        f"boot mode {status.boot_mode or 'boot'}",
        f"Counters: {status.boots} boots, {status.boot_failures} boot failures, "
        f"{status.handed_out} handed out, median boot {status.median_boot_seconds:.2f} s, "
        f"median hand-out {status.median_handout_seconds * 1000:.1f} ms, "
        f"uptime {status.uptime_seconds:.0f} s",
    ]
    if status.confinement:
        lines.append(f"Confinement: {status.confinement}")
    if len(status.pools) > 1:  # named pools: each one's shape and fill
        lines += [f"Pool {pool.name}: {pool.cpu} vCPU {pool.memory} MiB, {pool.ready}/{pool.cache_size} "
                  f"ready ({pool.paused} paused), {pool.booting} booting, boot mode {pool.boot_mode}"
                  for pool in status.pools]
    if status.accel or status.accel_reason:
        required = ", required" if status.require_hardware_accel else ""
        lines.append(f"Accel: {status.accel or 'undecided'}{required} ({status.accel_reason})")
    if status.refusal:
        lines.append(f"Refusing hand-outs: {status.refusal}")
    if status.last_boot_error:
        lines.append(f"Failing: {status.boot_failures_in_row} boot failures in a row; "
                     f"last boot error: {printable(status.last_boot_error)}")
    now = time.time()
    for vm in status.handed_out_vms:
        ttl = f", TTL ends in {max(0.0, vm.expires_at - now):.0f} s" if vm.expires_at else ""
        accel = f", {vm.accel}" if vm.accel else ""
        network = vm.network.describe() if not isinstance(vm.network, str) else printable(vm.network)
        lines.append(f"Handed out: VM {vm.id} pid = {vm.pid} {vm.state} by uid {vm.owner_uid} "
                     f"{now - vm.handed_at:.0f} s ago{ttl}{accel}, network {network}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from .client import connect

    endpoint = _endpoint(args)
    if args.watch:
        return _watch(endpoint)

    async def status() -> CacheStatus:
        async with connect(endpoint) as cache:
            return await cache.status()

    result = run_async(status)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print("\n".join(status_lines(result)))
    return 0


def _watch(endpoint: Path) -> int:
    """``status --watch``: the cache as it changes, one line per event, until the daemon stops."""
    from .client import connect
    from .errors import printable

    async def watch() -> None:
        async with connect(endpoint) as cache:
            status = await cache.status()
            print(f"{time.strftime('%H:%M:%S')} {len(status.vms)}/{status.cache_size} ready "
                  f"(daemon pid {status.pid})", flush=True)
            async for event in cache.watch():
                if event.kind == "watching":
                    continue
                stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
                vm = f" VM {event.vm_id} (pid {event.pid})" if event.vm_id else ""
                detail = f": {printable(event.message)}" if event.message else ""
                print(f"{stamp} {event.ready}/{event.cache_size} ready  {event.kind}{vm}{detail}",
                      flush=True)
        print("vmcache: the daemon stopped", file=sys.stderr)

    run_async(watch)
    return 0


def cmd_quit(args: argparse.Namespace) -> int:
    from .client import quit_and_wait

    endpoint = _endpoint(args)
    pid = run_async(quit_and_wait, endpoint)
    print(f"vmcache: daemon (pid {pid}) stopped", file=sys.stderr)
    return 0


def _read_handle(source: str) -> VMHandle:
    """A VM handle from a file, or from stdin when ``source`` is ``-``."""
    from .errors import VmcacheError
    from .handle import VMHandle

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as error:
        raise VmcacheError(f"cannot read the VM handle {source}: {error.strerror}") from None
    return VMHandle.from_json(text)


def cmd_exec(args: argparse.Namespace) -> NoReturn:
    from .relay import relay_process

    request = _process_request(args)
    handle = _read_handle(args.handle)

    async def run() -> int:
        try:
            return await relay_process(handle, request, forward_sigint=True)
        finally:
            await handle.disconnect()

    raise SystemExit(run_async(run))


def cmd_cp(args: argparse.Namespace) -> int:
    from .transfer import GuestPath, download, parse_location, upload

    source, destination = parse_location(args.source), parse_location(args.destination)
    if isinstance(source, GuestPath) == isinstance(destination, GuestPath):
        _fail("one side of cp is HANDLE:PATH (a VM's file), the other a local path or -", 2)
    remote = source if isinstance(source, GuestPath) else destination
    assert isinstance(remote, GuestPath)
    handle = _read_handle(remote.handle_file)

    async def copy() -> tuple[str, int]:
        try:
            if isinstance(source, GuestPath):
                assert isinstance(destination, str)
                return await download(handle, source.path, destination)
            assert isinstance(destination, GuestPath)
            return await upload(handle, source, destination.path)
        finally:
            await handle.disconnect()

    try:
        where, size = run_async(copy)
    except BrokenPipeError:  # `cp HANDLE:PATH - | head`: the reader has what it wanted; end as cat does
        raise SystemExit(128 + signal.SIGPIPE) from None
    except OSError as error:
        _fail(f"cp: {error.filename or ''}: {error.strerror}", 1)
    if args.verbose:
        print(f"vmcache: copied {size} bytes to {where}", file=sys.stderr)
    return 0


def cmd_port_forward(args: argparse.Namespace) -> int:
    import ipaddress

    from .errors import printable
    from .port_forward import ForwardSpec, parse_spec, port_forward

    specs = []
    for text in args.specs:
        try:
            specs.append(parse_spec(text))
        except ValueError as bad:
            _fail(f"port-forward: {bad}", 2)
    try:
        guest_host = str(ipaddress.ip_address(args.guest_address))
    except ValueError:
        _fail(f"port-forward: --guest-address {args.guest_address!r} is not an IP address", 2)
    handle = _read_handle(args.handle)

    def listening(spec: ForwardSpec, port: int) -> None:
        local = f"[{spec.address}]:{port}" if ":" in spec.address else f"{spec.address}:{port}"
        target = spec.guest_port if guest_host == "127.0.0.1" else (
            f"[{guest_host}]:{spec.guest_port}" if ":" in guest_host else f"{guest_host}:{spec.guest_port}")
        print(f"Forwarding from {local} -> {target}", flush=True)

    def failed(line: str) -> None:
        print(f"vmcache: {printable(line)}", file=sys.stderr, flush=True)

    async def run() -> None:
        try:
            await port_forward(handle, specs, guest_host=guest_host, on_listening=listening, on_error=failed,
                               vm_stopped=handle.wait_stopped)
        finally:
            await handle.disconnect()

    run_async(run)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    handle = _read_handle(args.handle)
    run_async(handle.stop)
    print(f"vmcache: VM {handle.id} stopped", file=sys.stderr)
    return 0


# ----------------------------------------------------------------- parser


def _size_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpus", type=int, metavar="N",
                        help="vCPUs the VM must have (it is grown to them before the hand-out)")
    parser.add_argument("--memory", type=int, metavar="MIB",
                        help="memory the VM must have, in MiB (grown in steps of 128 MiB)")
    parser.add_argument("--pool", metavar="NAME",
                        help="the pool to take it from (default: the closest shape to the size)")
    parser.add_argument("--network", choices=["none", "restricted"],
                        help="the VM's network: none, or restricted to --allow (default: the "
                        "pool's [network]; beyond its permit the daemon refuses)")
    parser.add_argument("--allow", action="append", metavar="ENTRY",
                        help="with --network restricted (implied): what the VM may reach: "
                        "HOST:PORT, HOST, *.DOMAIN[:PORT], CIDR[:PORT], "
                        "host.vmcache.internal:PORT (repeatable)")


def _process_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="forward stdin even when it is a terminal (it is forwarded otherwise)")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="run the command on a terminal (raw mode here, window size followed)")
    parser.add_argument("-e", "--env", action="append", metavar="KEY=VALUE",
                        help="set an environment variable for the command (repeatable)")
    parser.add_argument("-w", "--cwd", metavar="DIR", help="the command's working directory")
    parser.add_argument("--timeout", type=float, default=0, metavar="S",
                        help="have the guest kill the command after S seconds (default: no limit)")
    parser.add_argument("command", nargs="*", metavar="-- CMD [ARG...]")


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", metavar="PATH",
                        help="the daemon's socket (default: $VMCACHE_ENDPOINT, the config's, "
                        "or the built-in default)")
    parser.add_argument("--config", metavar="PATH", help="config file, for its endpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmcache",
        description="Keep QEMU VMs booted ahead of time and hand them out over gRPC "
        "(Kata Containers' VMCache protocol) on a Unix socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error"],
                        help="what to log on stderr (default: info for serve, warning otherwise)")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the cache daemon in the foreground",
        description="Keep vm_cache_number VMs booted and hand them out over Kata's VMCache "
        "gRPC protocol on a Unix socket. Ctrl-C or SIGTERM kills every cached VM; VMs "
        "already handed out keep running.",
        epilog="example: vmcache serve --config /etc/vmcache/vmcache.toml",
    )
    serve.add_argument("--config", metavar="PATH", help="config file (TOML)")
    serve.set_defaults(func=cmd_serve)

    get = sub.add_parser(
        "get",
        help="take a VM from the daemon and print its handle (JSON)",
        description="Take a ready VM and print its handle as one JSON object. The VM is "
        "yours: stop it with `vmcache stop` (or give it a --ttl and the daemon stops it).",
        epilog="example: vmcache get --ttl 600 > vm.json",
    )
    _client_options(get)
    get.add_argument("--timeout", type=float, default=DEFAULT_CLIENT_TIMEOUT, metavar="S",
                     help="how long to wait for a ready VM (default %(default)s)")
    get.add_argument("--ttl", type=float, metavar="S",
                     help="the daemon stops the VM S seconds after the hand-out")
    _size_options(get)
    get.set_defaults(func=cmd_get)

    status = sub.add_parser(
        "status",
        help="show the daemon's pid, its cached VMs and the VMs it handed out",
        description="Show the daemon's pid, one line per cached, ready VM, counters, and "
        "one line per handed-out VM the daemon keeps track of.",
        epilog="example: vmcache status --json",
    )
    _client_options(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true",
                        help="show every change as it happens (booting, ready, handed out, ...)")
    status.set_defaults(func=cmd_status)

    quit_ = sub.add_parser(
        "quit",
        help="stop the daemon and wait until it is gone",
        description="Ask the daemon to stop (as Ctrl-C does) and wait until it has exited.",
        epilog="example: vmcache quit --endpoint /run/vmcache/cache.sock",
    )
    _client_options(quit_)
    quit_.set_defaults(func=cmd_quit)

    run = sub.add_parser(
        "run",
        help="run a command in a VM and relay its output and exit status",
        description="Take a warm VM from the daemon (or boot one with --direct), run CMD "
        "in it, relay its stdout and stderr, exit with its status and stop the VM. The VM "
        "is leased: if this command dies by any path, the daemon stops the VM.",
        epilog="example: vmcache run -- sh -c 'uname -r; id'",
    )
    run.add_argument("--direct", action="store_true", help="boot a fresh VM; no daemon needed")
    _client_options(run)
    run.add_argument("--keep", action="store_true",
                     help="keep the VM running and print its handle (on stderr, or to --handle-file)")
    run.add_argument("--handle-file", metavar="PATH", help="with --keep: write the handle (JSON) here")
    run.add_argument("--ttl", type=float, metavar="S",
                     help="the daemon stops the VM S seconds after the hand-out")
    _size_options(run)
    run.add_argument("--wait", type=float, default=DEFAULT_CLIENT_TIMEOUT, metavar="S",
                     help="how long to wait for a VM from the daemon (default %(default)s)")
    _process_options(run)
    run.set_defaults(func=cmd_run)

    exec_ = sub.add_parser(
        "exec",
        help="run a command in a VM you hold, by its handle",
        description="Run CMD in the VM whose handle (the JSON `vmcache get` printed) is in "
        "the file HANDLE, or on stdin for -. Relays output, exits with CMD's status.",
        epilog="example: vmcache get > vm.json && vmcache exec vm.json -- cat /proc/version",
    )
    exec_.add_argument("handle", metavar="HANDLE", help="file with the VM's handle, or -")
    _process_options(exec_)
    exec_.set_defaults(func=cmd_exec)

    cp = sub.add_parser(
        "cp",
        help="copy a file into or out of a VM you hold",
        description="Copy a file between this host and a VM: one side is HANDLE:PATH (the "
        "handle file, a colon, an absolute path in the guest), the other a local path, or - "
        "for stdin or stdout. A destination ending in / gets the source's name. Any size, "
        "binary-safe; the file's mode is kept.",
        epilog="examples: vmcache cp data.csv vm.json:/tmp/   vmcache cp vm.json:/tmp/out.txt .",
    )
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.add_argument("-v", "--verbose", action="store_true", help="say what was copied")
    cp.set_defaults(func=cmd_cp)

    forward = sub.add_parser(
        "port-forward",
        help="forward local TCP ports to ports inside a VM you hold",
        description="Listen on each local [ADDR:]LOCAL_PORT (ADDR 127.0.0.1 by default, LOCAL_PORT 0 "
        "for any free port) and carry every connection to GUEST_PORT inside the VM whose handle is "
        "in HANDLE (or on stdin for -), through the guest agent: no guest network is needed. Prints "
        "one line per forward once it listens; Ctrl-C ends it.",
        epilog="examples: vmcache port-forward vm.json 8080:80   "
        "vmcache port-forward vm.json 0:8000 127.0.0.1:5433:5432",
    )
    forward.add_argument("handle", metavar="HANDLE", help="file with the VM's handle, or -")
    forward.add_argument("specs", nargs="+", metavar="[ADDR:]LOCAL_PORT:GUEST_PORT")
    forward.add_argument("--guest-address", default="127.0.0.1", metavar="IP",
                         help="the address to connect to inside the guest (default %(default)s)")
    forward.set_defaults(func=cmd_port_forward)

    stop = sub.add_parser(
        "stop",
        help="stop a VM you hold, by its handle",
        description="Stop the VM whose handle is in the file HANDLE (or on stdin for -): "
        "QMP quit, then SIGTERM, then SIGKILL; its run directory is removed. A VM a daemon "
        "handed out is stopped by that daemon (StopVM: its owner, root or the daemon's user "
        "only); without a daemon, only a VM whose run directory is vm-<id> under the run "
        "directory ($VMCACHE_RUN_DIR) and whose identity record (vm.json) names the handle's "
        "pid and start time, checked against /proc, is touched.",
        epilog="example: vmcache stop vm.json",
    )
    stop.add_argument("handle", metavar="HANDLE", help="file with the VM's handle, or -")
    stop.set_defaults(func=cmd_stop)

    config_parser = sub.add_parser("config", help="show the effective config, or check a file")
    config_sub = config_parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser(
        "show", help="print the effective config (defaults filled in) as TOML",
        description="Print every key with its effective value: the file's, else the default.",
        epilog="example: vmcache config show --config /etc/vmcache/vmcache.toml",
    )
    show.add_argument("--config", metavar="PATH", help="config file (default: none, all defaults)")
    show.set_defaults(func=cmd_config_show)
    check = config_sub.add_parser(
        "check", help="validate a config file",
        description="Check a config file: TOML syntax, key names, types and ranges; with "
        "--files also that the QEMU binary, kernel and initrd it names exist.",
        epilog="example: vmcache config check --files contrib/vmcache.toml",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--files", action="store_true", help="also check the files it names")
    check.set_defaults(func=cmd_config_check)

    image = sub.add_parser("image", help="manage the default guest image")
    image_sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = image_sub.add_parser(
        "build",
        help="build the default guest image (kernel, initramfs, root filesystem image)",
        description="Build the kernel, initramfs and read-only root filesystem image (Debian\n"
        "with python3, made with mmdebstrap; needs root) the daemon boots when the config\n"
        "names none. Does nothing when nothing changed.",
        epilog="examples: vmcache image build --packages curl,git\n"
        "          vmcache image build --kernel /boot/vmlinuz-$(uname -r)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--output", metavar="DIR", help="where to write (default: <data>/image)")
    build.add_argument("--kernel", metavar="PATH", help="kernel image to use")
    build.add_argument("--modules", metavar="DIR", help="that kernel's /lib/modules/<version>")
    build.add_argument("--config", metavar="FILE",
                       help="take [image] packages and mirror from this config file")
    build.add_argument("--packages", metavar="A,B",
                       help="Debian packages to add to the root image (besides the config's)")
    build.add_argument("--mirror", metavar="URI",
                       help="Debian mirror (default: the config's, else the host apt's)")
    build.add_argument("--force", action="store_true",
                       help="rebuild the root image even if its inputs did not change "
                       "(to pick up package updates)")
    build.add_argument("--no-rootfs", action="store_true",
                       help="kernel and initramfs only (the initramfs must then carry python3)")
    build.set_defaults(func=cmd_image_build)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; everything after the first ``--`` is the command, untouched, so that
    options may come before or after the handle (``exec -it vm.json -- sh``)."""
    command: list[str] | None = None
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    if command is not None and hasattr(args, "command"):
        args.command = [*args.command, *command]
    return args


def _exit_for(error: BaseException) -> NoReturn:
    """One line and an exit status for whatever ended the command."""
    from .errors import VmcacheError
    from .errors import leaves as leaves_of

    leaves = leaves_of(error)
    interrupts = [cause for leaf in leaves for cause in _causes(leaf)]
    for cause in interrupts:
        if isinstance(cause, Interrupted):
            _fail(f"interrupted ({signal.Signals(cause.signum).name})", 128 + cause.signum)
    for cause in interrupts:
        if isinstance(cause, KeyboardInterrupt):
            _fail("interrupted (SIGINT)", 128 + signal.SIGINT)
    for leaf in leaves:
        if isinstance(leaf, VmcacheError):
            _fail(str(leaf), leaf.exit_status)
    for leaf in leaves:
        if isinstance(leaf, SystemExit):
            raise leaf
    logging.getLogger("vmcache").debug("unexpected error", exc_info=error)
    leaf = leaves[0]
    _fail(f"unexpected error (a bug; --log-level debug shows where): {type(leaf).__name__}: {leaf}",
          INTERNAL_ERROR_STATUS)


MAX_CAUSES = 8


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``, at most
    :data:`MAX_CAUSES`): a stop signal that lands while a class is being created (say
    during a lazy ``import trio``) reaches us as Python 3.11's ``RuntimeError: Error calling
    __set_name__ ...`` raised from our :class:`Interrupted`, and is still an interruption."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(found) < MAX_CAUSES:
        found.append(current)
        current = current.__cause__
    return found


def main(argv: list[str] | None = None) -> NoReturn:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _early_signal)
    try:
        try:
            args = _parse(sys.argv[1:] if argv is None else argv)
            level = args.log_level or ("info" if args.subcommand == "serve" else "warning")
            logging.basicConfig(
                level=level.upper(),
                format="%(asctime)s vmcache %(levelname)s %(message)s",
                datefmt="%H:%M:%S",
            )
            for chatty in ("hpack", "h2"):  # they log every header at debug level
                logging.getLogger(chatty).setLevel(logging.WARNING)
            func: Callable[[argparse.Namespace], int] = args.func
            status = func(args)
        except SystemExit:
            raise
        except BaseException as error:  # the one place that turns anything into one line
            _exit_for(error)
    except SystemExit as done:
        _exit_now(done.code)
    _exit_now(status)


def _exit_now(code: object) -> NoReturn:
    """Exit with ``code``, the command being done: a stop signal from now on changes
    nothing, and the interpreter's own shutdown (during which a signal would kill us
    without a word) is skipped."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass
    logging.shutdown()
    os._exit(code or 0)
