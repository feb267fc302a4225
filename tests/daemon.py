"""Helpers to run a real `vmcache serve` process and talk to it through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from conftest import VMCACHE, pid_alive, wait_until, write_config

from vmcache.errors import VmcacheError

BOOT_WAIT = 120.0


class Daemon:
    """A `vmcache serve` child process with its own config, endpoint and log file."""

    def __init__(self, tmp_path: Path, run_dir: Path, cache: int = 2,
                 factory: dict[str, object] | None = None,
                 pools: dict[str, dict[str, object]] | None = None, **qemu: object) -> None:
        self.endpoint = run_dir / "cache.sock"
        self.config = write_config(tmp_path / "daemon.toml", cache=cache, endpoint=self.endpoint,
                                   factory=factory, pools=pools, **qemu)
        self.log_path = tmp_path / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*VMCACHE, "--log-level", "debug", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        assert wait_until(lambda: self.listening() or self.process.poll() is not None, 30), self.log()
        assert self.process.poll() is None, self.log()
        return self

    def listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.endpoint))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*VMCACHE, *args, "--endpoint", str(self.endpoint)] if args[0] in (
            "get", "status", "quit") else [*VMCACHE, *args],
            capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{args}: {done.stderr}\n--- daemon log ---\n{self.log()}"
        return done

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return data

    def cached_pids(self) -> list[int]:
        return [vm["pid"] for vm in self.status()["vms"]]

    def wait_cached(self, count: int, timeout: float = BOOT_WAIT) -> list[int]:
        assert wait_until(lambda: len(self.cached_pids()) == count, timeout, interval=0.3), self.log()
        return self.cached_pids()

    def signal(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def ensure_stopped(self) -> None:
        """Test teardown: whatever happened, leave no daemon (its cached VMs die with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stop_handed_out(handle_json: str, tmp_path: Path) -> None:
    """Stop a VM we were handed, through the real CLI."""
    path = tmp_path / f"handle-{os.urandom(4).hex()}.json"
    path.write_text(handle_json)
    pid = json.loads(handle_json)["pid"]
    done = subprocess.run([*VMCACHE, "stop", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: not pid_alive(pid), 10)


def run_as(uid: int, gid: int, action: Callable[[], Awaitable[str]]) -> str:
    """Fork; in the child become ``uid``/``gid`` (no other groups) and run ``action`` under
    Trio. Returns its result, or ``error <message>`` for a VmcacheError. (A fork, not a new
    interpreter: a uid like 65534 may not be able to import from a root-owned environment.)"""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            outcome = trio.run(action)
        except VmcacheError as error:
            outcome = f"error {error}"
        except BaseException as error:
            outcome = f"crash {error!r}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        outcome = pipe.read()
    os.waitpid(child, 0)
    return outcome
