"""E2B's filesystem calls, guest side: one long-lived helper per sandbox, run by the host
through the agent as root (``python3 -I -S e2b_fs.py serve``), as envd itself runs as root.

One JSON request a line on stdin (``{"id": N, "op": "stat", ...}``), one JSON answer a line
on stdout (``{"id": N, "ok": {...}}`` or ``{"id": N, "error": {"code": "not_found",
"message": "..."}}``, codes as envd's Connect errors), and watch events as they happen
(``{"watch": W, "events": [...]}``; ``{"watch": W, "error": {...}}`` ends a watch). Paths
come already absolute (the host resolves them against the user's home). Entries are envd's
EntryInfo in protobuf's JSON form. Watching uses inotify through ctypes, recursive when
asked (new subdirectories are added as they appear), and maps its events as envd's
fsnotify does. Stdlib only, Python 3.9 or later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import grp
import json
import os
import pwd
import select
import stat
import struct
import sys
import time
from typing import Any

#: Longest request line accepted.
MAX_LINE = 1024 * 1024
#: Most entries one ListDir answers (a larger tree: list it with a smaller depth).
MAX_ENTRIES = 100_000
#: Longest answer line (the host's MAX_HELPER_LINE, the same bound): a ListDir answer longer
#: than this is ``resource_exhausted`` instead (about 50,000 entries of ordinary names).
MAX_ANSWER = 16 * 1024 * 1024
#: Most watch events in one line (a burst of them goes out in several).
EVENTS_PER_LINE = 256
#: Most watches at once, and directories one recursive watch may cover.
MAX_WATCHES = 64
MAX_WATCHED_DIRS = 8192

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF)
EVENT_HEADER = struct.Struct("iIII")


class Failure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def os_failure(error: OSError, what: str) -> Failure:
    code = {errno.ENOENT: "not_found", errno.EEXIST: "already_exists", errno.EACCES: "permission_denied",
            errno.EPERM: "permission_denied", errno.ENOTDIR: "invalid_argument",
            errno.EISDIR: "invalid_argument", errno.ENOSPC: "resource_exhausted",
            }.get(error.errno or 0, "internal")
    return Failure(code, f"{what}: {error.strerror or error}")


# --- EntryInfo -------------------------------------------------------------------------------

def go_mode_string(mode: int) -> str:
    """Go's os.FileMode.String() of a stat mode, as envd's ``permissions``: ``drwxr-xr-x``."""
    kind = stat.S_IFMT(mode)
    flags = ""
    if kind == stat.S_IFDIR:
        flags += "d"
    if kind == stat.S_IFLNK:
        flags += "L"
    if kind in (stat.S_IFBLK, stat.S_IFCHR):
        flags += "D"
    if kind == stat.S_IFIFO:
        flags += "p"
    if kind == stat.S_IFSOCK:
        flags += "S"
    if mode & stat.S_ISUID:
        flags += "u"
    if mode & stat.S_ISGID:
        flags += "g"
    if kind == stat.S_IFCHR:
        flags += "c"
    if mode & stat.S_ISVTX:
        flags += "t"
    rwx = "".join(char if mode & (1 << (8 - index)) else "-" for index, char in enumerate("rwxrwxrwx"))
    return (flags or "-") + rwx


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "FILE_TYPE_FILE"
    if stat.S_ISDIR(mode):
        return "FILE_TYPE_DIRECTORY"
    if stat.S_ISLNK(mode):
        return "FILE_TYPE_SYMLINK"
    return "FILE_TYPE_UNSPECIFIED"


def timestamp(ns: int) -> str:
    """protobuf's JSON Timestamp (RFC 3339, UTC, 0/3/6/9 fractional digits)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        digits = 3 if nanos % 1_000_000 == 0 else 6 if nanos % 1000 == 0 else 9
        text += "." + f"{nanos:09d}"[:digits]
    return text + "Z"


_names: dict[tuple[str, int], str] = {}


def _name(kind: str, number: int) -> str:
    key = (kind, number)
    if key not in _names:
        try:
            _names[key] = pwd.getpwuid(number).pw_name if kind == "u" else grp.getgrgid(number).gr_name
        except (KeyError, OSError):
            _names[key] = str(number)
        if len(_names) > 4096:
            _names.clear()
    return _names[key]


def text(name: str) -> str:
    """A file name as JSON can carry it: bytes that are not UTF-8 become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def entry_info(path: str) -> dict[str, object]:
    """envd's EntryInfo of ``path`` (not followed; a symlink's type and mode are its target's)."""
    try:
        info = os.lstat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise Failure("not_found", f"file not found: {path}") from None
        raise os_failure(error, f"error getting file info of {path}") from None
    mode = info.st_mode
    kind = file_type(mode)
    perm = stat.S_IMODE(mode) & 0o777
    entry: dict[str, object] = {}
    if stat.S_ISLNK(mode):
        try:
            target = os.path.realpath(path, strict=True)
        except (OSError, RuntimeError):
            target = path
        entry["symlinkTarget"] = text(target)
        try:
            target_info = os.stat(target)
            kind, perm = file_type(target_info.st_mode), stat.S_IMODE(target_info.st_mode) & 0o777
        except OSError:
            kind, perm = "FILE_TYPE_UNSPECIFIED", 0
    entry.update({
        "name": text(os.path.basename(path.rstrip("/")) or "/"),
        "type": kind,
        "path": text(path),
        "size": str(info.st_size),
        "mode": perm,
        "permissions": go_mode_string(mode),
        "owner": _name("u", info.st_uid),
        "group": _name("g", info.st_gid),
        "modifiedTime": timestamp(info.st_mtime_ns),
    })
    return entry


def ensure_dirs(path: str, uid: int, gid: int) -> None:
    """envd's EnsureDirs: make each missing directory of ``path`` (0755, owned by uid/gid)."""
    parts = [part for part in path.split("/") if part]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            info = os.stat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:
                pass
            except OSError as error:
                raise os_failure(error, f"failed to create directory {current}") from None
            os.chown(current, uid, gid)
            continue
        except OSError as error:
            raise os_failure(error, f"failed to stat directory {current}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise Failure("internal", f"path is a file: {current}")


# --- Operations --------------------------------------------------------------------------------

def op_stat(request: dict[str, Any]) -> dict[str, Any]:
    return {"entry": entry_info(request["path"])}


def op_list(request: dict[str, Any]) -> dict[str, Any]:
    requested = request["path"]
    depth = int(request.get("depth") or 1)
    try:
        resolved = os.path.realpath(requested, strict=True)
    except FileNotFoundError:
        raise Failure("not_found", f"path not found: {requested}") from None
    except (OSError, RuntimeError) as error:
        if (isinstance(error, OSError) and error.errno == errno.ELOOP) or isinstance(error, RuntimeError):
            raise Failure("failed_precondition",
                          f"cyclic symlink or chain >255 links at {requested!r}") from None
        raise os_failure(error, f"error resolving symlink {requested}") from None
    try:
        if not stat.S_ISDIR(os.stat(resolved).st_mode):
            raise Failure("invalid_argument", f"path is not a directory: {resolved}")
    except OSError as error:
        raise os_failure(error, f"directory not found: {resolved}") from None
    entries: list[dict[str, object]] = []

    def walk(directory: str, relative: str, level: int) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            if level == 1:
                raise os_failure(error, f"error reading directory {directory}") from None
            return
        for name in names:
            full = directory.rstrip("/") + "/" + name
            rel = relative + "/" + name if relative else name
            try:
                entry = entry_info(full)
            except Failure as failure:
                if failure.code == "not_found":
                    continue
                raise
            entry["path"] = text(requested.rstrip("/") + "/" + rel if requested != "/" else "/" + rel)
            entries.append(entry)
            if len(entries) > MAX_ENTRIES:
                raise Failure("resource_exhausted", f"more than {MAX_ENTRIES} entries under {requested}: "
                                                    "list it with a smaller depth")
            if level < depth:
                try:
                    is_dir = stat.S_ISDIR(os.lstat(full).st_mode)
                except OSError:
                    is_dir = False
                if is_dir:
                    walk(full, rel, level + 1)

    walk(resolved, "", 1)
    return {"entries": entries}


def op_mkdir(request: dict[str, Any]) -> dict[str, Any]:
    path = request["path"]
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise os_failure(error, "error getting file info") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise Failure("already_exists", f"directory already exists: {path}")
        raise Failure("invalid_argument", f"path already exists but it is not a directory: {path}")
    ensure_dirs(path, int(request["uid"]), int(request["gid"]))
    return {"entry": entry_info(path)}


def op_move(request: dict[str, Any]) -> dict[str, Any]:
    source, destination = request["source"], request["destination"]
    ensure_dirs(os.path.dirname(destination), int(request["uid"]), int(request["gid"]))
    try:
        os.rename(source, destination)
    except FileNotFoundError as error:
        raise Failure("not_found", f"source file not found: {error.strerror}: {source}") from None
    except OSError as error:
        raise os_failure(error, "error renaming") from None
    return {"entry": entry_info(destination)}


def remove_all(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        for name in os.listdir(path):
            remove_all(path.rstrip("/") + "/" + name)
        os.rmdir(path)
    else:
        os.unlink(path)


def op_remove(request: dict[str, Any]) -> dict[str, Any]:
    try:
        remove_all(request["path"])
    except OSError as error:
        raise Failure("internal", f"error removing file or directory: {error.strerror or error}") from None
    return {}


def op_prepare_upload(request: dict[str, Any]) -> dict[str, Any]:
    """Before an upload: its directories made (owned by the user), and not a directory."""
    path = request["path"]
    ensure_dirs(os.path.dirname(path), int(request["uid"]), int(request["gid"]))
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise Failure("invalid_argument", f"path is a directory: {path}")
    except FileNotFoundError:
        pass
    except OSError as error:
        raise os_failure(error, "error getting file info") from None
    return {}


def op_chown(request: dict[str, Any]) -> dict[str, Any]:
    try:
        os.chown(request["path"], int(request["uid"]), int(request["gid"]))
    except OSError as error:
        raise os_failure(error, "error changing file ownership") from None
    return {}


# --- Watching ----------------------------------------------------------------------------------

class Inotify:
    """One inotify instance for every watch of the helper."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            number = ctypes.get_errno()
            raise os_failure(OSError(number, os.strerror(number)), "error creating watcher")

    def add(self, path: str) -> int:
        wd = self._add(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            number = ctypes.get_errno()
            raise os_failure(OSError(number, os.strerror(number)), f"error adding path {path} to watcher")
        return int(wd)

    def remove(self, wd: int) -> None:
        self._rm(self.fd, wd)

    def read(self) -> list[tuple[int, int, str]]:
        try:
            data = os.read(self.fd, 256 * 1024)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset + EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
            offset += EVENT_HEADER.size
            name = data[offset:offset + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
            offset += length
            events.append((wd, mask, name))
        return events


class Watch:
    def __init__(self, ident: int, root: str, recursive: bool, include_entry: bool) -> None:
        self.id, self.root, self.recursive, self.include_entry = ident, root, recursive, include_entry
        self.dirs: dict[int, str] = {}  # wd -> directory


class Watches:
    def __init__(self) -> None:
        self.inotify: Inotify | None = None
        self.watches: dict[int, Watch] = {}
        self.by_wd: dict[int, list[Watch]] = {}

    def _add_dir(self, watch: Watch, directory: str) -> None:
        assert self.inotify is not None
        if len(watch.dirs) >= MAX_WATCHED_DIRS:
            raise Failure("resource_exhausted",
                          f"more than {MAX_WATCHED_DIRS} directories under {watch.root}")
        wd = self.inotify.add(directory)
        watch.dirs[wd] = directory
        holders = self.by_wd.setdefault(wd, [])
        if watch not in holders:
            holders.append(watch)
        if watch.recursive:
            try:
                names = os.listdir(directory)
            except OSError:
                return
            for name in names:
                full = directory.rstrip("/") + "/" + name
                if os.path.isdir(full) and not os.path.islink(full):
                    self._add_dir(watch, full)

    def add(self, request: dict[str, Any]) -> dict[str, Any]:
        ident, root = int(request["watch"]), request["path"]
        try:
            if not stat.S_ISDIR(os.stat(root).st_mode):
                raise Failure("invalid_argument", f"path {root} not a directory")
        except FileNotFoundError:
            raise Failure("not_found", f"path {root} not found") from None
        except OSError as error:
            raise os_failure(error, f"error statting path {root}") from None
        if len(self.watches) >= MAX_WATCHES:
            raise Failure("resource_exhausted", f"more than {MAX_WATCHES} watches at once")
        if self.inotify is None:
            self.inotify = Inotify()
        watch = Watch(ident, root, bool(request.get("recursive")), bool(request.get("include_entry")))
        self.watches[ident] = watch
        try:
            self._add_dir(watch, root)
        except Failure:
            self.remove({"watch": ident})
            raise
        return {}

    def remove(self, request: dict[str, Any]) -> dict[str, Any]:
        watch = self.watches.pop(int(request["watch"]), None)
        if watch is not None and self.inotify is not None:
            for wd in watch.dirs:
                holders = self.by_wd.get(wd, [])
                if watch in holders:
                    holders.remove(watch)
                if not holders:
                    self.by_wd.pop(wd, None)
                    self.inotify.remove(wd)
        return {}

    def drain(self) -> list[dict[str, Any]]:
        """The events inotify has, as ``{"watch": W, "events": [...]}`` messages."""
        assert self.inotify is not None
        out: dict[int, list[dict[str, Any]]] = {}
        errors: list[dict[str, Any]] = []
        for wd, mask, name in self.inotify.read():
            if mask & IN_Q_OVERFLOW:
                for watch in list(self.watches.values()):
                    errors.append({"watch": watch.id, "error": {
                        "code": "data_loss",
                        "message": "watcher error: the kernel's inotify queue overflowed"}})
                    self.remove({"watch": watch.id})
                continue
            for watch in list(self.by_wd.get(wd, [])):
                directory = watch.dirs.get(wd)
                if directory is None:
                    continue
                if mask & IN_IGNORED:
                    watch.dirs.pop(wd, None)
                    continue
                full = directory.rstrip("/") + "/" + name if name else directory
                if watch.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    try:
                        self._add_dir(watch, full)
                    except Failure:
                        pass
                rel = os.path.relpath(full, watch.root)
                for flag, kind in ((IN_CREATE | IN_MOVED_TO, "EVENT_TYPE_CREATE"),
                                   (IN_MOVED_FROM | IN_MOVE_SELF, "EVENT_TYPE_RENAME"),
                                   (IN_ATTRIB, "EVENT_TYPE_CHMOD"),
                                   (IN_MODIFY, "EVENT_TYPE_WRITE"),
                                   (IN_DELETE | IN_DELETE_SELF, "EVENT_TYPE_REMOVE")):
                    if mask & flag:
                        event: dict[str, object] = {"name": text(rel), "type": kind}
                        if watch.include_entry and kind in ("EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE",
                                                            "EVENT_TYPE_CHMOD"):
                            try:
                                event["entry"] = entry_info(full)
                            except Failure:
                                pass
                        out.setdefault(watch.id, []).append(event)
        for wd in [wd for wd, holders in self.by_wd.items() if not any(wd in w.dirs for w in holders)]:
            self.by_wd.pop(wd, None)
        return errors + [{"watch": ident, "events": events} for ident, events in out.items()]


# --- The loop ----------------------------------------------------------------------------------

OPS = {"stat": op_stat, "list": op_list, "mkdir": op_mkdir, "move": op_move, "remove": op_remove,
       "prepare_upload": op_prepare_upload, "chown": op_chown}


def answer(request: object, watches: Watches) -> dict[str, Any]:
    ident = request.get("id") if isinstance(request, dict) else None
    try:
        if not isinstance(request, dict) or not isinstance(ident, int):
            raise Failure("invalid_argument", "a request is an object with an integer id")
        op = request.get("op")
        if op == "watch":
            result = watches.add(request)
        elif op == "unwatch":
            result = watches.remove(request)
        elif op == "ping":
            result = {}
        elif op in OPS:
            result = OPS[op](request)
        else:
            raise Failure("unimplemented", f"unknown operation {str(op)[:64]!r}")
        return {"id": ident, "ok": result}
    except Failure as failure:
        return {"id": ident, "error": {"code": failure.code, "message": failure.message}}
    except (KeyError, TypeError, ValueError) as error:
        return {"id": ident, "error": {"code": "invalid_argument",
                                       "message": f"bad request: {error!r}"[:500]}}
    except RecursionError:
        return {"id": ident, "error": {"code": "resource_exhausted",
                                       "message": "the tree is too deep: list it with a smaller depth"}}
    except Exception as error:  # the helper serves the whole sandbox: it must not die of one call
        return {"id": ident, "error": {"code": "internal", "message": text(f"{error}"[:500])}}


def write(message: dict[str, Any]) -> None:
    """One message as a line, never longer than MAX_ANSWER: watch events go in lines of
    EVENTS_PER_LINE, an answer too long becomes its ``resource_exhausted`` error."""
    events = message.get("events")
    if isinstance(events, list) and len(events) > EVENTS_PER_LINE:
        for start in range(0, len(events), EVENTS_PER_LINE):
            write({**message, "events": events[start:start + EVENTS_PER_LINE]})
        return
    line = json.dumps(message, separators=(",", ":")).encode()
    if len(line) > MAX_ANSWER:
        why = f"the answer is over {MAX_ANSWER // (1024 * 1024)} MiB: list it with a smaller depth"
        line = json.dumps({"id": message.get("id"), "error": {"code": "resource_exhausted", "message": why}},
                          separators=(",", ":")).encode()
    sys.stdout.buffer.write(line + b"\n")


def serve() -> int:
    watches = Watches()
    pending = b""
    while True:
        fds = [0] + ([watches.inotify.fd] if watches.inotify is not None else [])
        ready, _, _ = select.select(fds, [], [])
        if watches.inotify is not None and watches.inotify.fd in ready:
            for message in watches.drain():
                write(message)
        if 0 in ready:
            data = os.read(0, 256 * 1024)
            if not data:
                return 0
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    try:
                        request = json.loads(line)
                    except ValueError:
                        request = None
                    write(answer(request, watches))
            if len(pending) > MAX_LINE:
                write({"id": None, "error": {"code": "invalid_argument", "message": "request line too long"}})
                pending = b""
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.stderr.write("usage: e2b_fs.py serve\n")
        sys.exit(2)
    sys.exit(serve())
