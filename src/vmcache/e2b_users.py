"""E2B's two users in a vmcache guest, and how a command or a path is made theirs.

E2B's envd runs every command, and resolves every relative path, as a Unix user named by the
request: ``user`` (uid/gid 1000, home /home/user: the default) or ``root``. vmcache's guest
agent runs everything as root, so a command for ``user`` is started through util-linux's
``setpriv`` (in every Debian image; the guest's /init makes the ``user`` account), which
drops to uid/gid 1000 before it execs the command. The environment is envd's: PATH, then
HOME/USER/LOGNAME of the user, then the caller's variables (the sandbox's, then the
request's: the last value wins). A relative cwd or path is resolved against the user's
home, ``~`` expanded, as envd's ``permissions.ExpandAndResolve`` does.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence

import attrs

from vmcache.e2b_connect import Code, ConnectError

#: The guest's PATH for E2B commands (envd passes its own PATH on; this is the guest agent's).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: util-linux's setpriv in the guest image (Debian's essential set has it).
SETPRIV = "/usr/bin/setpriv"


@attrs.frozen
class E2bUser:
    """One of the accounts E2B requests may name."""

    name: str
    uid: int
    gid: int
    home: str


USERS: Mapping[str, E2bUser] = {
    "user": E2bUser("user", 1000, 1000, "/home/user"),
    "root": E2bUser("root", 0, 0, "/root"),
}
#: The user when a request names none (envd's default for the base template).
DEFAULT_USER = "user"


def lookup(user: str) -> E2bUser:
    """The account named ``user``; ConnectError(INVALID_ARGUMENT) for a name E2B's guests lack."""
    try:
        return USERS[user]
    except KeyError:
        shown = user if user.isprintable() and len(user) <= 64 else repr(user[:64])
        raise ConnectError(Code.INVALID_ARGUMENT,
                           f"invalid user: '{shown}' (this sandbox has the users 'user' and 'root')"
                           ) from None


def resolve_path(user: str, path: str | None) -> str:
    """``path`` made absolute for ``user`` as envd does: empty means the home directory, ``~``
    and ``~/x`` are in it, a relative path is joined to it; ``..`` is folded
    (INVALID_ARGUMENT for ``~other``, or a NUL byte, which no guest path may hold)."""
    account = lookup(user)
    text = path or ""
    if "\0" in text:
        raise ConnectError(Code.INVALID_ARGUMENT, "path: contains a NUL byte")
    if text.startswith("~"):
        if len(text) > 1 and text[1] != "/":
            raise ConnectError(Code.INVALID_ARGUMENT,
                               f"path: cannot expand user-specific home dir in '{text[:200]}'")
        text = account.home + text[1:]
    if not text.startswith("/"):
        text = posixpath.join(account.home, text)
    # normpath keeps a leading "//" (POSIX leaves its meaning to the system); Go's filepath.Clean,
    # which envd uses, folds it like any other run of slashes: "//tmp/x" is "/tmp/x".
    return "/" + posixpath.normpath(text).lstrip("/")


def user_env(user: str, env: Mapping[str, str] = {}) -> dict[str, str]:
    """envd's environment for a command of ``user``: PATH, HOME, USER, LOGNAME, then ``env``."""
    account = lookup(user)
    return {"PATH": GUEST_PATH, "HOME": account.home, "USER": account.name,
            "LOGNAME": account.name, **env}


def as_user(user: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None
            ) -> tuple[list[str], dict[str, str], str]:
    """argv/env/cwd to run argv in the guest as E2B user `user` ("user": uid 1000, /home/user,
    the default; "root"); ConnectError(INVALID_ARGUMENT) for any other name.

    ``env`` is what the caller wants on top of envd's own variables (the sandbox's envVars
    under the request's); ``cwd`` None or empty means the user's home, a relative one is in
    it. For ``user``, argv runs under ``setpriv`` with uid/gid 1000 and no other group, so
    that nothing it starts can regain root.
    """
    account = lookup(user)
    if not argv:
        raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd: empty")
    directory = resolve_path(user, cwd)
    command = list(argv)
    if account.uid != 0:
        command = [SETPRIV, f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups",
                   "--", *command]
    return command, user_env(user, env), directory
