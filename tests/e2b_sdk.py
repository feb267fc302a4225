"""The released E2B SDKs, installed as a user would install them, and a real daemon serving them.

E2B's SDK is what people write sandbox code against; vmcache's ``[e2b]`` listener must serve
it unmodified. The SDKs are never installed into vmcache's own environment: ``e2b`` 2.63
requires ``h2>=4.4.1`` where purerpc needs ``h2<4`` (the daemon would die on the first gRPC
call), so the tests do what docs/e2b.md tells a user to do:

- :func:`sdk_environment` makes ONE Python venv (``python -m venv``; ``pip install`` of the
  pinned ``e2b`` and ``e2b-code-interpreter`` from PyPI) and one npm directory (the pinned
  ``e2b`` and ``@e2b/code-interpreter`` from npm) in a cache directory keyed by the pins, so a
  rerun costs nothing. Each is built under a temporary name and renamed into place when
  complete, so a half-made one (an install killed or failed) is never used. An install that
  fails raises :class:`SdkInstallError` with one line saying what to do: the tests fail, never
  skip (CI reaches both registries).
- :class:`E2bDaemon` is a ``vmcache serve`` child process with ``[e2b] listen`` on a free
  127.0.0.1 port and an API key file of mode 0600; the test modules share one (module
  scope) and count QEMU processes and network leftovers around the whole module.
- :meth:`E2bDaemon.run_python` / :meth:`E2bDaemon.run_node` run an SDK script in the SDK's
  environment with ``E2B_API_URL``/``E2B_SANDBOX_URL``/``E2B_API_KEY`` pointing at the daemon;
  each script prints one JSON line of what it saw, which the tests assert on.

Run as a program (``python tests/e2b_sdk.py``) it builds the environments and prints where
they are: what ``bench/e2b.py`` uses too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The released SDKs the proof runs against (what a user installs today).
PYTHON_PINS = ("e2b==2.63.0", "e2b-code-interpreter==2.11.5")
NPM_PINS = ("e2b@2.51.0", "@e2b/code-interpreter@2.8.0")
#: Bounds on each install step: a registry that stops answering fails the tests in one line.
VENV_TIMEOUT = 120.0
PIP_TIMEOUT = 300.0
NPM_TIMEOUT = 300.0
#: How long one SDK script may take before the test fails (and the script is killed).
SCRIPT_TIMEOUT = 90.0

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "e2b_scripts"
JS_SCRIPTS = HERE / "e2b_js"


class SdkInstallError(Exception):
    """The SDK environment could not be made (the registry, the network, the disk)."""


def cache_root() -> Path:
    """Where the environments live: ``$VMCACHE_E2B_SDK_CACHE``, else ``~/.cache/vmcache-e2b-sdk``
    (outside the work tree: a fresh clone in CI reuses what the previous run built)."""
    configured = os.environ.get("VMCACHE_E2B_SDK_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vmcache-e2b-sdk"


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SdkEnvironment:
    python: Path  # the SDK venv's interpreter
    node_modules: Path | None  # the npm directory's node_modules (None: no node here)
    fresh_seconds: float  # what building took in this process (0.0: it was cached)


def _run_step(argv: Sequence[str], timeout: float, what: str, cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise SdkInstallError(
            f"{what} took over {timeout:.0f} s; check that the registry is reachable, then rerun"
        ) from None
    except OSError as error:
        raise SdkInstallError(f"{what} could not run ({error}); install it and rerun") from None
    if done.returncode != 0:
        last = next(
            (line for line in reversed((done.stderr or done.stdout).splitlines()) if line.strip()),
            f"exit {done.returncode}",
        )
        raise SdkInstallError(
            f"{what} failed: {last.strip()}; check that the registry is reachable, then rerun"
        )


def _build_once(final: Path, build: Any) -> bool:
    """Build ``final`` through ``build(tmp)`` under a temporary sibling name, renamed into
    place when complete. Returns whether anything was built."""
    if (final / ".complete").is_file():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / ".complete").is_file():  # not another run finishing first
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _python_env(root: Path) -> Path:
    """The SDK venv. A venv records its own path in its scripts, but ``bin/python -m pip`` and
    ``bin/python script.py`` work wherever it was built, so building under a temporary name and
    renaming is safe for how it is used here."""
    final = root / f"python-{_key(sys.version, *PYTHON_PINS)}"

    def build(tmp: Path) -> None:
        _run_step([sys.executable, "-m", "venv", str(tmp)], VENV_TIMEOUT, "python -m venv (the E2B SDK venv)")
        _run_step(
            [
                str(tmp / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                *PYTHON_PINS,
            ],
            PIP_TIMEOUT,
            f"pip install {' '.join(PYTHON_PINS)}",
        )

    _build_once(final, build)
    return final / "bin" / "python"


def _npm_env(root: Path) -> Path | None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return None
    final = root / f"npm-{_key(*NPM_PINS)}"

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "package.json").write_text(json.dumps({"name": "vmcache-e2b-sdk", "private": True}))
        _run_step(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--save-exact", *NPM_PINS],
            NPM_TIMEOUT,
            f"npm install {' '.join(NPM_PINS)}",
            cwd=tmp,
        )

    _build_once(final, build)
    return final / "node_modules"


def sdk_environment() -> SdkEnvironment:
    """The SDK venv and npm directory, built on first use (see the module's docstring)."""
    root = cache_root()
    started = time.monotonic()
    python = _python_env(root)
    node_modules = _npm_env(root)
    return SdkEnvironment(python, node_modules, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# The daemon


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound, read, released: the daemon binds it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ScriptResult:
    returncode: int
    seen: dict[str, Any]  # the script's JSON line
    stderr: str


class E2bDaemon:
    """A started ``vmcache serve`` whose ``[e2b]`` listener the SDKs are pointed at."""

    def __init__(
        self, daemon: Any, port: int, api_key: str, env: SdkEnvironment, base_env: Mapping[str, str]
    ) -> None:
        self.daemon = daemon  # tests/daemon.py's Daemon
        self.port = port
        self.api_key = api_key
        self.sdk = env
        self.base_env = dict(base_env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sdk_env(self, api_key: str | None = None) -> dict[str, str]:
        """What a user sets: the two URL overrides and the key (and nothing else of E2B's)."""
        env = {key: value for key, value in self.base_env.items() if not key.startswith("E2B_")}
        env.pop("PYTHONPATH", None)  # the SDK venv must not see vmcache's tree
        env |= {
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
            "E2B_API_KEY": self.api_key if api_key is None else api_key,
        }
        return env

    def _run(
        self, argv: list[str], timeout: float, api_key: str | None, extra_env: Mapping[str, str] | None
    ) -> ScriptResult:
        env = self.sdk_env(api_key) | dict(extra_env or {})
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
                cwd=SCRIPTS,
            )
        except subprocess.TimeoutExpired as expired:
            raise AssertionError(
                f"{argv[1:]} took over {timeout} s\n--- stderr ---\n{expired.stderr!r}\n"
                f"--- daemon log (tail) ---\n{self.log_tail()}"
            ) from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(
                f"{argv[1:]} printed no JSON line (exit {done.returncode})\n--- stdout ---\n"
                f"{done.stdout}\n--- stderr ---\n{done.stderr}\n--- daemon log (tail) ---\n"
                f"{self.log_tail()}"
            )
        seen: dict[str, Any] = json.loads(lines[-1])
        return ScriptResult(done.returncode, seen, done.stderr)

    def run_python(
        self,
        script: str,
        *args: str,
        timeout: float = SCRIPT_TIMEOUT,
        api_key: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run tests/e2b_scripts/SCRIPT in the SDK venv; its JSON line (the test fails on a crash)."""
        result = self._run([str(self.sdk.python), str(SCRIPTS / script), *args], timeout, api_key, extra_env)
        assert result.returncode == 0, (
            f"{script}: exit {result.returncode}\n{result.stderr}\n"
            f"--- daemon log (tail) ---\n{self.log_tail()}"
        )
        return result.seen

    def run_node(self, script: str, *args: str, timeout: float = SCRIPT_TIMEOUT) -> dict[str, Any]:
        """Run tests/e2b_js/SCRIPT with node, the npm directory's packages on its path."""
        assert self.sdk.node_modules is not None, "node and npm are needed for the JS SDK's tests"
        extra = {"NODE_PATH": str(self.sdk.node_modules)}
        result = self._run(["node", str(JS_SCRIPTS / script), *args], timeout, None, extra)
        assert result.returncode == 0, (
            f"{script}: exit {result.returncode}\n{result.stderr}\n"
            f"--- daemon log (tail) ---\n{self.log_tail()}"
        )
        return result.seen

    def start_python(self, script: str, *args: str) -> subprocess.Popen[str]:
        """Start an SDK script without waiting (a client the test then kills)."""
        return subprocess.Popen(
            [str(self.sdk.python), str(SCRIPTS / script), *args],
            env=self.sdk_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=SCRIPTS,
        )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.daemon.log().splitlines()[-lines:])


def write_api_keys(path: Path, *keys: str) -> Path:
    """An API key file as the daemon requires it: one key a line, readable by its owner only."""
    path.write_text("".join(f"{key}\n" for key in keys))
    path.chmod(0o600)
    return path


def e2b_config_section(port: int, keys_file: Path) -> str:
    return f'[e2b]\nlisten = "127.0.0.1:{port}"\napi_keys_file = "{keys_file}"\n'


def wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    process.wait(timeout=30)


@contextlib.contextmanager
def serving(tmp: Path, api_key: str = "e2b_vmcache-test-key", pool: int = 2) -> Iterator[E2bDaemon]:
    """A ``vmcache serve`` (this tree's code, like every daemon test) with ``[e2b] listen`` on a
    free 127.0.0.1 port, a cache of ``pool`` VMs (snapshot mode), and an API key file of mode 0600; the SDK
    environments built first (a failed install fails here, before any VM boots).

    Around it, what a module of SDK tests must leave as it found: no QEMU process of its own
    left (counted before and after, as conftest's per-test check does), no network leftovers
    (tests/leaks.py's census), no run directory of a VM, nothing handed out when it ends (every
    sandbox was killed or timed out), no traceback in the daemon's log, and a clean exit on
    SIGTERM."""
    import leaks
    import pytest
    from conftest import RUN_DIR_PREFIX, qemu_pids, wait_until
    from daemon import Daemon

    from vmcache import procfs

    failed: SdkInstallError | None = None
    try:
        env = sdk_environment()
    except SdkInstallError as error:
        failed = error  # failed outside the except block: one line, no chained traceback
    if failed is not None:
        pytest.fail(f"the E2B SDKs could not be installed: {failed}", pytrace=False)
    run_dir = Path(f"{RUN_DIR_PREFIX}e2b-{time.monotonic_ns() % 10**9}")
    run_dir.mkdir(mode=0o700)
    old_run_dir = os.environ.get("VMCACHE_RUN_DIR")
    os.environ["VMCACHE_RUN_DIR"] = str(run_dir)

    def ours() -> list[int]:
        return sorted(pid for pid in qemu_pids() if str(run_dir).encode() in procfs.cmdline(pid))

    census_before = leaks.census()
    port = free_port()
    keys = write_api_keys(tmp / "e2b-api-keys", api_key)
    # Snapshot mode, as the fastest daemon tests run: the module creates about ten sandboxes,
    # and a refill restored from the template takes a fraction of a cold boot's core-seconds.
    daemon = Daemon(tmp, run_dir, cache=pool, factory={"boot_mode": "snapshot"})
    with open(daemon.config, "a") as config:
        config.write(e2b_config_section(port, keys))
    try:
        daemon.start()
        assert wait_listening(port, 30), f"[e2b] listen 127.0.0.1:{port} never accepted\n{daemon.log()}"
        daemon.wait_cached(pool)
        served = E2bDaemon(daemon, port, api_key, env, os.environ)
        yield served
        status = daemon.status()
        assert status["handed_out_vms"] == [], f"sandboxes left handed out: {status['handed_out_vms']}"
        assert daemon.signal(signal.SIGTERM) == 0, daemon.log()
        log = daemon.log()
        assert "Traceback" not in log and "unexpected error" not in log, log
    finally:
        daemon.ensure_stopped()
        if old_run_dir is None:
            os.environ.pop("VMCACHE_RUN_DIR", None)
        else:
            os.environ["VMCACHE_RUN_DIR"] = old_run_dir
        leftovers = (
            [p.name for p in run_dir.iterdir() if p.name.startswith("vm-")] if run_dir.exists() else []
        )
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    assert not leftovers, f"run directories left behind: {leftovers}"
    # This module's QEMUs are those whose sockets live in its run directory: another engineer's
    # or another test run's, started or ended meanwhile on a shared machine, are not counted.
    assert wait_until(lambda: not ours(), 10), f"the SDK tests left QEMU processes: {ours()}"
    assert not any(leaks.leaked(census_before, leaks.census()).values()), leaks.leaked(
        census_before, leaks.census()
    )


if __name__ == "__main__":
    try:
        built = sdk_environment()
    except SdkInstallError as error:
        sys.exit(f"e2b_sdk: {error}")
    print(
        json.dumps(
            {
                "python": str(built.python),
                "node_modules": str(built.node_modules),
                "seconds": round(built.fresh_seconds, 1),
            }
        )
    )
