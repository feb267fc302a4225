"""systemd's notify protocol (``Type=notify``), spoken without libsystemd.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract
name starting with ``@``); the service sends ``KEY=VALUE`` lines to it:
``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``,
``STOPPING=1`` when it shuts down. With no ``$NOTIFY_SOCKET`` every call is a
no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vmcache.notify")


class Notifier:
    """Sends notify messages to ``$NOTIFY_SOCKET`` (if set); never raises."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    def send(self, **fields: str) -> None:
        """Send ``KEY=VALUE`` lines, e.g. ``send(READY="1", STATUS="2/2 VMs ready")``."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as error:
            log.debug("cannot notify systemd: %s", error)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
