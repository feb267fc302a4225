"""The ``vmcache`` command line.

Every :class:`~vmcache.errors.VmcacheError` becomes one line on stderr and the
error's exit status; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import trio

from .config import load_config, resolve_spec
from .errors import VmcacheError
from .image import build_image

EPILOG = """\
examples:
  vmcache serve --config /etc/vmcache/vmcache.toml    keep VMs booted, hand them out
  vmcache run -- uname -a                             run a command in a warm VM
  vmcache run --direct -- uname -a                    the same in a freshly booted VM
  vmcache get > vm.json; vmcache exec vm.json -- ls /; vmcache stop vm.json
  vmcache status
  vmcache image build                                  build the default guest image
"""

DEFAULT_CLIENT_TIMEOUT = 60.0


def _fail(message: str, status: int) -> NoReturn:
    print(f"vmcache: {message}", file=sys.stderr)
    raise SystemExit(status)


def _endpoint(args: argparse.Namespace) -> Path:
    """--endpoint, else $VMCACHE_ENDPOINT, else the config's, else the default."""
    if getattr(args, "endpoint", None):
        return Path(args.endpoint)
    if env := os.environ.get("VMCACHE_ENDPOINT"):
        return Path(env)
    return load_config(getattr(args, "config", None)).endpoint()


def _relay_and_exit(stdout: bytes, stderr: bytes, status: int) -> NoReturn:
    sys.stdout.buffer.write(stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(stderr)
    sys.stderr.buffer.flush()
    raise SystemExit(status)


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _fail("no command given: vmcache run [options] -- CMD [ARG...]", 2)
    return command


# ----------------------------------------------------------------- commands


def cmd_image_build(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"vmcache image: {message}", file=sys.stderr, flush=True)

    result = build_image(
        output=Path(args.output) if args.output else None,
        kernel=Path(args.kernel) if args.kernel else None,
        modules=Path(args.modules) if args.modules else None,
        progress=progress,
    )
    if result.changed:
        progress(f"built {result.image_dir} (kernel {result.manifest['kernel_version']})")
    else:
        progress(f"{result.image_dir} is up to date; nothing to do")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = _command(args)
    if args.direct:
        spec = resolve_spec(load_config(args.config))
        from .qemu import launch_vm

        async def direct() -> tuple[bytes, bytes, int]:
            async with launch_vm(spec) as vm:
                result = await vm.exec(command, args.timeout)
            return result.stdout, result.stderr, result.exit_status

        stdout, stderr, status = trio.run(direct)
        _relay_and_exit(stdout, stderr, status)
    from .client import run_warm

    endpoint = _endpoint(args)

    async def warm() -> tuple[bytes, bytes, int, str | None]:
        return await run_warm(endpoint, command, timeout=args.timeout, keep=args.keep,
                              wait=args.wait)

    stdout, stderr, status, kept = trio.run(warm)
    if kept is not None:
        print(kept, file=sys.stderr)
    _relay_and_exit(stdout, stderr, status)


# ----------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmcache",
        description="Keep QEMU VMs booted ahead of time and hand them out over gRPC "
        "(Kata Containers' VMCache protocol) on a Unix socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a command in a VM and relay its output and exit status",
        description="Take a warm VM from the daemon (or boot one with --direct), run CMD "
        "in it, relay its stdout and stderr, exit with its status and stop the VM.",
        epilog="example: vmcache run -- sh -c 'uname -r; id'",
    )
    run.add_argument("--direct", action="store_true", help="boot a fresh VM; no daemon needed")
    run.add_argument("--config", metavar="PATH", help="config file (TOML)")
    run.add_argument("--endpoint", metavar="PATH", help="the daemon's socket")
    run.add_argument("--keep", action="store_true", help="keep the VM and print its handle")
    run.add_argument("--wait", type=float, default=DEFAULT_CLIENT_TIMEOUT, metavar="S",
                     help="how long to wait for a VM from the daemon (default %(default)s)")
    run.add_argument("--timeout", type=int, default=0, metavar="S",
                     help="kill the command after S seconds (default: no limit)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    run.set_defaults(func=cmd_run)

    image = sub.add_parser("image", help="manage the default guest image")
    image_sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = image_sub.add_parser(
        "build",
        help="build the default guest kernel + initramfs",
        description="Build the kernel + initramfs the daemon boots when the config names "
        "none. Does nothing when nothing changed.",
        epilog="example: vmcache image build --kernel /boot/vmlinuz-$(uname -r)",
    )
    build.add_argument("--output", metavar="DIR", help="where to write (default: <data>/image)")
    build.add_argument("--kernel", metavar="PATH", help="kernel image to use")
    build.add_argument("--modules", metavar="DIR", help="that kernel's /lib/modules/<version>")
    build.set_defaults(func=cmd_image_build)
    return parser


def main(argv: list[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        status = func(args)
    except VmcacheError as error:
        _fail(str(error), error.exit_status)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    raise SystemExit(status)

