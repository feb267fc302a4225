"""The daemon's listening Unix socket: created safely, a stale one taken over, a live one refused."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from ..errors import ConfigError, EndpointInUseError
from ..security import check_socket_directory

log = logging.getLogger("vmcache.rpc")


def bind_unix_socket(path: Path, group_gid: int | None = None) -> socket.socket:
    """A listening socket at ``path``, mode 0600, replacing a stale socket file.

    With ``group_gid`` the socket is mode 0660 and belongs to that group, and its
    directory is 0710 (that group may traverse it, not list it).

    A socket file with a live server behind it is left alone: raises
    :class:`EndpointInUseError`.
    """
    check_socket_directory(path.parent)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the socket's directory {path.parent}: {error.strerror}") from None
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"endpoint {path} exists and is not a socket; remove it or choose another")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s (no server behind it)", path)
            path.unlink(missing_ok=True)
        except OSError as error:
            raise EndpointInUseError(f"cannot check endpoint {path}: {error.strerror}") from None
        else:
            raise EndpointInUseError(f"another vmcache daemon is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        if group_gid is not None:
            os.chown(path, -1, group_gid)
            os.chmod(path, 0o660)
            # The group must be able to reach the socket: let it traverse (not list) the directory.
            os.chown(path.parent, -1, group_gid)
            os.chmod(path.parent, 0o710)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {error.strerror}") from None
    return sock
