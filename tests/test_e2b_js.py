"""E2B's released JS SDK (npm ``e2b`` and ``@e2b/code-interpreter``, unmodified) through node
against a real ``vmcache serve``: the same core a user of the JS SDK relies on (create,
commands, files, runCode, kill). Node is part of this project's machines; a machine without
node fails here with one line instead of skipping silently."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b_sdk import serving

pytestmark = pytest.mark.qemu


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Counted around the module by ``serving`` (its daemon refills while tests run)."""
    yield


@pytest.fixture(scope="module")
def js(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[dict[str, Any]]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(
            "node and npm are needed for the JS SDK's tests: apt-get install nodejs npm", pytrace=False
        )
    with serving(tmp_path_factory.mktemp("e2b-js")) as daemon:
        yield daemon.run_node("core.cjs")


def test_js_create_and_commands(js: dict[str, Any]) -> None:
    assert js["create"]["sandboxId"], js
    assert js["run"] == {"stdout": "hello\n", "stderr": "oops\n", "exitCode": 0}
    assert js["run_exit_nonzero"] == {
        "raised": "CommandExitError",
        "isCommandExitError": True,
        "exitCode": 4,
        "stdout": "partial\n",
    }
    assert js["run_envs_user"] == {
        "envs": "bar,js\n",
        "user": "user\n/home/user\n",
        "root": "root\n",
        "cwd": "/tmp\n",
    }
    background = js["background_kill"]
    assert background["listed"] is True and background["killed"] is True, background
    assert background["waited"]["raised"] == "CommandExitError", background


def test_js_files(js: dict[str, Any]) -> None:
    assert js["files"] == {
        "text": "from js",
        "same": True,
        "names": ["a.txt", "b.bin"],
        "exists": True,
        "existsAfterRemove": False,
    }


def test_js_control_plane_and_kill(js: dict[str, Any]) -> None:
    assert js["get_info"] == {"sandboxId": js["create"]["sandboxId"], "metadata": {"suite": "js"}}
    assert js["kill"] is True and js["is_running_after_kill"] is False and js["kill_again"] is False


def test_js_run_code(js: dict[str, Any]) -> None:
    assert js["run_code"] == {
        "text": "42",
        "stdout": ["js-out\n"],
        "error": {"name": "ValueError", "value": "js-bad"},
    }
    assert js["code_kill"] is True
