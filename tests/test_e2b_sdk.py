"""E2B's released Python SDKs (``e2b`` and ``e2b-code-interpreter``, unmodified, from PyPI, in
a venv of their own) against a real ``vmcache serve`` and real QEMU guests: what a user of
the SDK sees. One daemon serves the module; each SDK script runs once (one Python start for
many cases) and the tests below assert on what it saw. Fails without the ``[e2b]`` listener,
its envd and code-interpreter handlers: every script then sees the connection refused."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ours, qemu_pids, wait_until
from e2b_sdk import E2bDaemon, serving, stop_process

pytestmark = pytest.mark.qemu


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """The module's daemon refills its cache while tests run: QEMU processes (and network
    leftovers) are counted around the whole module instead, by ``serving``."""
    yield


@pytest.fixture(scope="module")
def e2b(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[E2bDaemon]:
    with serving(tmp_path_factory.mktemp("e2b")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def sync(e2b: E2bDaemon) -> dict[str, Any]:
    return e2b.run_python("sdk_sync.py")


@pytest.fixture(scope="module")
def aio(e2b: E2bDaemon) -> dict[str, Any]:
    return e2b.run_python("sdk_async.py")


@pytest.fixture(scope="module")
def code(e2b: E2bDaemon) -> dict[str, Any]:
    return e2b.run_python("sdk_code.py")


@pytest.fixture(scope="module")
def errors(e2b: E2bDaemon) -> dict[str, Any]:
    return e2b.run_python("sdk_errors.py")


def raised(value: Any, kind: str) -> bool:
    """Whether a script's step raised ``kind`` (that class or a subclass of it)."""
    return isinstance(value, dict) and kind in value.get("mro", [])


# --- create, commands ---------------------------------------------------------------------------


def test_create_hands_out_a_sandbox_with_an_access_token(sync: dict[str, Any]) -> None:
    assert sync["create"]["sandbox_id"], sync["create"]
    assert sync["create"]["has_access_token"] is True


def test_commands_run_gives_stdout_stderr_and_the_exit_code(sync: dict[str, Any]) -> None:
    assert sync["run"] == {"stdout": "hello\n", "stderr": "oops\n", "exit_code": 0, "error": None}
    assert sync["run_exit_nonzero"] == {
        "raised": "CommandExitException",
        "exit_code": 3,
        "stdout": "partial\n",
        "stderr": "bad\n",
    }
    assert sync["run_on_stdout"] == ["line1\nline2\nline3\n", "line1\nline2\nline3\n"]
    assert raised(sync["run_timeout"], "TimeoutException"), sync["run_timeout"]


def test_envs_cwd_and_the_two_users(sync: dict[str, Any]) -> None:
    assert sync["run_envs"] == "bar,from-create\n"  # the command's and the sandbox's envVars
    assert sync["run_cwd"] == "/tmp\n"
    assert sync["run_default_cwd"] == "/home/user\n"
    assert sync["run_user_default"] == "user\n/home/user\n1000\n"
    assert sync["run_user_root"] == "root\n/root\n0\n"
    assert sync["run_tools"] == "42\n"  # bash and python3, as E2B's base template has


def test_a_background_command_is_listed_and_killed(sync: dict[str, Any]) -> None:
    seen = sync["background_kill"]
    assert seen["listed"] is True and seen["killed"] is True, seen
    assert seen["waited"]["raised"] == "CommandExitException" and seen["waited"]["exit_code"] != 0, seen
    assert seen["waited"]["stdout"] == "bg-start\n"
    assert seen["listed_after_kill"] is False and seen["kill_again"] is False, seen


def test_stdin_reaches_the_command_and_close_stdin_ends_it(sync: dict[str, Any]) -> None:
    assert sync["stdin"] == {"stdout": "line1\nline2\ndone-0\n", "stderr": "", "exit_code": 0, "error": None}


def test_a_running_command_can_be_reconnected_by_pid(sync: dict[str, Any]) -> None:
    seen = sync["reconnect"]
    assert seen["same_pid"] is True and seen["exit_code"] == 0, seen
    assert "tick4\n" in seen["stdout"], seen  # output after the reconnect arrives


def test_a_pty_takes_input_resizes_and_exits(sync: dict[str, Any]) -> None:
    assert sync["pty"] == {"first_size": True, "answer": True, "resized": True, "a_tty": True, "exit_code": 7}


# --- files --------------------------------------------------------------------------------------


def test_files_write_read_list_exists_make_dir_rename_remove(sync: dict[str, Any]) -> None:
    assert sync["write"] == "/home/user/notes/a.txt"
    assert sync["read"] == "hello file"
    assert sync["exists"] == [True, False]
    assert sync["file_info"] == {
        "name": "a.txt",
        "type": "file",
        "size": 10,
        "owner": "user",
        "path": "/home/user/notes/a.txt",
    }
    assert sync["make_dir"] == [True, False]  # made, then already there
    assert sync["list"] == [["a.txt", "file"]]
    assert sync["list_depth"] == ["/home/user/d1/d2"]
    assert sync["rename"] == "/home/user/notes/b.txt"
    assert sync["read_renamed"] == "hello file"
    assert sync["remove"] is False
    assert raised(sync["read_missing"], "FileNotFoundException") or raised(
        sync["read_missing"], "NotFoundException"
    ), sync
    assert sync["write_stream"] == "000173747265616d6564ff"  # the octet-stream upload
    assert sync["write_files"] == ["/home/user/m/one.txt", "/home/user/m/two.txt"]
    assert sync["write_as_root"] == "root"
    # The file API acts as root and gives what it writes to the user asked for, as envd does
    # (its download.go opens as root, upload.go writes as root and chowns): the user's file
    # calls reach /root, its commands do not (root in the guest is the sandbox's anyway).
    assert sync["write_root_as_user"] == "/root/denied.txt"
    assert sync["owner_root_as_user"] == "user"
    assert ".profile" in sync["list_root_as_user"]
    assert isinstance(sync["read_root_as_user"], str), sync["read_root_as_user"]


def test_a_20_mb_upload_reads_back_byte_exact(sync: dict[str, Any]) -> None:
    seen = sync["upload_20mb"]
    assert seen["same"] is True and seen["size"] == 20 * 1024 * 1024 and seen["guest_sha256_matches"], seen


def test_watch_dir_reports_created_and_removed_files(sync: dict[str, Any]) -> None:
    seen = sync["watch_dir"]
    events = {tuple(event) for event in seen["events"]}
    assert ("new.txt", "CREATE") in events and ("moved.txt", "REMOVE") in events, seen
    # only the files the program touched: an upload shows no temporary file of its own
    assert {name for name, _ in events} == {"new.txt", "moved.txt"}, seen
    assert seen["after_stop"] == "SandboxException"  # the SDK's own "already stopped"


# --- the control plane --------------------------------------------------------------------------


def test_get_info_list_set_timeout_and_connect(sync: dict[str, Any]) -> None:
    info = sync["get_info"]
    assert info["sandbox_id"] == sync["create"]["sandbox_id"]
    assert info["metadata"] == {"suite": "sync-core"} and info["template_id"] and info["lifetime_s"] == 300, (
        info
    )
    assert info["state"] == "running", info
    assert sync["sandbox_list"] == {"in_all": True, "filtered": True, "other": []}
    assert sync["set_timeout"] >= 1200
    assert sync["connect"] == "via-connect\n"
    assert sync["is_running"] is True


def test_kill_ends_the_sandbox_and_every_call_after_says_so(sync: dict[str, Any]) -> None:
    assert sync["kill"] is True
    assert sync["is_running_after_kill"] is False
    assert sync["kill_again"] is False  # 404: not there
    assert raised(sync["run_after_kill"], "SandboxException"), sync["run_after_kill"]
    assert raised(sync["get_info_after_kill"], "NotFoundException"), sync["get_info_after_kill"]


# --- async --------------------------------------------------------------------------------------


def test_the_async_sandbox(aio: dict[str, Any]) -> None:
    assert aio["run"] == {"stdout": "hello\n", "stderr": "oops\n", "exit_code": 0}
    assert aio["run_exit_nonzero"] == {
        "raised": "CommandExitException",
        "exit_code": 5,
        "stdout": "partial\n",
    }
    assert aio["envs_users"] == {
        "envs": "bar,async\n",
        "user": "user\n/home/user\n",
        "root": "root\n/root\n",
        "cwd": "/tmp\n",
    }
    background = aio["background_kill"]
    assert background["callback"] == "bg-start\n" and background["listed"] and background["killed"], (
        background
    )
    assert background["waited"]["raised"] == "CommandExitException" and not background["listed_after"]
    assert aio["stdin"] == {"stdout": "async-in\n", "stderr": "", "exit_code": 0}
    assert aio["pty"] == {"size": True, "exit_code": 0}
    assert aio["files"] == {"read": "async file", "list": ["a.txt"], "exists": True}
    events = {tuple(event) for event in aio["watch_dir"]["events"]}
    assert ("w.txt", "CREATE") in events and ("w.txt", "REMOVE") in events, aio["watch_dir"]
    assert aio["get_info"]["metadata"] == {"suite": "async-core"}
    assert aio["kill"] is True and aio["is_running_after_kill"] is False


# --- run_code -----------------------------------------------------------------------------------


def test_run_code_keeps_state_and_gives_the_last_expression(code: dict[str, Any]) -> None:
    assert code["define"] == {"text": None, "stdout": ["defined\n"], "stderr": [], "error": None}
    assert code["state_kept"]["text"] == "42"
    assert code["function_kept"]["text"] == "80"
    streams = code["streams"]
    assert (
        streams["text"] == "last" and streams["stdout"] == ["to out\n"] and streams["stderr"] == ["to err\n"]
    )
    assert streams["callbacks"] == {"stdout": ["to out\n"], "stderr": ["to err\n"]}
    assert code["no_result"] == {"text": None, "stdout": [], "stderr": [], "error": None}
    assert code["envs"]["text"] == "given"  # a str's repr loses its quotes, as E2B's server does


def test_a_sandbox_created_without_a_timeout_lives_e2bs_default(code: dict[str, Any]) -> None:
    """``Sandbox.create()`` sends no timeout; E2B's API then gives 300 s (NewSandboxV2)."""
    assert code["default_lifetime"] == 300, code["default_lifetime"]


def test_run_code_in_another_language_says_python_only(code: dict[str, Any]) -> None:
    assert raised(code["other_language"], "SandboxException"), code["other_language"]
    assert "runs Python only" in code["other_language"]["message"]


def test_run_code_gives_an_exception_as_error_and_goes_on(code: dict[str, Any]) -> None:
    assert code["exception"]["error"] == {
        "name": "ZeroDivisionError",
        "value": "division by zero",
        "traceback_has_line": True,
    }
    assert code["exception"]["text"] is None
    assert code["after_exception"]["text"] == "40"


def test_code_contexts_create_list_restart_remove(code: dict[str, Any]) -> None:
    seen = code["contexts"]
    assert seen["cwd"] == "/tmp" and seen["language"] == "python", seen
    assert seen["in_context"]["text"] == "/tmp"
    assert seen["isolated"]["error"]["name"] == "NameError"  # the default context has no z
    assert seen["listed"] is True
    assert seen["after_restart"]["error"]["name"] == "NameError"  # a restart forgets
    assert seen["listed_after_remove"] is False
    assert code["kill"] is True
    assert code["async_run_code"] == ["42"] and code["async_kill"] is True


# --- what goes wrong ----------------------------------------------------------------------------


def test_a_wrong_api_key_is_refused(errors: dict[str, Any]) -> None:
    assert raised(errors["create_wrong_key"], "AuthenticationException"), errors["create_wrong_key"]
    assert raised(errors["list_wrong_key"], "AuthenticationException"), errors["list_wrong_key"]


def test_an_unknown_sandbox_id(errors: dict[str, Any]) -> None:
    assert raised(errors["connect_unknown"], "NotFoundException"), errors["connect_unknown"]
    assert raised(errors["get_info_unknown"], "NotFoundException"), errors["get_info_unknown"]
    assert errors["kill_unknown"] is False
    assert raised(errors["set_timeout_unknown"], "NotFoundException"), errors["set_timeout_unknown"]
    # envd calls for a sandbox that is not there: what E2B's proxy answers (502, "not found")
    assert raised(errors["run_unknown"], "SandboxNotRunningException"), errors["run_unknown"]
    assert raised(errors["read_unknown"], "SandboxException"), errors["read_unknown"]
    assert errors["is_running_unknown"] is False


def test_a_wrong_or_missing_access_token_is_refused(errors: dict[str, Any]) -> None:
    for step in (
        "run_wrong_token",
        "list_wrong_token",
        "read_wrong_token",
        "write_wrong_token",
        "run_no_token",
        "read_no_token",
    ):
        assert raised(errors[step], "AuthenticationException") or raised(errors[step], "SandboxException"), (
            step,
            errors[step],
        )
        assert "not-the-token" not in json.dumps(errors[step])
    assert errors["code_wrong_token"]["status"] == 401, errors["code_wrong_token"]
    assert errors["still_fine"] == "fine\n" and errors["kill"] is True  # the refusals cost nothing


def test_a_sandbox_whose_timeout_passes_is_gone(errors: dict[str, Any]) -> None:
    assert errors["short_alive"] == "alive\n"
    assert errors["expired_after_s"] is not None, "the sandbox outlived its 3 s timeout by 30 s"
    assert raised(errors["expired_get_info"], "NotFoundException"), errors["expired_get_info"]
    assert raised(errors["expired_connect"], "NotFoundException"), errors["expired_connect"]
    assert raised(errors["expired_run"], "SandboxException"), errors["expired_run"]
    assert raised(errors["expired_read"], "SandboxException"), errors["expired_read"]
    assert errors["expired_is_running"] is False
    assert errors["expired_kill"] is False
    assert errors["expired_listed"] is False


def test_a_client_killed_mid_stream_loses_nothing(e2b: E2bDaemon) -> None:
    """A program killed while it reads a command's output: the sandbox stays, with its
    command, for the next program; no VM is lost or added."""

    def our_vms() -> int:
        return sum(1 for pid in qemu_pids() if ours(pid))

    vms_before = our_vms()
    client = e2b.start_python("sdk_client_gone.py", "start")
    try:
        assert client.stdout is not None
        first = client.stdout.readline()
        assert first.startswith("{"), (first, client.stderr.read() if client.stderr else "")
        sandbox_id = json.loads(first)["sandbox_id"]
        assert client.stdout.readline().strip() == "STREAMING"
    finally:
        stop_process(client, signal.SIGKILL)
    assert len(e2b.daemon.status()["handed_out_vms"]) == 1, "the sandbox went with its client"
    after = e2b.run_python("sdk_client_gone.py", "after", sandbox_id)
    assert after["connect"] == sandbox_id and after["run"] == "still-here\n", after
    assert (
        len(after["orphans"]) == 1 and after["kill_orphans"] == [True] and after["orphans_after_kill"] == []
    )
    assert after["files"] == "after" and after["kill"] is True
    assert wait_until(lambda: e2b.daemon.status()["handed_out_vms"] == [], 10)
    e2b.daemon.wait_cached(2)
    assert wait_until(lambda: our_vms() == vms_before, 30), "a VM was lost or leaked"


def test_what_vmcache_does_not_offer_is_a_clear_error(errors: dict[str, Any]) -> None:
    """Pausing, snapshots, forks, metrics, per-sandbox networks: E2B-style JSON errors the SDK
    raises as SandboxException naming what is not served (docs/e2b.md lists them), no sandbox
    made by a refused create, and the sandbox asked about unharmed."""
    for step, what in (
        ("unsupported_metrics", "sandbox metrics"),
        ("unsupported_pause", "pausing a sandbox"),
        ("unsupported_snapshot", "snapshots"),
        ("unsupported_fork", "forking a sandbox"),
        ("unsupported_network", "network"),
        ("unsupported_create_pause", "pausing a sandbox"),
        ("unsupported_create_network", "network"),
    ):
        assert raised(errors[step], "SandboxException"), (step, errors[step])
        assert errors[step]["message"].startswith("501: vmcache does not support"), (step, errors[step])
        assert what in errors[step]["message"], (step, errors[step])
    assert errors["unknown_template"]["message"].startswith("404: template 'no-such-template' not found")
    assert errors["listed_after_refusals"] == 0  # the refused creates made no sandbox
    assert errors["still_fine"] == "fine\n"


def test_gzip_and_streamed_transfers(errors: dict[str, Any]) -> None:
    assert errors["stream_input"] == {"stdout": "streamed input\n", "exit_code": 0}  # a client stream
    assert errors["gzip_write"] == "zipped"  # files.write(gzip=True): a gzip-encoded upload
    assert errors["gzip_read"] == "zipped"
    assert errors["stream_read"] == "zipped"  # files.read(format="stream")
