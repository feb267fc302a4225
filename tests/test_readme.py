"""The README's library examples and tour, run as written (paths aside)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VMCACHE, qemu_pids, wait_until
from daemon import Daemon

pytestmark = pytest.mark.qemu

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example {name}"
    return match.group(1)


def test_library_serve_example(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    from conftest import write_config

    config = write_config(tmp_path / "vmcache.toml", cache=1, endpoint=run_dir / "ex.sock")
    code = example("library-serve").replace('"contrib/vmcache.toml"', repr(str(config)))
    before = qemu_pids()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0 Linux\n"
    assert wait_until(lambda: qemu_pids() == before, 10)


def test_library_client_example(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    daemon = Daemon(tmp_path, run_dir, cache=1).start()
    try:
        daemon.wait_cached(1)
        code = example("library-client").replace('"/run/vmcache/cache.sock"', repr(str(daemon.endpoint)))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        first, handle = done.stdout.splitlines()
        assert first == f"daemon pid {daemon.pid} cached 1"
        assert not Path(json.loads(handle)["run_dir"]).exists()  # stopped by the example
    finally:
        assert daemon.signal(signal.SIGTERM) == 0


def test_tour_commands_and_output_shape(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """The 60-second tour, command by command, against a real daemon."""
    daemon = Daemon(tmp_path, run_dir, cache=1).start()
    try:
        daemon.wait_cached(1)
        status = daemon.cli("status").stdout.splitlines()
        assert re.fullmatch(r"VM cache server pid = \d+", status[0])
        assert re.fullmatch(r"VM pid = \d+ Cpu = 1 Memory = 256MiB", status[1])
        assert re.fullmatch(r"Cache: 1/1 ready, 0 booting, boot mode boot", status[2])
        assert re.fullmatch(r"Counters: 1 boots, 0 boot failures, 0 handed out, median boot [\d.]+ s, "
                            r"median hand-out [\d.]+ ms, uptime \d+ s", status[3])
        handle = tmp_path / "vm.json"
        handle.write_text(daemon.cli("get", "--ttl", "600").stdout)
        version = daemon.cli("exec", str(handle), "--", "python3", "-c",
                             "import sys; print(sys.version.split()[0])").stdout.strip()
        assert re.fullmatch(r"3\.\d+\.\d+", version)
        lines = subprocess.run([*VMCACHE, "exec", str(handle), "--", "wc", "-l"], input="a\nb\n",
                               capture_output=True, text=True, timeout=60)
        assert lines.stdout.strip() == "2"
        (tmp_path / "data.csv").write_text("x,y\n")
        daemon.cli("cp", str(tmp_path / "data.csv"), f"{handle}:/tmp/")
        assert daemon.cli("exec", str(handle), "--", "cat", "/tmp/data.csv").stdout == "x,y\n"
        daemon.cli("stop", str(handle))
        warm = subprocess.run([*VMCACHE, "run", "--endpoint", str(daemon.endpoint), "--", "echo", "warm"],
                              capture_output=True, text=True, timeout=120)
        assert warm.stdout == "warm\n"
        direct = subprocess.run([*VMCACHE, "run", "--direct", "--config", str(daemon.config), "--",
                                 "echo", "cold"], capture_output=True, text=True, timeout=120)
        assert direct.stdout == "cold\n"
        daemon.cli("quit")
        assert daemon.process is not None and daemon.process.wait(timeout=10) == 0
    finally:
        daemon.ensure_stopped()
