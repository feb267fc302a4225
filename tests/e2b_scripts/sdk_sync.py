# The SDK lives in its own venv, never in the one mypy runs in: its names are Any here.
# mypy: disable-error-code="import-not-found"
"""The synchronous ``e2b.Sandbox`` end to end, as a user's program would use it: create,
commands (output, exit codes, envs, cwd, users, background + kill, stdin, reconnect), a PTY,
files (write/read/list/exists/make_dir/rename/remove/get_info, 20 MB byte-exact, watch),
the control plane (get_info, list, set_timeout, connect, kill). Prints one JSON line."""

from __future__ import annotations

import hashlib
import io
import random
import sys
import time

from e2b import CommandExitException, FilesystemEventType, PtySize, Sandbox, SandboxQuery
from sdk_observe import Observed, raised

BIG = 20 * 1024 * 1024
obs = Observed()


def summary(result: object) -> dict[str, object]:
    return {
        "stdout": getattr(result, "stdout", None),
        "stderr": getattr(result, "stderr", None),
        "exit_code": getattr(result, "exit_code", None),
        "error": getattr(result, "error", None),
    }


def expect_exit(call: object) -> dict[str, object]:
    try:
        result = call()  # type: ignore[operator]
    except CommandExitException as error:
        return {
            "raised": "CommandExitException",
            "exit_code": error.exit_code,
            "stdout": error.stdout,
            "stderr": error.stderr,
        }
    return {"returned": summary(result)}


sbx = obs.step(
    "create",
    lambda: Sandbox.create(
        envs={"SANDBOX_WIDE": "from-create"}, metadata={"suite": "sync-core"}, timeout=300
    ),
)
if sbx is None:
    obs.done()
    sys.exit(0)
obs.seen["create"] = {
    "sandbox_id": sbx.sandbox_id,
    "envd_version": str(sbx._envd_version),
    "has_access_token": bool(sbx._envd_access_token),
}
run = sbx.commands.run

# --- commands ---------------------------------------------------------------------------------
obs.step("run", lambda: summary(run("echo hello; echo oops >&2")))
obs.step("run_exit_nonzero", lambda: expect_exit(lambda: run("echo partial; echo bad >&2; exit 3")))
obs.step("run_envs", lambda: run("echo $FOO,$SANDBOX_WIDE", envs={"FOO": "bar"}).stdout)
obs.step("run_cwd", lambda: run("pwd", cwd="/tmp").stdout)
obs.step("run_default_cwd", lambda: run("pwd").stdout)
obs.step("run_user_default", lambda: run("whoami; echo $HOME; id -u").stdout)
obs.step("run_user_root", lambda: run("whoami; echo $HOME; id -u", user="root").stdout)
obs.step("run_tools", lambda: run("command -v bash python3 >/dev/null && python3 -c 'print(6*7)'").stdout)
chunks: list[str] = []
obs.step(
    "run_on_stdout",
    lambda: (run("for i in 1 2 3; do echo line$i; done", on_stdout=chunks.append).stdout, "".join(chunks)),
)
obs.step("run_timeout", lambda: summary(run("sleep 30", timeout=1)))


def background() -> dict[str, object]:
    handle = run("echo bg-start; sleep 120", background=True)
    for stdout, _, _ in handle:  # its first output: it runs (the rest is read by wait below)
        if stdout is not None:
            break
    listed = [process.pid for process in sbx.commands.list()]
    killed = sbx.commands.kill(handle.pid)
    try:
        waited: object = summary(handle.wait())
    except CommandExitException as error:
        waited = {"raised": "CommandExitException", "exit_code": error.exit_code, "stdout": error.stdout}
    after = [process.pid for process in sbx.commands.list()]
    return {
        "pid": handle.pid,
        "listed": handle.pid in listed,
        "killed": killed,
        "waited": waited,
        "listed_after_kill": handle.pid in after,
        "kill_again": sbx.commands.kill(handle.pid),
    }


obs.step("background_kill", background)


def stdin() -> dict[str, object]:
    handle = run("cat; echo done-$?", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "line1\n")
    handle.send_stdin(b"line2\n")
    sbx.commands.close_stdin(handle.pid)
    return summary(handle.wait())


obs.step("stdin", stdin)


def reconnect() -> dict[str, object]:
    handle = run("for i in 1 2 3 4; do echo tick$i; sleep 0.3; done", background=True)
    handle.disconnect()
    again = sbx.commands.connect(handle.pid)
    return {"same_pid": again.pid == handle.pid, **summary(again.wait())}


obs.step("reconnect", reconnect)


def pty() -> dict[str, object]:
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(handle.pid, b"stty size; echo pty-$((6*7)); tty\n")
    output = bytearray()
    resized = False

    def on_pty(data: bytes) -> None:
        nonlocal resized
        output.extend(data)
        if not resized and b"pty-42" in output:
            resized = True
            sbx.pty.resize(handle.pid, PtySize(rows=30, cols=100))
            sbx.pty.send_stdin(handle.pid, b"stty size; exit 7\n")

    waited = expect_exit(lambda: handle.wait(on_pty=on_pty))
    text = output.decode(errors="replace")
    return {
        "first_size": "24 80" in text,
        "answer": "pty-42" in text,
        "resized": "30 100" in text,
        "a_tty": "/dev/pts/" in text,
        "exit_code": waited.get("exit_code"),
    }


obs.step("pty", pty)

# --- files ------------------------------------------------------------------------------------
files = sbx.files
obs.step("write", lambda: files.write("/home/user/notes/a.txt", "hello file").path)
obs.step("read", lambda: files.read("/home/user/notes/a.txt"))
obs.step("exists", lambda: [files.exists("/home/user/notes/a.txt"), files.exists("/home/user/nope")])
obs.step(
    "file_info",
    lambda: (
        lambda i: {
            "name": i.name,
            "type": str(i.type.value if i.type else None),
            "size": i.size,
            "owner": i.owner,
            "path": i.path,
        }
    )(files.get_info("/home/user/notes/a.txt")),
)
obs.step("make_dir", lambda: [files.make_dir("/home/user/d1/d2"), files.make_dir("/home/user/d1/d2")])
obs.step(
    "list",
    lambda: sorted((e.name, str(e.type.value if e.type else None)) for e in files.list("/home/user/notes")),
)
obs.step("list_depth", lambda: sorted(e.path for e in files.list("/home/user/d1", depth=2)))
obs.step("rename", lambda: files.rename("/home/user/notes/a.txt", "/home/user/notes/b.txt").path)
obs.step("read_renamed", lambda: files.read("/home/user/notes/b.txt"))
obs.step(
    "remove", lambda: (files.remove("/home/user/notes/b.txt"), files.exists("/home/user/notes/b.txt"))[1]
)
obs.step("read_missing", lambda: files.read("/home/user/notes/b.txt"))
obs.step(
    "write_stream",
    lambda: (
        files.write("/tmp/io.bin", io.BytesIO(b"\x00\x01streamed\xff")),
        files.read("/tmp/io.bin", format="bytes").hex(),
    )[1],
)
obs.step(
    "write_files",
    lambda: [
        w.path
        for w in files.write_files(
            [{"path": "/home/user/m/one.txt", "data": "1"}, {"path": "/home/user/m/two.txt", "data": b"2"}]
        )
    ],
)
obs.step(
    "write_as_root",
    lambda: (files.write("/root/r.txt", "r", user="root"), files.get_info("/root/r.txt", user="root").owner)[
        1
    ],
)
obs.step("write_root_as_user", lambda: files.write("/root/denied.txt", "x").path)
obs.step("owner_root_as_user", lambda: files.get_info("/root/denied.txt", user="root").owner)
obs.step("read_root_as_user", lambda: files.read("/root/.profile"))
obs.step("list_root_as_user", lambda: [e.name for e in files.list("/root")])


def big() -> dict[str, object]:
    data = random.Random(19).randbytes(BIG)
    started = time.perf_counter()
    files.write("/home/user/big.bin", data)
    uploaded = time.perf_counter() - started
    back = files.read("/home/user/big.bin", format="bytes")
    read = time.perf_counter() - started - uploaded
    guest = run("sha256sum /home/user/big.bin").stdout.split()[0]
    return {
        "same": bytes(back) == data,
        "size": len(back),
        "guest_sha256_matches": guest == hashlib.sha256(data).hexdigest(),
        "upload_s": round(uploaded, 3),
        "read_s": round(read, 3),
    }


obs.step("upload_20mb", big)


def watch() -> dict[str, object]:
    files.make_dir("/home/user/watched")
    watcher = files.watch_dir("/home/user/watched")
    files.write("/home/user/watched/new.txt", "x")
    run("cd /home/user/watched && echo more >> new.txt && mv new.txt moved.txt && rm moved.txt")
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen += [(event.name, event.type.name) for event in watcher.get_new_events()]
        kinds = {kind for _, kind in seen}
        if {FilesystemEventType.CREATE.name, FilesystemEventType.REMOVE.name} <= kinds:
            break
        time.sleep(0.1)
    watcher.stop()
    try:
        watcher.get_new_events()
        after_stop: object = "returned"
    except Exception as error:
        after_stop = raised(error)["raised"]
    return {"events": seen, "after_stop": after_stop}


obs.step("watch_dir", watch)

# --- control plane ----------------------------------------------------------------------------
obs.step("is_running", lambda: sbx.is_running())


def info() -> dict[str, object]:
    got = sbx.get_info()
    return {
        "sandbox_id": got.sandbox_id,
        "template_id": got.template_id,
        "metadata": got.metadata,
        "state": str(got.state.value if hasattr(got.state, "value") else got.state),
        "lifetime_s": round((got.end_at - got.started_at).total_seconds()),
        "envd_version": got.envd_version,
    }


obs.step("get_info", info)


def listed() -> dict[str, object]:
    everything = [s.sandbox_id for s in Sandbox.list().next_items()]
    mine = [
        s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "sync-core"})).next_items()
    ]
    other = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "none"})).next_items()]
    return {"in_all": sbx.sandbox_id in everything, "filtered": mine == [sbx.sandbox_id], "other": other}


obs.step("sandbox_list", listed)


def set_timeout() -> int:
    sbx.set_timeout(1200)
    got = sbx.get_info()
    lifetime: int = round((got.end_at - got.started_at).total_seconds())
    return lifetime


obs.step("set_timeout", set_timeout)
obs.step("connect", lambda: Sandbox.connect(sbx.sandbox_id).commands.run("echo via-connect").stdout)
obs.step("kill", lambda: sbx.kill())
obs.step("is_running_after_kill", lambda: sbx.is_running())
obs.step("kill_again", lambda: Sandbox.kill(sbx.sandbox_id))
obs.step("run_after_kill", lambda: summary(run("echo ghost")))
obs.step("get_info_after_kill", lambda: Sandbox.get_info(sbx.sandbox_id).sandbox_id)
obs.done()
