"""The E2B listener: one HTTP/1.1 address for the control plane and every sandbox's envd.

With ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` both pointing here, the SDK sends everything to
this one address; a request is routed on its headers:

- no ``E2b-Sandbox-Id``: the control plane (:mod:`vmcache.e2b_api`, ``X-API-KEY``);
- ``E2b-Sandbox-Id`` of no live sandbox: 502 saying it "was not found", what E2B's proxy
  answers (the SDK raises SandboxNotRunningException for it; ``is_running()`` is False);
- ``E2b-Sandbox-Port: 49983``: envd (``X-Access-Token`` must be the sandbox's envdAccessToken,
  401 otherwise): Connect procedures (``register_envd``), ``GET/POST /files``
  (``handle_files``) and ``GET /health`` (204 while the agent answers a ping, 502 otherwise);
- ``49999``: the code interpreter (``handle_code``), which takes the envdAccessToken or the
  trafficAccessToken (the SDK sends only the latter on its ``/contexts`` calls);
- any other port: 502 "port is not open", as E2B's proxy says of a port nothing listens on.

The user a call runs as comes from ``Authorization: Basic base64("user:")`` ("user" without).
envd's and the code interpreter's modules are imported when first needed: a module missing
answers ``unimplemented`` (501) instead of failing the listener.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import trio

from .e2b_api import ControlPlane, SandboxProvider
from .e2b_connect import CallContext, ConnectError, ConnectRouter, parse_timeout
from .e2b_http import (
    Headers,
    HttpError,
    HttpLimits,
    HttpRequest,
    HttpResponse,
    json_response,
    serve_listeners,
)
from .e2b_sandbox import Sandbox
from .errors import AgentError, ConfigError, VMGoneError

log = logging.getLogger("vmcache.e2b")

ENVD_PORT = 49983
CODE_PORT = 49999
#: How long ``GET /health`` waits for the agent's answer to a ping.
HEALTH_TIMEOUT = 3.0
#: The longest user name taken from ``Authorization``.
MAX_USER = 64

SandboxHandler = Callable[[HttpRequest, CallContext], Awaitable[HttpResponse]]


#: The largest api_keys_file read, and the most keys in it.
MAX_KEYS_FILE = 1024 * 1024
MAX_KEY_LENGTH = 512


def load_api_keys(path: str) -> list[str]:
    """The API keys of ``api_keys_file`` (one a line; blank lines and ``#`` comments skipped).

    :class:`ConfigError` (one line) if it is not a regular file, is not owned by root or the
    daemon's uid, can be read or written by its group or others, or holds no key: a key lets
    whoever has it take VMs."""
    where = f"[e2b] api_keys_file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as error:
        raise ConfigError(f"{where}: cannot open it ({error.strerror}); a file of API keys, one "
                          "a line, mode 0600") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"{where}: owned by uid {info.st_uid}; it must be root's or the "
                              f"daemon's (uid {os.geteuid()})")
        if info.st_mode & 0o077:
            raise ConfigError(f"{where}: its group or others may read or write it (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, MAX_KEYS_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEYS_FILE:
        raise ConfigError(f"{where}: over {MAX_KEYS_FILE} bytes; one API key a line")
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text; one API key a line") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for number, key in enumerate(keys, 1):
        if len(key) > MAX_KEY_LENGTH or not key.isprintable() or any(c.isspace() for c in key):
            raise ConfigError(f"{where}: key {number} is not one printable word of at most "
                              f"{MAX_KEY_LENGTH} characters")
    if not keys:
        raise ConfigError(f"{where}: holds no API key; put one a line (for example the output of "
                          "python3 -c 'import secrets; print(\"e2b_\" + secrets.token_hex(20))')")
    return keys


def user_of(headers: Headers) -> str:
    """The E2B user of a call: ``Authorization: Basic base64("NAME:")``; "user" without one."""
    value = headers.get("authorization")
    if not value:
        return "user"
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        raise HttpError(401, "Authorization: only Basic base64(\"USER:\") names a user here")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise HttpError(400, "Authorization: Basic takes base64(\"USER:\")") from None
    user = decoded.partition(":")[0]
    if not 0 < len(user) <= MAX_USER:
        raise HttpError(400, f"Authorization: a user name of 1 to {MAX_USER} characters")
    return user


def _not_found(sandbox_id: str) -> HttpResponse:
    return json_response(502, {"code": 502, "message": f"The sandbox {sandbox_id[:100]} was not found",
                               "sandboxId": sandbox_id[:100]})


def _port_closed(sandbox_id: str, port: str) -> HttpResponse:
    return json_response(502, {"code": 502, "sandboxId": sandbox_id, "port": port[:10],
                               "message": f"The sandbox {sandbox_id} is running but port is not open: "
                                          "vmcache serves envd (49983) and the code interpreter (49999)"})


class E2BServer:
    """Routes every request of the listener (see the module's docstring)."""

    def __init__(self, manager: SandboxProvider, api_keys: Iterable[str]) -> None:
        """``manager``: a :class:`~vmcache.e2b_sandbox.SandboxManager` (tests give a fake whose
        sandboxes have the same methods)."""
        self.manager = manager
        self.api = ControlPlane(manager, api_keys)
        self._router: ConnectRouter | None = None
        self._files: SandboxHandler | None = None
        self._code: SandboxHandler | None = None
        self._loaded = False

    def _load(self) -> None:
        """envd's and the code interpreter's modules, imported on first use (absent: 501)."""
        if self._loaded:
            return
        self._loaded = True
        router = ConnectRouter()
        try:
            envd = importlib.import_module("vmcache.e2b_envd")
        except ImportError as error:
            log.warning("E2B envd calls answer unimplemented: %s", error)
        else:
            envd.register_envd(router)
            self._files = envd.handle_files
        self._router = router
        try:
            self._code = importlib.import_module("vmcache.e2b_code").handle_code
        except (ImportError, AttributeError) as error:
            log.warning("E2B code interpreter calls answer unimplemented: %s", error)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        sandbox_id = request.headers.get("e2b-sandbox-id")
        if sandbox_id is None:
            return await self.api.handle(request)
        sandbox = cast(Sandbox | None, self.manager.get(sandbox_id))
        if sandbox is None:
            return _not_found(sandbox_id)
        try:
            return await self._sandbox_call(request, sandbox)
        except (VMGoneError, AgentError):
            if not sandbox.alive:  # it ended under the call: what E2B's proxy says then
                return _not_found(sandbox.id)
            raise

    async def _sandbox_call(self, request: HttpRequest, sandbox: Sandbox) -> HttpResponse:
        port = (request.headers.get("e2b-sandbox-port") or "").strip()
        token = request.headers.get("x-access-token")
        if port == str(ENVD_PORT):
            if not sandbox.check_access_token(token):
                raise HttpError(401, "X-Access-Token is missing or not this sandbox's envdAccessToken")
            return await self._envd(request, sandbox)
        if port == str(CODE_PORT):
            if not (sandbox.check_access_token(token) or
                    sandbox.check_traffic_token(request.headers.get("e2b-traffic-access-token"))):
                raise HttpError(401, "X-Access-Token or E2B-Traffic-Access-Token is missing or not "
                                     "this sandbox's")
            self._load()
            if self._code is None:
                raise HttpError(501, "vmcache's code interpreter is not installed")
            return await self._code(request, self._context(request, sandbox))
        return _port_closed(sandbox.id, port)

    def _context(self, request: HttpRequest, sandbox: Sandbox) -> CallContext:
        """The call's context; its deadline from ``Connect-Timeout-Ms`` when the request has
        one (the Connect router sets it again for its calls; ``/files`` and the code
        interpreter's requests carry none from the SDKs)."""
        try:
            timeout = parse_timeout(request.headers)
        except ConnectError as error:
            raise HttpError(400, error.message) from None
        return CallContext(sandbox=sandbox, user=user_of(request.headers),
                           deadline=None if timeout is None else trio.current_time() + timeout,
                           headers=request.headers)

    async def _envd(self, request: HttpRequest, sandbox: Sandbox) -> HttpResponse:
        if request.path == "/health":
            if request.method != "GET":
                raise HttpError(405, "GET /health")
            return await self._health(sandbox)
        self._load()
        assert self._router is not None
        context = self._context(request, sandbox)
        if request.path == "/files":
            if self._files is None:
                raise HttpError(501, "vmcache's envd file transfers are not installed")
            return await self._files(request, context)
        return await self._router.handle(request, context)

    async def _health(self, sandbox: Sandbox) -> HttpResponse:
        """204 when the sandbox's agent answers a ping in time; 502 otherwise."""
        with trio.move_on_after(HEALTH_TIMEOUT):
            try:
                agent = await sandbox.agent()
                await agent.ping()
                return HttpResponse(204)
            except (AgentError, VMGoneError, trio.BrokenResourceError) as error:
                if not sandbox.alive:
                    return _not_found(sandbox.id)
                log.info("sandbox %s: its agent did not answer a ping: %s", sandbox.id, error)
        if not sandbox.alive:
            return _not_found(sandbox.id)
        return json_response(502, {"code": 502, "message": f"The sandbox {sandbox.id} is running but "
                                                           "port is not open: its agent does not answer"})


async def serve_e2b(server: E2BServer, host: str, port: int, *, limits: HttpLimits | None = None,
                    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
    """Listen on ``host:port`` for E2B's SDKs until cancelled; ``started`` once it listens.
    An address that cannot be listened on (in use, not this host's) is a one-line
    :class:`ConfigError` naming ``[e2b] listen``."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise ConfigError(f"[e2b] listen {host}:{port}: cannot listen there ({error.strerror or error}); "
                          "pick another port or address") from None
    await serve_listeners(server.handle, listeners, limits=limits, task_status=task_status)
