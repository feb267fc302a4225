"""The error tree without I/O: what a caller sees of a nursery's exception group, the one
table between errors and gRPC statuses (every row both ways), the exports, and the one
wrapper that explains a guest's agent errors."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import pytest
import trio

import vmcache
from vmcache import errors
from vmcache.errors import (
    AgentError,
    CacheError,
    DaemonError,
    HandleError,
    HardwareAccelRequiredError,
    VmcacheError,
    VMDiedError,
    leaves,
    raise_unwrapped,
    unwrap_group,
)
from vmcache.guest_api import GuestAPI
from vmcache.rpc.status import TABLE, Row, error_for, status_for
from vmcache.rpc.transport import Code, RpcStatus


async def a_cancelled() -> trio.Cancelled:
    """A real Cancelled, as a cancelled scope delivers it."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as cancelled:
            return cancelled
    raise AssertionError("not cancelled")


def raised(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What ``except BaseExceptionGroup as group: raise_unwrapped(group)`` lets out."""
    try:
        raise group
    except BaseExceptionGroup as caught:
        try:
            raise_unwrapped(caught)
        except BaseException as out:  # what came out is the point
            return out
    raise AssertionError("raise_unwrapped returned")


def test_one_error_however_nested_is_itself_with_the_group_as_its_context() -> None:
    mine = ValueError("mine")
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [mine])])
    out = raised(group)
    assert out is mine
    assert out.__context__ is group and out.__suppress_context__ and out.__cause__ is None


def test_an_errors_own_cause_and_context_are_kept() -> None:
    first = KeyError("first")
    mine = ValueError("mine")
    mine.__cause__, mine.__context__, mine.__suppress_context__ = first, first, True
    out = raised(ExceptionGroup("g", [mine]))
    assert out is mine and out.__cause__ is first and out.__context__ is first and out.__suppress_context__


async def test_cancelled_is_dropped_beside_an_error_and_kept_alone() -> None:
    mine = OSError("mine")
    first, second = await a_cancelled(), await a_cancelled()
    assert raised(BaseExceptionGroup("g", [first, BaseExceptionGroup("h", [mine, second])])) is mine
    assert raised(BaseExceptionGroup("g", [first, BaseExceptionGroup("h", [second])])) is first


def test_keyboard_interrupt_wins() -> None:
    interrupt = KeyboardInterrupt()
    group = BaseExceptionGroup("g", [ValueError("a"), BaseExceptionGroup("h", [OSError("b"), interrupt])])
    assert raised(group) is interrupt


def test_one_error_from_every_task_is_one_error() -> None:
    # A broken connection fails every task waiting on it with the same error.
    first = AgentError("the connection to the guest agent broke")
    again = [ExceptionGroup("h", [AgentError(str(first))]), AgentError(str(first))]
    group = ExceptionGroup("g", [first, *again])
    assert raised(group) is first


async def test_several_errors_stay_a_group_without_its_cancelled() -> None:
    a, b = ValueError("a"), OSError("b")
    group = BaseExceptionGroup("g", [a, await a_cancelled(), ExceptionGroup("h", [b])])
    out = raised(group)
    assert isinstance(out, BaseExceptionGroup) and out is not group
    assert leaves(out) == [a, b] and out.message == "g"
    plain = ExceptionGroup("g", [a, AgentError("c")])
    assert unwrap_group(plain) is plain
    assert raised(plain) is plain  # nothing dropped: the group itself, unchanged


async def test_a_nursery_owning_context_manager_lets_out_the_callers_error_and_cancellation() -> None:
    class Mine(Exception):
        pass

    async def owning(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                await body(nursery)
        except BaseExceptionGroup as group:
            raise_unwrapped(group)

    async def fail(nursery: trio.Nursery) -> NoReturn:
        raise Mine("the caller's own")

    with pytest.raises(Mine, match="the caller's own"):
        await owning(fail)

    with trio.CancelScope() as outer:
        async def cancel_outer(nursery: trio.Nursery) -> None:
            outer.cancel()
            await trio.sleep_forever()

        await owning(cancel_outer)
    assert outer.cancelled_caught, "the Cancelled that came out is caught by the scope it belongs to"


@pytest.mark.parametrize("row", TABLE, ids=[row.code.name for row in TABLE])
def test_every_row_round_trips(row: Row) -> None:
    for error in (cls("VM 0123: what happened; what to do") for cls in row.daemon):
        status = status_for(error)
        assert status == RpcStatus(row.code, str(error))
        client = error_for(status)
        assert type(client) is row.client and isinstance(client, CacheError)
        assert client.detail == str(error)
        assert str(client) == row.text.format(str(error))
        assert str(error) in str(client)


def test_the_table_is_one_row_per_code_and_names_every_daemon_error() -> None:
    codes = [row.code for row in TABLE]
    assert len(set(codes)) == len(codes)
    named = {cls for row in TABLE for cls in row.daemon}
    daemon_side = {value for value in vars(errors).values()
                   if inspect.isclass(value) and issubclass(value, DaemonError) and value is not DaemonError}
    assert daemon_side <= named
    # Any other vmcache error is FAILED_PRECONDITION, with the daemon's words as the detail.
    for error in (DaemonError("x; do y"), HandleError("x; do y"), HardwareAccelRequiredError("x; do y")):
        assert status_for(error).code == Code.FAILED_PRECONDITION
    assert error_for(status_for(HandleError("bad handle"))).detail == "bad handle"


def test_a_bug_is_internal_and_an_unknown_status_a_plain_cache_error() -> None:
    assert status_for(KeyError("k")) == RpcStatus(Code.INTERNAL, "internal error: KeyError: 'k'")
    client = error_for(RpcStatus(Code.UNIMPLEMENTED, "no method x"))
    assert type(client) is CacheError and str(client) == "the daemon answered UNIMPLEMENTED: no method x"
    assert str(error_for(RpcStatus(Code.INTERNAL))) == "the daemon answered INTERNAL: INTERNAL"


def test_every_error_class_is_exported() -> None:
    classes = {name: value for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, VmcacheError)}
    assert "GuestProcessError" in classes
    for name, cls in classes.items():
        assert name in vmcache.__all__, name
        assert getattr(vmcache, name) is cls


class FakeGuest:
    """A guest whose connection (or whose every call) fails as a broken agent connection."""

    def __init__(self, connection: object) -> None:
        self._connection = connection

    async def connection(self) -> object:
        if self._connection is None:
            raise AgentError("cannot reach the agent")
        return self._connection

    async def explain(self, error: AgentError) -> AgentError:
        return VMDiedError(f"VM x stopped (Kernel panic): {error}")


class Broken:
    """An agent connection on which every call fails."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def fail(*args: object, **kwargs: object) -> Any:
            raise AgentError(f"{name}: the connection broke")
        return fail


class Guested(GuestAPI):
    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest

    def _guest(self) -> Any:
        return self.guest


async def use_file(api: GuestAPI) -> None:
    async with api.open_file("/f"):
        pass


async def use_process(api: GuestAPI) -> None:
    async with api.open_process(["true"]):
        pass


@pytest.mark.parametrize("connection", [None, Broken()], ids=["connecting", "calling"])
async def test_every_guest_call_explains_its_agent_error(connection: object) -> None:
    uses: list[Callable[[GuestAPI], Awaitable[object]]] = [
        lambda api: api.run(["true"]), lambda api: api.write_file("/f", b""),
        lambda api: api.read_file("/f"), lambda api: api.mkdir("/d"), use_file, use_process,
    ]
    for use in uses:
        with pytest.raises(VMDiedError, match=r"stopped \(Kernel panic\)"):
            await use(Guested(FakeGuest(connection)))


def test_a_stop_signal_during_class_creation_is_an_interruption_not_a_bug(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Chaos saw ``vmcache get`` answer a SIGTERM with "unexpected error (a bug ...):
    RuntimeError: Error calling __set_name__ on 'Field' instance '_broken' in 'TLSStream'":
    the signal landed while ``import trio`` created a class, and Python 3.11 wraps what a
    ``__set_name__`` raises."""
    import signal

    from vmcache import cli

    class Field:
        def __set_name__(self, owner: type, name: str) -> None:
            cli._early_signal(signal.SIGTERM, None)  # the handler, as the signal would run it

    def create_a_class() -> None:
        class TLSStream:
            _broken = Field()

    with pytest.raises(SystemExit) as exited:
        cli._exit_for(_raised(create_a_class))
    assert exited.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "vmcache: interrupted (SIGTERM)\n"


def _raised(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("no error")
