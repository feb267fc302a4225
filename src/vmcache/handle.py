"""A handed-out VM: the JSON handle its new owner gets, and what the owner can do with it.

The handle names the QEMU process (pid *and* start time, so a reused pid is
never taken for the VM), its QMP and agent sockets and its run directory. The
owner can run commands through the agent and stop the VM; the VM is not the
owner's child process, so it is watched and signalled through a pidfd.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import attrs
import cattrs
import trio

from ._unix import connect_when_ready
from .agent import AgentClient
from .agent_protocol import ExecResult
from .errors import AgentError, VmcacheError, VMGoneError
from .process import PidfdProcess, stop_process
from .qmp import QMPClient

CONNECT_TIMEOUT = 10.0
QMP_TIMEOUT = 3.0


@attrs.define(eq=False)
class VMHandle:
    """A VM that belongs to whoever holds this handle.

    ``str(handle)`` / :meth:`to_json` is the JSON that ``vmcache get`` prints;
    :meth:`from_json` reads it back. ``async with handle:`` stops the VM on the
    way out.
    """

    id: str
    pid: int
    start_time: int
    qmp_socket: str
    agent_socket: str
    console_log: str
    run_dir: str
    cpu: int
    memory: int
    accel: str = ""
    image: str = ""
    boot_id: str = ""
    _agent: AgentClient | None = attrs.field(default=None, init=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _CONVERTER.unstructure(self)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMHandle:
        try:
            return _CONVERTER.structure(data, cls)
        except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as error:
            raise VmcacheError(f"not a VM handle: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> VMHandle:
        try:
            data = json.loads(text)
        except ValueError:
            raise VmcacheError("not a VM handle: the text is not JSON") from None
        if not isinstance(data, dict):
            raise VmcacheError("not a VM handle: expected a JSON object")
        return cls.from_dict(data)

    def is_running(self) -> bool:
        """True while the VM's QEMU process (this pid with this start time) is alive."""
        process = PidfdProcess(self.pid, self.start_time)
        try:
            return process.returncode is None
        finally:
            process.close()

    async def _connected_agent(self) -> AgentClient:
        if self._agent is None:
            if not self.is_running():
                raise VMGoneError(f"VM {self.id} is not running (pid {self.pid} has exited)")
            with trio.move_on_after(CONNECT_TIMEOUT):
                stream = await connect_when_ready(Path(self.agent_socket), still_starting=self.is_running)
                self._agent = AgentClient(stream)
            if self._agent is None:
                raise AgentError(f"could not connect to VM {self.id}'s agent within {CONNECT_TIMEOUT:g} s")
        return self._agent

    async def exec(self, argv: list[str], timeout: int = 0) -> ExecResult:
        """Run ``argv`` in the guest and return its exit status, stdout and stderr."""
        try:
            agent = await self._connected_agent()
        except OSError as error:
            raise VMGoneError(f"VM {self.id} cannot be reached: {error.strerror}") from None
        try:
            return await agent.exec(argv, timeout)
        except AgentError:
            await self._close_agent()
            if not self.is_running():
                raise VMGoneError(f"VM {self.id} stopped while running the command") from None
            raise

    async def ping(self) -> str:
        agent = await self._connected_agent()
        return await agent.ping()

    async def disconnect(self) -> None:
        """Close the connection to the agent (the VM keeps running)."""
        await self._close_agent()

    async def _close_agent(self) -> None:
        if self._agent is not None:
            with trio.CancelScope(shield=True):
                await self._agent.aclose()
            self._agent = None

    async def stop(self) -> None:
        """Stop the VM: QMP quit, then SIGTERM, then SIGKILL (bounded); remove its run directory.

        Raises :class:`VMGoneError` if the VM was not running any more.
        """
        await self._close_agent()
        process = PidfdProcess(self.pid, self.start_time)
        try:
            if process.returncode is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                raise VMGoneError(f"VM {self.id} is not running (already stopped, or it died)")

            async def polite_quit() -> None:
                with trio.move_on_after(QMP_TIMEOUT):
                    try:
                        stream = await connect_when_ready(Path(self.qmp_socket),
                                                          still_starting=lambda: False)
                    except OSError:
                        return  # no monitor to ask: the signals follow
                    qmp = await QMPClient.negotiate(stream)
                    try:
                        await qmp.execute("quit")
                    finally:
                        await qmp.aclose()

            await stop_process(process, polite_quit)
        finally:
            process.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def aclose(self) -> None:
        """Stop the VM if it is still running (what ``async with`` does on exit)."""
        try:
            await self.stop()
        except VMGoneError:
            pass

    async def __aenter__(self) -> VMHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


_CONVERTER = cattrs.Converter()
