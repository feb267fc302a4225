"""``vmcache cp``: files between this host and a guest, streamed, any size, mode kept.

A file copied out of the guest gets the guest's permission bits like ``cp`` without
``-p``: ``mode & 0o777 & ~umask``. Never setuid, setgid or sticky: the guest is hostile,
and its files must not become privileged programs on the host.

One side is ``HANDLE:PATH`` (a handle file, a colon, an absolute guest path), the
other a local path or ``-`` (stdin or stdout). A destination ending in ``/`` (or
an existing local directory) gets the source's file name. Local files are read
and written in worker threads; a downloaded file is written under a temporary
name and renamed into place, so it never exists half-written.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

import attrs
import trio

from .errors import InvalidRequestError
from .guest_api import GuestAPI

CHUNK = 1 << 20


@functools.cache
def process_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, which races
    with any thread creating files meanwhile): from ``/proc/self/status``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def host_mode(guest_mode: int) -> int:
    """The mode of a host file copied from a guest file of ``guest_mode``."""
    return guest_mode & 0o777 & ~process_umask()


@attrs.frozen
class GuestPath:
    """``HANDLE:PATH`` from the command line."""

    handle_file: str
    path: str


def parse_location(text: str) -> GuestPath | str:
    """A guest location (``vm.json:/tmp/x``) or a local path (anything else)."""
    head, colon, tail = text.partition(":")
    if colon and head and (head == "-" or Path(head).is_file()):
        if not tail.startswith("/"):
            raise InvalidRequestError(f"{text}: the guest path must be absolute (HANDLE:/path)")
        return GuestPath(head, tail)
    return text


def _guest_target(destination: str, source_name: str) -> str:
    if destination.endswith("/"):
        if not source_name:
            raise InvalidRequestError("copying from stdin needs a full guest path, not a directory")
        return destination + source_name
    return destination


async def _local_chunks(source: str) -> AsyncIterator[bytes]:
    async with await trio.open_file(sys.stdin.fileno() if source == "-" else source, "rb",
                                    closefd=source != "-") as file:
        while chunk := await file.read(CHUNK):
            yield chunk


async def upload(vm: GuestAPI, source: str, destination: str) -> tuple[str, int]:
    """Copy a local file (or stdin) into the guest; its guest path and size."""
    mode = 0o644
    name = ""
    if source != "-":
        try:
            info = os.stat(source)
        except OSError as error:
            raise InvalidRequestError(f"cannot read {source}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequestError(f"{source} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        name = Path(source).name
    target = _guest_target(destination, name)
    size = await vm.write_file(target, _local_chunks(source), mode=mode)
    return target, size


def _local_target(destination: str, source: str) -> Path:
    name = PurePosixPath(source).name
    if destination.endswith("/") or Path(destination).is_dir():
        return Path(destination) / name
    return Path(destination)


async def download(vm: GuestAPI, source: str, destination: str) -> tuple[str, int]:
    """Copy a guest file to a local path (or stdout); where it went and its size."""
    size = 0
    async with vm.open_file(source) as file:
        if destination == "-":
            while chunk := await file.receive_some(CHUNK):
                await trio.to_thread.run_sync(sys.stdout.buffer.write, chunk)
                size += len(chunk)
            await trio.to_thread.run_sync(sys.stdout.buffer.flush)
            return "-", size
        target = _local_target(destination, source)
        partial = await trio.to_thread.run_sync(
            lambda: tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by trio.wrap_file below
                dir=target.parent, prefix=f".{target.name}.", delete=False))
        try:
            async with trio.wrap_file(partial) as out:
                while chunk := await file.receive_some(CHUNK):
                    await out.write(chunk)
                    size += len(chunk)
            await trio.to_thread.run_sync(os.chmod, partial.name, host_mode(file.mode))
            await trio.to_thread.run_sync(os.replace, partial.name, target)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: Path(partial.name).unlink(missing_ok=True))
            raise
    return str(target), size
