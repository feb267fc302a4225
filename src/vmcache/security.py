"""Who may talk to the daemon, and checks on the places it keeps its socket.

The socket is mode 0600 (0660 with ``socket_group``) and owned by the daemon's
user. On top of that, each connection's peer credentials (``SO_PEERCRED``, set
by the kernel, not forgeable by the client) are checked: root and the daemon's
own uid are let in, plus members of ``socket_group`` if the config names one.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import socket
import struct
from pathlib import Path
from typing import Protocol

import attrs
import trio

from .errors import ConfigError

_UCRED = struct.Struct("3i")
#: How long a group-membership answer is kept, and how long its lookup may take.
MEMBERSHIP_TTL = 60.0
NSS_TIMEOUT = 5.0


@attrs.frozen
class PeerCredentials:
    pid: int
    uid: int
    gid: int


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def peer_credentials(sock: _HasSockopt) -> PeerCredentials:
    """The pid, uid and gid of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


def resolve_group(name: str) -> int | None:
    """The gid of ``socket_group`` ("" = none); a ConfigError if there is no such group."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"factory.socket_group: no group named {name!r} on this host") from None


class PeerPolicy:
    """Admits root, the daemon's uid, and members of one optional group.

    Group membership beyond the peer's primary gid needs the user and group
    databases (NSS: maybe LDAP, maybe slow): that lookup runs in a worker thread,
    bounded in time, and its answer is kept for :data:`MEMBERSHIP_TTL` seconds.
    """

    def __init__(self, group_gid: int | None) -> None:
        self.own_uid = os.geteuid()
        self.group_gid = group_gid
        self._members: dict[int, tuple[bool, float]] = {}

    def _lookup_member(self, uid: int) -> bool:
        assert self.group_gid is not None
        try:
            user = pwd.getpwuid(uid).pw_name
            return user in grp.getgrgid(self.group_gid).gr_mem
        except KeyError:
            return False

    async def _in_group(self, credentials: PeerCredentials) -> bool:
        if self.group_gid is None:
            return False
        if credentials.gid == self.group_gid:
            return True
        known = self._members.get(credentials.uid)
        if known is not None and known[1] > trio.current_time():
            return known[0]
        member = False
        with trio.move_on_after(NSS_TIMEOUT):
            member = await trio.to_thread.run_sync(self._lookup_member, credentials.uid,
                                                   abandon_on_cancel=True)
        if len(self._members) > 4096:
            self._members.clear()
        self._members[credentials.uid] = (member, trio.current_time() + MEMBERSHIP_TTL)
        return member

    async def check(self, credentials: PeerCredentials) -> str | None:
        """None to admit the peer, or why it is refused."""
        if credentials.uid in (0, self.own_uid) or await self._in_group(credentials):
            return None
        allowed = f"root, uid {self.own_uid}"
        if self.group_gid is not None:
            allowed += f", group {self.group_gid}"
        return (f"peer pid {credentials.pid} (uid {credentials.uid}, gid {credentials.gid}) "
                f"is not allowed; allowed: {allowed}")


def check_socket_directory(directory: Path) -> None:
    """Refuse a socket directory that belongs to someone else (they could swap our socket)."""
    try:
        owner = directory.stat().st_uid
    except FileNotFoundError:
        return  # created by us, with our uid
    except OSError as error:
        raise ConfigError(f"cannot check the socket's directory {directory}: {error.strerror}") from None
    if owner not in (0, os.geteuid()):
        raise ConfigError(
            f"the socket's directory {directory} belongs to uid {owner}, not to us or root: "
            "choose an endpoint in a directory you own"
        )


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit (many clients, many VMs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
