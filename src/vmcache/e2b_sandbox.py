"""E2B sandboxes: one sandbox is one vmcache hand-out, with what E2B keeps beside it.

:class:`SandboxRuntime` is what envd's and the code interpreter's handlers see of a sandbox:
its id, its envVars, the daemon's own connection to its agent, per-sandbox services, and tasks
that live exactly as long as it does.

:class:`SandboxManager` makes them: a create takes a VM from the pool its template names through
the daemon's own hand-out path (:class:`VMSource`, which the daemon implements: the same lease,
growth, network policy defaults and quota as ``TakeVM``) and claims it in the ledger with the
sandbox's ``timeout`` as its TTL; from then on the ledger answers for the VM (TTL, kill,
``vmcache stop``, a crash) and the sandbox ends when the VM is gone, whatever the reason. The
sandbox id is the VM's id, so ``vmcache status`` and ``vmcache stop`` name the same thing.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import trio

from . import safefile
from .agent_client import AgentConnection
from .config import DEFAULT_POOL
from .errors import ConfigError, QuotaReachedError, VMGoneError
from .guest_api import Guest
from .ledger import HandedOut
from .paths import make_private_dir

log = logging.getLogger("vmcache.e2b.sandbox")

T = TypeVar("T")


class SandboxRuntime(Protocol):
    """One live sandbox as envd's and the code interpreter's handlers use it."""

    @property
    def id(self) -> str:
        """The sandbox id (``sandboxID``)."""
        ...

    @property
    def envs(self) -> Mapping[str, str]:
        """The ``envVars`` given at create: every command's environment starts from them."""
        ...

    async def agent(self) -> AgentConnection:
        """The daemon's connection to the sandbox's guest agent (opened once, shared)."""
        ...

    def service(self, kind: type[T]) -> T:
        """Per-sandbox state: ``kind(self)``, made on first use and kept for the sandbox's life."""
        ...

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` as long as the sandbox lives (processes outliving a stream,
        watchers, kernels): it is cancelled when the sandbox ends."""
        ...

    @property
    def ended(self) -> trio.Event:
        """Set once the sandbox ended (killed, its TTL passed, its VM gone)."""
        ...


# ---------------------------------------------------------------- the runtime

#: The envd version vmcache's envd speaks as: the SDK gates features on it (>= 0.3.0 stdin,
#: >= 0.4.0 default user, >= 0.5.2 CloseStdin, >= 0.5.7 octet-stream uploads).
ENVD_VERSION = "0.5.7"
#: Templates that are the default pool (E2B's base image and the code interpreter's).
DEFAULT_TEMPLATES = frozenset({"base", "code-interpreter-v1"})
#: What ``clientID`` says (E2B's names the node; vmcache has one).
CLIENT_ID = "vmcache"
#: The longest ``timeout`` (seconds) a sandbox may be given: E2B's own cap for a Pro team.
MAX_TIMEOUT = 24 * 3600
#: The most envVars / metadata entries, and the longest key and value, a sandbox keeps.
MAX_ENTRIES = 256
MAX_KEY = 256
MAX_VALUE = 16 * 1024
#: The most sandboxes served at once (each holds one VM: the pools bound them long before).
MAX_SANDBOXES = 4096
#: How long a create waits for a VM of its pool: well under the SDK's own request timeout
#: (60 s), so that a VM that becomes ready is claimed for a client still waiting, not for one
#: that gave up (a client that closes its connection cancels the wait at once, too).
CREATE_WAIT = 40.0
#: The subdirectory of the daemon's state directory holding one E2B record per sandbox.
RECORDS_DIR = "e2b"
_ID_RE = re.compile(r"^[0-9a-f]{1,64}$")


def valid_sandbox_id(text: str) -> bool:
    """Whether ``text`` can be a sandbox id (a VM id: lower-case hex)."""
    return bool(_ID_RE.match(text))


class SandboxState(enum.Enum):
    """Where a sandbox is in its life (its transitions are :data:`_TRANSITIONS`)."""

    #: Made; its task nursery does not run yet (tasks asked for now wait in ``_early``).
    STARTING = "starting"
    #: Serving calls; its tasks run.
    LIVE = "live"
    #: A kill is under way: no call is served, no task started, its tasks are cancelled.
    STOPPING = "stopping"
    #: Its VM is gone (its TTL, a kill, ``vmcache stop``, a crash); nothing of it is left.
    ENDED = "ended"
    #: The daemon stopped: its tasks are cancelled but its VM lives on, claimed, for the next
    #: daemon to serve again (a new Sandbox then).
    DETACHED = "detached"


_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.STARTING: frozenset({SandboxState.LIVE, SandboxState.STOPPING, SandboxState.ENDED,
                                      SandboxState.DETACHED}),
    SandboxState.LIVE: frozenset({SandboxState.STOPPING, SandboxState.ENDED, SandboxState.DETACHED}),
    SandboxState.STOPPING: frozenset({SandboxState.ENDED, SandboxState.DETACHED}),
    SandboxState.ENDED: frozenset(),
    SandboxState.DETACHED: frozenset(),
}


@attrs.define(eq=False)
class Sandbox:
    """One E2B sandbox: a claimed hand-out (``entry``), and what E2B keeps beside it.

    Lives until its VM is gone for any reason (its TTL passed, a kill, ``vmcache stop``, a
    crash); then its tasks are cancelled, the daemon's agent connection closed and
    :attr:`ended` set. An SDK client that goes away changes nothing."""

    entry: HandedOut
    template_id: str
    envs_: dict[str, str]
    metadata: dict[str, str]
    started_at: float  # Unix time
    access_token: str
    traffic_token: str
    guest: Guest
    alias: str | None = None
    _services: dict[type, object] = attrs.Factory(dict)
    _nursery: trio.Nursery | None = None
    _ended: trio.Event = attrs.Factory(trio.Event)
    state: SandboxState = SandboxState.STARTING
    #: Tasks asked for before the sandbox's nursery ran.
    _early: list[tuple[Callable[..., Awaitable[object]], tuple[object, ...]]] = attrs.Factory(list)

    @property
    def id(self) -> str:
        return self.entry.id

    def _move(self, to: SandboxState) -> bool:
        """Go to state ``to`` if the table allows it from here: True if it did."""
        if to not in _TRANSITIONS[self.state]:
            return False
        self.state = to
        return True

    @property
    def envs(self) -> Mapping[str, str]:
        return self.envs_

    @property
    def ended(self) -> trio.Event:
        return self._ended

    @property
    def end_at(self) -> float:
        """Unix time the TTL ends (the ledger's), or the start if it has none."""
        return self.entry.expires_at or self.started_at

    @property
    def alive(self) -> bool:
        """Whether the sandbox serves calls: its VM runs and nobody asked it to stop (a kill
        under way, its TTL passed: the API already answers 404 for it, as E2B does)."""
        return (self.state in (SandboxState.STARTING, SandboxState.LIVE) and self.entry.alive
                and self.entry.life.stop is None)

    @property
    def cpu_count(self) -> int:
        return self.entry.handle.cpu

    @property
    def memory_mb(self) -> int:
        return self.entry.handle.memory

    async def agent(self) -> AgentConnection:
        if not self.alive:
            raise VMGoneError(f"sandbox {self.id} has ended")
        return await self.guest.connection()

    def service(self, kind: type[T]) -> T:
        found = self._services.get(kind)
        if found is None:
            found = self._services[kind] = kind(self)  # type: ignore[call-arg]
        return found  # type: ignore[return-value]

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if not self.alive:  # ended, or its VM's stop was asked: no new task
            raise VMGoneError(f"sandbox {self.id} has ended")
        if self._nursery is None:
            self._early.append((fn, args))
        else:
            self._nursery.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """A sandbox task: its failure is logged, it never ends the sandbox or the daemon."""
        try:
            await fn(*args)
        except Exception as error:
            if not self.alive or self.entry.life.stop is not None:
                # Its VM is being stopped (a kill, the TTL): the agent's connection closing
                # under a task is how that looks from here.
                log.debug("a task of sandbox %s ended with its VM: %s: %s", self.id,
                          type(error).__name__, error)
            else:
                log.warning("a task of sandbox %s failed: %s: %s", self.id, type(error).__name__,
                            error, exc_info=error)

    def check_access_token(self, token: str | None) -> bool:
        """Whether ``token`` is the sandbox's envdAccessToken (compared in constant time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.access_token.encode())

    def check_traffic_token(self, token: str | None) -> bool:
        """Whether ``token`` is the sandbox's trafficAccessToken (constant time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.traffic_token.encode())

    def record(self) -> dict[str, object]:
        """What is persisted so that a restarted daemon serves the sandbox again."""
        return {"sandboxID": self.id, "templateID": self.template_id, "alias": self.alias,
                "envVars": self.envs_, "metadata": self.metadata, "startedAt": self.started_at,
                "envdAccessToken": self.access_token, "trafficAccessToken": self.traffic_token}


class VMSource(Protocol):
    """What sandboxes need of the daemon: its hand-out path and its ledger."""

    @property
    def pool_names(self) -> Sequence[str]: ...

    async def hand_out_claimed(self, pool: str, *, ttl: float, wait: float) -> HandedOut:
        """A VM of ``pool`` taken from the cache (waiting at most ``wait`` s for one) and
        claimed in the ledger with ``ttl`` (s); a cancelled wait claims nothing."""
        ...

    def set_ttl(self, entry: HandedOut, ttl: float) -> None:
        """The VM's TTL is now ``ttl`` seconds from now."""
        ...

    async def stop(self, entry: HandedOut) -> None:
        """Stop the VM (an E2B kill) and wait until it is gone."""
        ...

    def ledger_entry(self, vm_id: str) -> HandedOut | None:
        """The ledger's entry of ``vm_id`` (a claimed VM adopted at start, for one)."""
        ...


class SandboxManager:
    """The sandboxes of one daemon: create, find, kill, extend; each watched by a task.

    A daemon's stop cancels :meth:`run`, which ends no VM: sandboxes are claimed hand-outs
    and live on as every claimed VM does. Each sandbox's E2B record (id, template, envVars,
    metadata, tokens) is kept, 0600, in ``records_dir``; the next daemon adopts the claimed
    VMs of the ledger and, with these records, serves their sandboxes again. A record whose
    VM is not in the ledger is removed. Records are read (and pruned) only by a daemon that
    serves E2B: one run with ``[e2b]`` off leaves them as they are (small, 0600, one a
    sandbox), and the next one with it on serves what is still claimed and forgets the rest.
    """

    def __init__(self, source: VMSource, records_dir: Path | None,
                 pools_by_template: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.records_dir = records_dir
        self._pools_by_template = dict(pools_by_template or {})
        self._sandboxes: dict[str, Sandbox] = {}
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------------------------- lookups

    def pool_for(self, template: str) -> str | None:
        """The pool a template id names (None: no such template)."""
        if template in self._pools_by_template:
            return self._pools_by_template[template]
        if template in DEFAULT_TEMPLATES:
            return DEFAULT_POOL
        if template in self.source.pool_names:
            return template
        return None

    def get(self, sandbox_id: str) -> Sandbox | None:
        """The live sandbox ``sandbox_id``, or None."""
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None or not sandbox.alive:
            return None
        return sandbox

    def sandboxes(self) -> list[Sandbox]:
        """Every live sandbox, oldest first."""
        return sorted((s for s in self._sandboxes.values() if s.alive), key=lambda s: (s.started_at, s.id))

    # ---------------------------------------------------------------- life

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch sandboxes until cancelled (adopting those a previous daemon's records name)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for record in await self._read_records():
                    self._adopt(record)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def create(self, template: str, *, timeout: float, envs: Mapping[str, str],
                     metadata: Mapping[str, str], alias: str | None = None) -> Sandbox:
        """A new sandbox of ``template`` whose VM stops ``timeout`` s from now. Raises
        :class:`KeyError` for an unknown template; the daemon's own errors otherwise."""
        pool = self.pool_for(template)
        if pool is None:
            raise KeyError(template)
        if self._nursery is None:
            raise VMGoneError("the E2B sandboxes are not being served (the daemon is stopping)")
        if len(self._sandboxes) >= MAX_SANDBOXES:
            raise QuotaReachedError(f"{MAX_SANDBOXES} sandboxes run already, the most one daemon serves")
        entry = await self.source.hand_out_claimed(pool, ttl=timeout, wait=CREATE_WAIT)
        # From here the VM is claimed: it is the sandbox's, whatever happens to the client.
        if self._nursery is None:  # the daemon began to stop while we waited
            with trio.CancelScope(shield=True):
                await self.source.stop(entry)
            raise VMGoneError("the E2B sandboxes are not being served (the daemon is stopping)")
        sandbox = self._make(entry, template, dict(envs), dict(metadata), time.time(),
                             secrets.token_urlsafe(32), secrets.token_urlsafe(32), alias)
        with trio.CancelScope(shield=True):
            await self._write_record(sandbox)
        log.info("E2B sandbox %s (template %s, pool %s) created; it ends in %g s",
                 sandbox.id, template, pool, timeout)
        return sandbox

    def _make(self, entry: HandedOut, template: str, envs: dict[str, str], metadata: dict[str, str],
              started_at: float, token: str, traffic: str, alias: str | None) -> Sandbox:
        guest = Guest(entry.id, Path(entry.handle.run_dir), is_running=lambda: entry.alive,
                      wait_stopped=entry.gone.wait, ports=entry.handle.agent_ports)
        sandbox = Sandbox(entry, template, envs, metadata, started_at, token, traffic, guest, alias)
        self._sandboxes[sandbox.id] = sandbox
        assert self._nursery is not None
        self._nursery.start_soon(self._live, sandbox, name=f"vmcache e2b sandbox {sandbox.id}")
        return sandbox

    async def _live(self, sandbox: Sandbox) -> None:
        """Run the sandbox's tasks until its VM is gone; then end it."""
        try:
            async with trio.open_nursery() as nursery:
                sandbox._nursery = nursery
                sandbox._move(SandboxState.LIVE)  # unless a kill came first
                for fn, args in sandbox._early:
                    nursery.start_soon(sandbox._guarded, fn, *args)
                sandbox._early.clear()
                await sandbox.entry.gone.wait()
                nursery.cancel_scope.cancel()
            # Here too when a kill cancelled the tasks (only the daemon's stop raises out).
            sandbox._nursery = None
            await sandbox.entry.gone.wait()
        finally:
            sandbox._nursery = None
            gone = sandbox.entry.gone.is_set()
            sandbox._move(SandboxState.ENDED if gone else SandboxState.DETACHED)
            if gone:
                self._sandboxes.pop(sandbox.id, None)
                log.info("E2B sandbox %s ended: %s", sandbox.id, sandbox.entry.stop_reason or "its VM exited")
            with trio.CancelScope(shield=True):
                await sandbox.guest.aclose()
                if gone:
                    await self._remove_record(sandbox.id)
                    sandbox._ended.set()  # last: a kill returns with nothing of it left

    async def kill(self, sandbox: Sandbox) -> None:
        """Stop the sandbox's VM and wait until it (and the sandbox) ended. Its tasks are
        cancelled first, so that none of them sees its guest vanish under it."""
        sandbox._move(SandboxState.STOPPING)
        if sandbox._nursery is not None:
            sandbox._nursery.cancel_scope.cancel()
        await self.source.stop(sandbox.entry)
        with trio.move_on_after(5):
            await sandbox.ended.wait()

    async def set_timeout(self, sandbox: Sandbox, timeout: float) -> None:
        """The sandbox now ends ``timeout`` s from now (shorter or longer: E2B's semantics)."""
        self.source.set_ttl(sandbox.entry, timeout)
        await trio.lowlevel.checkpoint()

    # ---------------------------------------------------------------- records

    async def _write_record(self, sandbox: Sandbox) -> None:
        if self.records_dir is None:
            return
        directory, data = self.records_dir, json.dumps(sandbox.record()).encode()
        try:
            await trio.to_thread.run_sync(_write_record_file, directory, sandbox.id, data)
        except OSError as error:
            log.error("cannot keep the E2B record of sandbox %s in %s (a restarted daemon will not "
                      "serve it): %s", sandbox.id, directory, error.strerror)

    async def _remove_record(self, sandbox_id: str) -> None:
        if self.records_dir is None:
            return
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(safefile.remove, self.records_dir, f"{sandbox_id}.json")

    async def _read_records(self) -> list[dict[str, Any]]:
        if self.records_dir is None:
            return []
        return await trio.to_thread.run_sync(_read_record_files, self.records_dir)

    def _adopt(self, record: dict[str, Any]) -> None:
        """Serve again a sandbox a previous daemon created, if its VM is a claimed VM of the
        ledger; forget its record otherwise. A record is ours but checked all the same."""
        sandbox_id = record.get("sandboxID")
        entry = self.source.ledger_entry(sandbox_id) if isinstance(sandbox_id, str) else None
        try:
            if entry is None or not entry.alive:
                raise ValueError("its VM is gone")
            envs, metadata = record.get("envVars"), record.get("metadata")
            template, started = record.get("templateID"), record.get("startedAt")
            token, traffic = record.get("envdAccessToken"), record.get("trafficAccessToken")
            if not (isinstance(envs, dict) and isinstance(metadata, dict) and isinstance(template, str)
                    and isinstance(started, int | float) and isinstance(token, str)
                    and isinstance(traffic, str)
                    and all(isinstance(v, str) for v in [*envs.values(), *metadata.values()])):
                raise ValueError("the record is not what vmcache writes")
        except ValueError as why:
            log.info("forgetting the E2B record of sandbox %s: %s", str(sandbox_id)[:64], why)
            if isinstance(sandbox_id, str) and valid_sandbox_id(sandbox_id) and self.records_dir:
                with contextlib.suppress(OSError):
                    safefile.remove(self.records_dir, f"{sandbox_id}.json")
            return
        alias = record.get("alias")
        self._make(entry, template, envs, metadata, float(started), token, traffic,
                   alias if isinstance(alias, str) else None)
        log.info("serving E2B sandbox %s again (adopted from a previous daemon)", sandbox_id)


def _write_record_file(directory: Path, sandbox_id: str, data: bytes) -> None:
    make_private_dir(directory)
    safefile.write_atomic(directory, f"{sandbox_id}.json", data, mode=0o600)


def _read_record_files(directory: Path) -> list[dict[str, Any]]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ConfigError(f"cannot read the E2B sandbox records in {directory}: "
                          f"{error.strerror or error}; make it a directory the daemon's user "
                          "owns and can read, or remove it") from None
    records = []
    for name in names[:MAX_SANDBOXES]:
        stem = name.removesuffix(".json")
        if stem == name or not valid_sandbox_id(stem):
            continue
        data = safefile.read_small(directory, name, file_owner=os.getuid())
        try:
            value = json.loads(data) if data is not None else None
        except ValueError:
            value = None
        if isinstance(value, dict) and value.get("sandboxID") == stem:
            records.append(value)
        else:
            with contextlib.suppress(OSError):
                safefile.remove(directory, name)
    return records
