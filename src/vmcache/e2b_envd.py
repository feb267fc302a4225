"""envd, E2B's in-sandbox daemon, served on the host: its Connect services and ``/files``.

The entry points the listener wires (port 49983 of a sandbox): :func:`register_envd` puts
``process.Process/*`` (e2b_process.py) and ``filesystem.Filesystem/*`` (e2b_files.py) on a
:class:`~vmcache.e2b_connect.ConnectRouter`; :func:`handle_files` answers ``GET``/``POST
/files``. ``process.Process/StreamInput`` is a client stream (the router decodes its messages
as the request body arrives, which HTTP/1.1 allows: the answer comes after the body ends).
"""

from __future__ import annotations

from vmcache import e2b_files, e2b_process
from vmcache.e2b_connect import ConnectRouter
from vmcache.e2b_files import handle_files

__all__ = ["handle_files", "register_envd"]


def register_envd(router: ConnectRouter) -> None:
    """Every envd procedure the SDKs call, on ``router``."""
    process = "/process.Process/"
    router.server_stream(process + "Start", e2b_process.start)
    router.server_stream(process + "Connect", e2b_process.connect)
    router.unary(process + "List", e2b_process.list_processes)
    router.unary(process + "SendInput", e2b_process.send_input)
    router.unary(process + "SendSignal", e2b_process.send_signal)
    router.unary(process + "CloseStdin", e2b_process.close_stdin)
    router.unary(process + "Update", e2b_process.update)
    router.client_stream(process + "StreamInput", e2b_process.stream_input)
    files = "/filesystem.Filesystem/"
    router.unary(files + "Stat", e2b_files.stat)
    router.unary(files + "ListDir", e2b_files.list_dir)
    router.unary(files + "MakeDir", e2b_files.make_dir)
    router.unary(files + "Move", e2b_files.move)
    router.unary(files + "Remove", e2b_files.remove)
    router.server_stream(files + "WatchDir", e2b_files.watch_dir)
    router.unary(files + "CreateWatcher", e2b_files.create_watcher)
    router.unary(files + "GetWatcherEvents", e2b_files.get_watcher_events)
    router.unary(files + "RemoveWatcher", e2b_files.remove_watcher)
