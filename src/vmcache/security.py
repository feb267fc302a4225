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

import attrs

from .errors import ConfigError

_UCRED = struct.Struct("3i")


@attrs.frozen
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
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
    """Admits root, the daemon's uid, and members of one optional group."""

    def __init__(self, group_gid: int | None) -> None:
        self.own_uid = os.geteuid()
        self.group_gid = group_gid

    def _in_group(self, credentials: PeerCredentials) -> bool:
        if self.group_gid is None:
            return False
        if credentials.gid == self.group_gid:
            return True
        try:
            user = pwd.getpwuid(credentials.uid).pw_name
            return user in grp.getgrgid(self.group_gid).gr_mem
        except KeyError:
            return False

    def check(self, sock: socket.socket) -> str | None:
        """None to admit the peer, or why it is refused."""
        try:
            credentials = peer_credentials(sock)
        except OSError as error:
            return f"cannot read the peer's credentials: {error.strerror}"
        if credentials.uid in (0, self.own_uid) or self._in_group(credentials):
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
