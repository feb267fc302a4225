"""The quit -> SIGTERM -> SIGKILL escalation, in virtual time and against a real process."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio
import trio.testing
from conftest import pid_alive
from fakes import FakeProcess

from vmcache.errors import QMPError
from vmcache.process import stop_process


async def test_escalates_to_sigkill_with_each_step_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    process = FakeProcess(dies_of={signal.SIGKILL})
    quits = []

    async def ignored_quit() -> None:
        quits.append(trio.current_time())
        await trio.sleep_forever()

    start = trio.current_time()
    status = await stop_process(process, ignored_quit, quit_grace=3, term_grace=4, kill_grace=5)
    assert status == -signal.SIGKILL
    assert quits == [start]
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]
    assert trio.current_time() - start == 3 + 4


async def test_stops_at_sigterm_when_that_works(autojump_clock: trio.testing.MockClock) -> None:
    process = FakeProcess(dies_of={signal.SIGTERM, signal.SIGKILL})

    async def failing_quit() -> None:
        raise QMPError("monitor closed")

    assert await stop_process(process, failing_quit) == -signal.SIGTERM
    assert process.signals == [signal.SIGTERM]


async def test_cleanup_is_shielded_from_the_cancel_that_triggered_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    process = FakeProcess(dies_of={signal.SIGKILL})
    with trio.CancelScope() as scope:
        scope.cancel()
        status = await stop_process(process, None, term_grace=1, kill_grace=1)
    assert status == -signal.SIGKILL


async def test_a_gives_up_after_kill_grace_without_hanging(autojump_clock: trio.testing.MockClock) -> None:
    process = FakeProcess(dies_of=set())  # a process stuck in the kernel
    start = trio.current_time()
    assert await stop_process(process, None, term_grace=2, kill_grace=3) is None
    assert trio.current_time() - start == 5


async def test_real_process_that_ignores_sigterm_is_killed_and_reaped() -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    process = await trio.lowlevel.open_process([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None
    with trio.fail_after(10):
        assert b"ready" in await process.stdout.receive_some(100)
        status = await stop_process(process, None, term_grace=0.5, kill_grace=5)
    assert status == -signal.SIGKILL
    assert not pid_alive(process.pid)
    await process.stdout.aclose()
