"""Two git revisions of vmcache measured side by side, in one run, on this machine.

    flock /tmp/vmcache-qemu.lock python bench/compare.py --before REV --after REV \\
        [--rounds N] [--quick] [--name NAME]

Each revision gets a git worktree under a private temporary directory, its own guest
image (the agent travels in the initramfs: the installed image is copied and
``vmcache image build`` rebuilds the initramfs from that revision's agent), its own
daemons (``vmcache serve`` with that tree on PYTHONPATH, each in a run directory of its
own) and its own client process (bench/compare_worker.py with that tree on
PYTHONPATH: the two trees have different vmcache packages, and each is measured
through its own). The measurements are interleaved, one at a time, before and after
alternately (ABBA: the order flips every round, so neither side is always first), and
every one starts with all caches of both revisions full, so that no refill of either
side runs while the other is timed: machine noise hits both alike.

Measured, for each revision (bench/README.md has the definitions):
  guest     on a leased VM (snapshot mode): stdout and stdin MB/s, ``run(["true"])`` and
            warm ``python3 -c 'print(1)'`` round trips
  hand-out  TakeVM, Kata GetBaseVM (Trio client) and GetBaseVM through grpcio, with a full
            cache, in snapshot mode and in boot mode (idle VMs paused: the default)
  agent     the revision's own bench/agent_host.py (its agent on the host, no QEMU)

Prints medians side by side with after/before, writes every sample to
bench/results/compare-NAME.json, removes the worktrees and the temporary directory
whatever happens, and fails if a QEMU process is left behind. It imports no vmcache
itself: which vmcache runs is decided by each child's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "compare_worker.py"
SIDES = ("before", "after")
#: The cache size of every daemon: the hand-out of a full cache of 2 is what bench.py times.
CACHE = 2


STARTED = time.monotonic()


def log(text: str) -> None:
    print(f"compare [{time.monotonic() - STARTED:4.0f} s]: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes


def qemu_processes() -> dict[int, bytes]:
    """Live qemu-system processes on this machine: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in os.path.basename(argv.split(b"\0", 1)[0]) and state != "Z":
            found[int(entry.name)] = argv
    return found


def stop_process(process: subprocess.Popen[Any], grace: float = 60.0) -> None:
    """SIGTERM (a daemon then stops its VMs), SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class Worker:
    """One revision's client process: JSON commands in, JSON answers out, each with a timeout."""

    def __init__(self, python: str, tree: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.stderr = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [python, str(WORKER), "--tree", str(tree), "--scratch", str(log_path.parent)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=tree)
        self.buffer = b""

    def call(self, command: dict[str, Any], timeout: float) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise RuntimeError(f"{command['op']} took more than {timeout:.0f} s "
                                       f"(worker log: {self.log_path})")
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the worker exited during {command['op']}: "
                                       f"{tail(self.log_path)}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"{command['op']} failed: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"op": "quit"}\n')
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.stderr.close()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------ one revision


class Side:
    """One revision: its worktree, image, daemons and client process, under ``work/name``."""

    def __init__(self, name: str, rev: str, work: Path, python: str) -> None:
        self.name = name
        self.rev = rev
        self.python = python
        self.home = work / name
        self.home.mkdir()
        self.home.chmod(0o711)  # the VMs' own uids pass through to their run directories
        self.tree = self.home / "tree"
        self.data = self.home / "data"
        self.run = self.home / "run"
        self.env = os.environ | {"PYTHONPATH": str(self.tree / "src"),
                                 "VMCACHE_DATA_DIR": str(self.data),
                                 "VMCACHE_RUN_DIR": str(self.run)}
        self.daemons: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        self.worker: Worker | None = None
        self.image: dict[str, Any] = {}

    def endpoint(self, mode: str) -> str:
        return str(self.home / f"{mode}.sock")

    def checkout(self) -> None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                        str(self.tree), self.rev], check=True, timeout=120)

    def build_image(self, source: Path) -> None:
        """The installed image copied, then the initramfs rebuilt with this revision's agent.
        The kernel package is linked, not copied; the root image is reused when its inputs
        did not change (they are the same for both sides unless a revision changed them)."""
        image = self.data / "image"
        image.mkdir(parents=True)
        self.data.chmod(0o755)
        for item in (source / "image").iterdir():
            shutil.copy2(item, image / item.name)
        if (source / "kernel-package").is_dir():
            (self.data / "kernel-package").symlink_to(source / "kernel-package")
        result = subprocess.run([self.python, "-m", "vmcache", "image", "build"], env=self.env,
                                cwd=self.tree, capture_output=True, text=True, timeout=1800)
        if result.returncode:
            raise RuntimeError(f"{self.name}: vmcache image build failed:\n{result.stderr[-3000:]}")
        manifest = json.loads((image / "manifest.json").read_text())
        rootfs = manifest.get("rootfs") or {}
        self.image = {"initrd_sha256": manifest.get("initrd_sha256"),
                      "rootfs_sha256": rootfs.get("sha256") if isinstance(rootfs, dict) else None,
                      "build_output": (result.stdout + result.stderr).strip().splitlines()}

    def start_daemon(self, mode: str) -> None:
        config = self.home / f"{mode}.toml"
        config.write_text("\n".join([
            "[factory]", f"vm_cache_number = {CACHE}", f'vm_cache_endpoint = "{self.endpoint(mode)}"',
            f'boot_mode = "{mode}"', "[hypervisor.qemu]", 'accel = "tcg"', "boot_timeout = 60.0",
        ]) + "\n")
        output = open(self.home / f"{mode}.log", "wb")  # noqa: SIM115 (closed in stop_daemon)
        process = subprocess.Popen([self.python, "-m", "vmcache", "serve", "--config", str(config)],
                                   env=self.env, cwd=self.tree, stdout=output, stderr=output)
        self.daemons[mode] = (process, output)

    def stop_daemon(self, mode: str) -> None:
        process, output = self.daemons.pop(mode)
        stop_process(process)
        output.close()
        if process.returncode not in (0, -signal.SIGTERM):
            log(f"{self.name}: the {mode}-mode daemon exited with {process.returncode}: "
                f"{tail(self.home / f'{mode}.log')}")

    def start_worker(self) -> None:
        self.worker = Worker(self.python, self.tree, self.env, self.home / "worker.log")

    def call(self, command: dict[str, Any], timeout: float = 300.0) -> Any:
        assert self.worker is not None
        for mode, (process, _) in self.daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{self.name}: the {mode}-mode daemon exited "
                                   f"({process.returncode}): {tail(self.home / f'{mode}.log')}")
        return self.worker.call(command, timeout)

    def agent_host(self, size_mb: int) -> dict[str, float]:
        """This revision's own bench/agent_host.py (its API may differ from the other's)."""
        script = self.tree / "bench" / "agent_host.py"
        if not script.is_file():
            return {}
        result = subprocess.run([self.python, str(script), "--size", str(size_mb)], env=self.env,
                                cwd=self.tree, capture_output=True, text=True, timeout=600)
        if result.returncode:  # that revision's script is its own: its failure costs its figures only
            log(f"{self.name}: bench/agent_host.py failed (its figures are left out):\n"
                f"{result.stderr[-2000:]}")
            return {}
        figures = {}
        for line in result.stdout.splitlines():
            if match := re.fullmatch(r"(.+?)\s+(-?[0-9.]+)", line.strip()):
                figures[match[1]] = float(match[2])
        return figures

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        for mode in list(self.daemons):
            self.stop_daemon(mode)


# ------------------------------------------------------------------ the run


class Samples:
    """Every sample of every metric, per side, and which round it came from."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, list[float]]] = {}
        self.rounds: dict[str, dict[str, list[float]]] = {}

    def add(self, metric: str, side: str, values: list[float]) -> None:
        self.data.setdefault(metric, {s: [] for s in SIDES})[side].extend(values)
        self.rounds.setdefault(metric, {s: [] for s in SIDES})[side].append(statistics.median(values))


def settle(sides: list[Side], modes: list[str]) -> None:
    """Every cache of both sides full: no refill runs during the next measurement."""
    for side in sides:
        for mode in modes:
            side.call({"op": "full", "endpoint": side.endpoint(mode), "count": CACHE})


def order(sides: list[Side], round_index: int) -> list[Side]:
    return sides if round_index % 2 == 0 else sides[::-1]


GUEST_METRICS = {"stdout_mb_s": "stdout MB/s", "stdin_mb_s": "stdin MB/s",
                 "exec_true_ms": "run(['true']) ms", "python3_print_ms": "warm python3 -c 'print(1)' ms"}
HANDOUTS = (("take", "TakeVM"), ("kata", "GetBaseVM, Trio client"), ("grpcio", "GetBaseVM, grpcio"))


def run_phase(sides: list[Side], mode: str, rounds: int, handouts: int, samples: Samples,
              guest: dict[str, int] | None) -> None:
    """Start each side's ``mode`` daemon, measure interleaved, stop them."""
    for side in sides:
        side.start_daemon(mode)
    try:
        log(f"{mode} mode: filling both caches")
        for side in sides:
            side.call({"op": "full", "endpoint": side.endpoint(mode), "count": CACHE})
        if mode == "snapshot":  # the first fill is plain boots; only restored VMs from here on
            for side in sides:
                settle(sides, [mode])
                side.call({"op": "cycle", "endpoint": side.endpoint(mode), "count": CACHE})
        for index in range(rounds):
            log(f"{mode} mode: round {index + 1} of {rounds}")
            if guest is not None:
                for side in order(sides, index):
                    settle(sides, [mode])
                    result = side.call({"op": "guest", "endpoint": side.endpoint(mode),
                                        "count": CACHE, **guest})
                    for metric, values in result.items():
                        samples.add(f"guest: {GUEST_METRICS[metric]}", side.name, values)
            for _ in range(handouts):
                for kind, label in HANDOUTS:
                    for side in order(sides, index):
                        settle(sides, [mode])
                        ms = side.call({"op": "handout", "endpoint": side.endpoint(mode),
                                        "count": CACHE, "kind": kind})
                        samples.add(f"{mode}: {label} ms", side.name, [ms])
    finally:
        for side in sides:
            if mode in side.daemons:
                side.stop_daemon(mode)


def run_agent_host(sides: list[Side], rounds: int, size_mb: int, samples: Samples) -> None:
    for index in range(rounds):
        log(f"agent on the host: round {index + 1} of {rounds}")
        for side in order(sides, index):
            for name, value in side.agent_host(size_mb).items():
                samples.add(f"agent on host: {name}", side.name, [value])


def higher_is_better(metric: str) -> bool:
    return "MB/s" in metric


def summarise(samples: Samples) -> dict[str, Any]:
    """Per metric and side: the median (what the issue compares) and the best sample (the
    highest MB/s, the lowest ms: on a shared machine noise only ever slows a run down, so
    the best of several is the steadiest estimate of what the code can do), and the ratios."""
    out: dict[str, Any] = {}
    for metric, per_side in samples.data.items():
        entry: dict[str, Any] = {}
        best = max if higher_is_better(metric) else min
        for side in SIDES:
            values = per_side[side]
            if values:
                entry[side] = {"n": len(values), "p50": statistics.median(values), "best": best(values),
                               "min": min(values), "max": max(values),
                               "round_medians": samples.rounds[metric][side], "samples": values}
        if all(side in entry for side in SIDES) and entry["before"]["p50"] and entry["before"]["best"]:
            entry["after_over_before"] = entry["after"]["p50"] / entry["before"]["p50"]
            entry["best_after_over_before"] = entry["after"]["best"] / entry["before"]["best"]
        out[metric] = entry
    return out


def table(results: dict[str, Any], before: str, after: str) -> str:
    rows = [("", f"before {before}", f"after {after}", "after/before", "best before", "best after",
             "after/before", "n")]
    for metric, entry in results.items():
        def cell(side: str, key: str, entry: dict[str, Any] = entry) -> str:
            return f"{entry[side][key]:.2f}" if side in entry else "-"

        def ratio(key: str, entry: dict[str, Any] = entry) -> str:
            return f"{entry[key]:.3f}" if key in entry else "-"
        n = "/".join(str(entry[side]["n"]) if side in entry else "0" for side in SIDES)
        rows.append((metric, cell("before", "p50"), cell("after", "p50"), ratio("after_over_before"),
                     cell("before", "best"), cell("after", "best"), ratio("best_after_over_before"), n))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(widths[0]) if column == 0 else cell.rjust(widths[column])
                                      for column, cell in enumerate(row)) for row in rows)


def resolve(rev: str) -> str:
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True, timeout=30)
    if found.returncode:
        raise SystemExit(f"compare: {rev!r} names no commit in {ROOT}")
    return found.stdout.strip()


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the clean-up below runs either way."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision measured as before")
    parser.add_argument("--after", required=True, help="git revision measured as after")
    parser.add_argument("--rounds", type=int,
                        help="rounds of each part (default 5, boot mode 6; --quick 3, boot mode 2)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, 100 MB transfers, 2 boot-mode rounds (about 3 minutes)")
    parser.add_argument("--name", help="names bench/results/compare-NAME.json (default BEFORE-AFTER)")
    parser.add_argument("--image-from", type=Path, default=Path("/var/lib/vmcache"),
                        help="the data directory whose image each side copies (default %(default)s)")
    parser.add_argument("--no-boot-mode", action="store_true", help="skip the boot-mode hand-outs")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    # A boot-mode hand-out costs a cold boot's refill (about 5 s) before the next one.
    boot_rounds = args.rounds or (2 if args.quick else 6)
    guest = {"size": (100 if args.quick else 200) * 1_000_000, "true_runs": 30, "python_runs": 5}
    agent_mb = 100 if args.quick else 200
    revs = {"before": resolve(args.before), "after": resolve(args.after)}
    name = args.name or f"{args.before}-{args.after}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    output = ROOT / "bench" / "results" / f"compare-{name}.json"

    qemu_at_start = set(qemu_processes())
    work = Path(tempfile.mkdtemp(prefix="vmcache-compare-", dir="/tmp"))
    work.chmod(0o711)
    started = time.monotonic()
    sides: list[Side] = []
    samples = Samples()
    failure: BaseException | None = None
    try:
        with terminate_cleanly():
            for side_name in SIDES:
                side = Side(side_name, revs[side_name], work, sys.executable)
                sides.append(side)
                log(f"{side_name}: worktree at {revs[side_name][:12]}, image")
                side.checkout()
                side.build_image(args.image_from)
                side.start_worker()
            run_phase(sides, "snapshot", rounds, 3 if args.quick else 4, samples, guest)
            run_agent_host(sides, 2 * rounds, agent_mb, samples)
            if not args.no_boot_mode:
                run_phase(sides, "boot", boot_rounds, 1, samples, None)
    except BaseException as error:  # reported once everything is cleaned up
        failure = error
    finally:
        for side in sides:
            try:
                side.close()
            except Exception as error:  # the rest must still be cleaned up
                log(f"{side.name}: clean-up: {error}")
        for side in sides:
            if side.tree.exists():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(side.tree)],
                               check=False, timeout=120)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    left = {pid: argv for pid, argv in qemu_processes().items() if pid not in qemu_at_start}
    ours = sorted(pid for pid, argv in left.items() if str(work).encode() in argv)
    if failure is not None:
        log(f"failed: {type(failure).__name__}: {failure}")
        for side in sides:
            log(f"{side.name} worker log:\n{tail(side.home / 'worker.log')}")
    if left:
        log(f"QEMU processes left: {sorted(left)} ({len(ours)} of them ours, naming {work})")
    if failure is not None:
        return 1

    results = summarise(samples)
    report = {
        "before": {"rev": revs["before"], "asked": args.before, **sides[0].image},
        "after": {"rev": revs["after"], "asked": args.after, **sides[1].image},
        "settings": {"rounds": rounds, "boot_rounds": 0 if args.no_boot_mode else boot_rounds,
                     "cache": CACHE, **guest, "agent_host_mb": agent_mb,
                     "agent_host_rounds": 2 * rounds, "quick": args.quick},
        "machine": {"cores": os.cpu_count(), "accel": "tcg", "python": platform.python_version(),
                    "kernel": platform.release(), "date": time.strftime("%Y-%m-%d")},
        "duration_s": time.monotonic() - started,
        "leaked_qemu_processes": len(left),
        "results": results,
    }
    print(f"vmcache before/after: {args.before} ({revs['before'][:12]}) vs {args.after} "
          f"({revs['after'][:12]}), {rounds} rounds, {report['duration_s']:.0f} s")
    print("p50 = median of all samples, best = highest MB/s or lowest ms; "
          "MB/s: higher is better, ms: lower is better")
    print(table(results, revs["before"][:10], revs["after"][:10]))
    print(f"QEMU processes left behind: {len(left)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"(every sample written to {output})")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
