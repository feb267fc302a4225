"""Small files in directories we own, read and written without following symlinks.

The run root, the state directory and each VM's run directory are ours, but a
process of another uid (or, once QEMU runs jailed, a VM's own uid) may be able to
plant a name in one of them. Every small file vmcache keeps there (VM records, the
KVM probe's verdict, a VM's identity record) therefore goes through this module:

* the directory is opened with ``O_DIRECTORY | O_NOFOLLOW`` and checked (a real
  directory, owned by us, writable by nobody else, or by a group only with the sticky bit)
  before anything is written in it,
  and every operation is relative to that descriptor, so a directory swapped for a
  symlink meanwhile is not followed;
* a file is written to a fresh temporary name (``O_CREAT | O_EXCL | O_NOFOLLOW``)
  and renamed over the final one (atomic: a reader sees the old or the new file);
* a file is read with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO planted there cannot hang
  us) and only if it is a regular file, bounded in size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

#: The largest file :func:`read_small` reads.
READ_LIMIT = 1 << 20


class UnsafePathError(OSError):
    """A path that is not what we made it: a symlink, not ours, writable by others."""


@contextlib.contextmanager
def open_dir(directory: Path, *, owner: int | None = None) -> Iterator[int]:
    """A descriptor of ``directory`` (its last component not followed), checked: a
    directory owned by ``owner`` (default: our euid) that nobody else may write to."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(error.errno, f"{directory} is not a directory (a symlink?)",
                                  str(directory)) from None
        raise
    try:
        info = os.fstat(fd)
        expected = os.geteuid() if owner is None else owner
        # A group may write to it only with the sticky bit on: a VM's run directory (group
        # the VM's uid, 1770, see vmcache.jail), where QEMU makes its sockets but cannot
        # remove or rename what we put there.
        group_may_replace = info.st_mode & stat.S_IWGRP and not info.st_mode & stat.S_ISVTX
        if info.st_uid != expected or info.st_mode & stat.S_IWOTH or group_may_replace:
            raise UnsafePathError(errno.EPERM, f"{directory} belongs to uid {info.st_uid} with mode "
                                  f"{stat.S_IMODE(info.st_mode):04o}, not to uid {expected} and "
                                  "writable by it alone (or a sticky group)", str(directory))
        yield fd
    finally:
        os.close(fd)


def write_atomic(directory: Path, name: str, data: bytes, *, mode: int = 0o600) -> None:
    """Create or replace ``directory/name`` with ``data`` (atomically, never through a symlink)."""
    with open_dir(directory) as dir_fd:
        partial = f".{name}.{secrets.token_hex(4)}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        try:
            try:
                os.fchmod(fd, mode)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=dir_fd)
            raise


def read_small(directory: Path, name: str, *, dir_owner: int | None = None,
               file_owner: int | None = None, limit: int = READ_LIMIT) -> bytes | None:
    """The content of ``directory/name``, or None if there is no such file.

    A symlink, a non-regular file, a file larger than ``limit`` or (with ``file_owner``)
    one owned by another uid or writable by others is an :class:`UnsafePathError`.
    """
    try:
        with open_dir(directory, owner=dir_owner) as dir_fd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            except FileNotFoundError:
                return None
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise UnsafePathError(errno.ELOOP, f"{directory / name} is a symlink",
                                          str(directory / name)) from None
                raise
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise UnsafePathError(errno.EINVAL, f"{directory / name} is not a regular file",
                                          str(directory / name))
                if file_owner is not None and (info.st_uid != file_owner or info.st_mode & 0o022):
                    raise UnsafePathError(errno.EPERM, f"{directory / name} belongs to uid "
                                          f"{info.st_uid}, not {file_owner}", str(directory / name))
                if info.st_size > limit:
                    raise UnsafePathError(errno.EFBIG, f"{directory / name} is too large",
                                          str(directory / name))
                return os.read(fd, limit + 1)[:limit]
            finally:
                os.close(fd)
    except FileNotFoundError:
        return None


def remove(directory: Path, name: str) -> None:
    """Remove ``directory/name`` if it is there (a symlink is removed, not followed)."""
    with contextlib.suppress(FileNotFoundError), open_dir(directory) as dir_fd:
        os.unlink(name, dir_fd=dir_fd)
