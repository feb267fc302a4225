"""`vmcache exec` output throughput: the CLI's relay, two source trees side by side, and the library.

    flock /tmp/vmcache-qemu.lock python bench/exec_relay.py [--before /work/main/src] [--size-mb 200]

Starts a daemon (this tree's code) with a cache of one VM, takes it with
`vmcache get`, then runs, alternating the trees on the same VM:

  devnull  `vmcache exec VM -- head -c SIZE /dev/zero > /dev/null`
  pipe     `vmcache exec VM -- head -c SIZE /dev/zero | cat > /dev/null`
  python   the same into a Python program reading 64 KiB at a time
  true     `vmcache exec VM -- true` (start-up: Python, imports, connecting, HELLO)

and, for reference, the same output read through the library in this process
(``open_process`` + ``stdout.receive_some``). MB/s are SIZE over the whole
command's wall time (start-up included, as a user sees it). The VM and the
daemon are stopped at the end, and the work directory removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import vmcache

ROOT = Path(__file__).resolve().parent.parent
#: A pipe's reader that takes some CPU per read, as most programs do.
PY_READER = "import sys\nread = sys.stdin.buffer.raw.read\nwhile read(65536): pass"


def cli(tree: Path) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "vmcache"], {**os.environ, "PYTHONPATH": str(tree)}


def timed(command: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(["sh", "-c", command], env=env, stderr=subprocess.PIPE, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command!r} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


async def library_mb_s(handle_file: Path, size: int) -> float:
    vm = vmcache.VMHandle.from_json(handle_file.read_text())
    try:
        start = time.perf_counter()
        received = 0
        async with vm.open_process(["head", "-c", str(size), "/dev/zero"]) as process:
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some(1 << 20):
                received += len(chunk)
            await process.wait()
        assert received == size
        return size / 1e6 / (time.perf_counter() - start)
    finally:
        await vm.disconnect()


async def wait_cached(endpoint: Path, timeout: float = 180.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                async with vmcache.connect(endpoint) as cache:
                    if (await cache.status()).vms:
                        return
            except vmcache.DaemonNotRunningError:
                pass
            await trio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=Path("/work/main/src"),
                        help="the source tree to compare with")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": (ROOT / "src").resolve()}
    size = args.size_mb * 1_000_000
    work = Path(tempfile.mkdtemp(prefix="vmcache-bench-relay-", dir="/tmp"))
    work.chmod(0o711)
    os.environ["VMCACHE_RUN_DIR"] = str(work / "run")
    endpoint = work / "cache.sock"
    config = work / "daemon.toml"
    config.write_text(f'[factory]\nvm_cache_number = 1\nvm_cache_endpoint = "{endpoint}"\n'
                      '[hypervisor.qemu]\naccel = "tcg"\nboot_timeout = 60.0\n')
    command, env = cli(trees["after"])
    with open(work / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([*command, "serve", "--config", str(config)], env=env,
                                  stdout=log, stderr=log)
    handle_file = work / "vm.json"
    results: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    library: list[float] = []
    try:
        trio.run(wait_cached, endpoint)
        with handle_file.open("w") as out:
            subprocess.run([*command, "get", "--endpoint", str(endpoint), "--ttl", "900"], env=env,
                           stdout=out, check=True, timeout=120)
        for _ in range(args.runs):
            for name, tree in trees.items():
                command, env = cli(tree)
                exec_ = " ".join([*command, "exec", str(handle_file), "--"])
                for what, line in (
                    ("devnull", f"{exec_} head -c {size} /dev/zero > /dev/null"),
                    ("pipe", f"{exec_} head -c {size} /dev/zero | cat > /dev/null"),
                    ("python", f"{exec_} head -c {size} /dev/zero | {sys.executable} -c '{PY_READER}'"),
                ):
                    results[name].setdefault(what, []).append(size / 1e6 / timed(line, env))
                results[name].setdefault("true", []).append(timed(f"{exec_} true", env) * 1000)
            library.append(trio.run(library_mb_s, handle_file, size))
    finally:
        if handle_file.stat().st_size if handle_file.exists() else 0:
            command, env = cli(trees["after"])
            subprocess.run([*command, "stop", str(handle_file)], env=env, timeout=120, check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    print(f"`vmcache exec` relaying {args.size_mb} MB of stdout, medians of {args.runs} runs "
          f"(before: {trees['before']}, after: {trees['after']})")
    print(f"{'':34}{'before':>12}{'after':>12}")
    for what, label, unit in (("devnull", "exec ... > /dev/null", "MB/s"),
                              ("pipe", "exec ... | cat > /dev/null", "MB/s"),
                              ("python", "exec ... | python reading 64 KiB", "MB/s"),
                              ("true", "exec -- true (start-up)", "ms")):
        before, after = (statistics.median(results[name][what]) for name in trees)
        print(f"{label:34}{before:>8.1f} {unit:<4}{after:>7.1f} {unit}")
    print(f"{'library, open_process + receive_some':34}{statistics.median(library):>8.1f} MB/s")


if __name__ == "__main__":
    main()
