"""Developer sessions. `scripts/test` runs lint, typecheck and tests with --no-venv."""

from __future__ import annotations

import nox
from nox.virtualenv import PassthroughEnv

nox.options.sessions = ["lint", "typecheck", "soak", "chaos", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, *packages: str) -> None:
    """Install into the session's venv; with --no-venv the caller's env already has it."""
    if not isinstance(session.virtualenv, PassthroughEnv):
        session.install(*packages)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite: unit tests plus real QEMU guests, a real daemon, real gRPC."""
    _install(session, "-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """120 get/exec/stop cycles against a real daemon; fails on any leaked or lost VM, fd, dir.
    (200 or more by hand: ``nox -s soak -- --cycles 200``; CI's 25 minutes are nearly spent.)"""
    _install(session, "-e", ".")
    session.run("python", "tests/soak.py", "--cycles", "120", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """200 rounds of clients of every kind killed at random moments, VMs and the daemon too;
    fails on any lost or leaked VM, fd, run directory, or a traceback in any output. (CI's
    time is 25 minutes: 200 rounds, about 130 s, fit beside the E2B SDK tests; run
    ``nox -s chaos -- --rounds 300`` or more by hand.)"""
    _install(session, "-e", ".[test]")
    session.run("python", "tests/chaos.py", "--rounds", "200", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    _install(session, "ruff")
    session.run("ruff", "check", "src", "tests", "bench", "noxfile.py", "scripts")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package (trio's own inline types; no trio-typing)."""
    _install(session, "-e", ".[dev]")
    session.run("mypy")


@nox.session
def scale(session: nox.Session) -> None:
    """10, 50 and 100 cached VMs, paused and running: memory, CPU, hand-out latency (not in CI)."""
    _install(session, "-e", ".[bench]")
    session.run("python", "bench/scale.py", *session.posargs)


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate src/vmcache/_proto from protos/cache.proto (commit the result)."""
    _install(session, "-e", ".[test]")
    session.run("python", "scripts/gen_proto.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Cold vs warm, side by side (see bench/README.md)."""
    _install(session, "-e", ".")
    session.run("python", "bench/bench.py", *session.posargs)
