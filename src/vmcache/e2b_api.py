"""E2B's control plane (``X-API-KEY``), answered as E2B's API answers it.

Routes (JSON in and out, E2B's field names):

==========================================  =====  ========================================
``POST /v2/sandboxes``, ``POST /sandboxes``  201   create: a VM of the pool the template names
``GET /v2/sandboxes``                        200   list: ``metadata``/``state`` filters,
                                                   ``limit`` and ``nextToken`` paging
                                                   (``x-next-token`` header)
``GET /sandboxes``                           200   list (E2B's first version: no paging)
``GET /sandboxes/{id}``                      200   get_info
``DELETE /sandboxes/{id}``                   204   kill (404 if not there)
``POST /sandboxes/{id}/timeout``             204   set_timeout: ends ``timeout`` s from now
``POST /sandboxes/{id}/refreshes``           204   keep alive ``duration`` s more (E2B's own)
``POST [/v2]/sandboxes/{id}/connect``        200   connect (a longer ``timeout`` extends it)
==========================================  =====  ========================================

Everything else E2B's API has (pause, resume, metrics, logs, snapshots, fork, network,
templates, volumes, secrets...) is a 501 saying vmcache does not do it. Every error is E2B's
``{"code": status, "message": ...}``; no bad input costs a VM.

A create whose client goes away before the 201 keeps its sandbox: the VM is claimed before the
answer is written and lives its ``timeout`` (a client that sends ``Idempotency-Key`` gets the
same sandbox again when it retries; it is also in the list, and a kill stops it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl

from .e2b_http import HttpError, HttpRequest, HttpResponse, json_response
from .e2b_message import NotJsonObject, parse_json_object
from .e2b_sandbox import (
    CLIENT_ID,
    ENVD_VERSION,
    MAX_ENTRIES,
    MAX_KEY,
    MAX_TIMEOUT,
    MAX_VALUE,
    valid_sandbox_id,
)
from .errors import (
    BadRequestError,
    HardwareAccelRequiredError,
    NotAllowedError,
    NoVMAvailableError,
    QuotaReachedError,
    VmcacheError,
    VMGoneError,
    WaitExpiredError,
)

log = logging.getLogger("vmcache.e2b.api")

#: The largest control-plane request body.
MAX_API_BODY = 1024 * 1024
#: E2B's defaults: a create without ``timeout`` lives 300 s (its API's NewSandbox default,
#: which the Python SDK relies on: it sends none unless given); a list page holds 100 at most.
DEFAULT_TIMEOUT = 300
DEFAULT_LIMIT = 100
MAX_LIMIT = 100
#: The most Idempotency-Keys remembered (each names a live sandbox).
MAX_IDEMPOTENCY_KEYS = 4096

_UNSUPPORTED = {
    "pause": "pausing a sandbox", "resume": "resuming a paused sandbox", "metrics": "sandbox metrics",
    "logs": "sandbox logs", "snapshots": "snapshots", "fork": "forking a sandbox",
    "network": "changing a sandbox's network", "templates": "templates (vmcache's are its pools)",
    "volumes": "volumes", "secrets": "secrets", "teams": "teams", "access-tokens": "access tokens",
    "api-keys": "API keys (they are the api_keys_file's)", "nodes": "nodes",
}


class SandboxInfo(Protocol):
    """What the control plane says of a sandbox."""

    @property
    def id(self) -> str: ...
    template_id: str
    alias: str | None
    metadata: dict[str, str]
    started_at: float
    access_token: str
    traffic_token: str

    @property
    def end_at(self) -> float: ...
    @property
    def cpu_count(self) -> int: ...
    @property
    def memory_mb(self) -> int: ...


class SandboxProvider(Protocol):
    """The sandboxes the control plane manages (vmcache.e2b_sandbox.SandboxManager)."""

    def pool_for(self, template: str) -> str | None: ...
    def get(self, sandbox_id: str) -> SandboxInfo | None: ...
    def sandboxes(self) -> Sequence[SandboxInfo]: ...
    async def create(self, template: str, *, timeout: float, envs: Mapping[str, str],
                     metadata: Mapping[str, str], alias: str | None = None) -> SandboxInfo: ...
    async def kill(self, sandbox: Any) -> None: ...
    async def set_timeout(self, sandbox: Any, timeout: float) -> None: ...


def error(status: int, message: str, *, retry: bool | None = None) -> HttpError:
    """An E2B-style error; ``retry`` says ``Should-Retry`` (the SDK retries a 429 or 503 without
    the header, and never one that says false: a quota or a missing KVM will not pass by
    retrying)."""
    headers = [] if retry is None else [("Should-Retry", "true" if retry else "false")]
    return HttpError(status, message, headers)


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ControlPlane:
    """The REST API of sandboxes, over a :class:`SandboxProvider`."""

    def __init__(self, provider: SandboxProvider, api_keys: Iterable[str]) -> None:
        self.provider = provider
        self._keys = [key.encode() for key in api_keys]
        self._idempotent: dict[str, str] = {}

    def authorized(self, request: HttpRequest) -> bool:
        """Whether the request's ``X-API-KEY`` is one of the keys (constant-time compares)."""
        given = request.headers.get("x-api-key")
        if not given:
            return False
        data = given.encode("latin-1", "replace")
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(data, key)
        return found

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one control-plane request."""
        if not self.authorized(request):
            raise error(401, "Invalid API key, please visit the daemon's api_keys_file to get your "
                             "API key (X-API-KEY)" if request.headers.get("x-api-key")
                        else "Missing X-API-KEY header: set E2B_API_KEY to a key of the daemon's "
                             "api_keys_file")
        parts = [part for part in request.path.split("/") if part]
        version = 1
        if parts and len(parts[0]) <= 3 and parts[0][:1] == "v" and parts[0][1:].isdigit():
            version, parts = int(parts[0][1:]), parts[1:]
        try:
            return await self._route(request, parts, version)
        except VMGoneError:
            # The sandbox ended (a kill, its TTL) while the request was served: it is gone.
            raise error(404, "the sandbox doesn't exist anymore (it was killed or its timeout "
                             "passed)") from None

    async def _route(self, request: HttpRequest, parts: list[str], version: int) -> HttpResponse:
        method = request.method
        if parts[:1] == ["sandboxes"]:
            rest = parts[1:]
            if not rest:
                if method == "POST":
                    return await self.create(request)
                if method == "GET":
                    return self.list(request, paged=version == 2)
                raise _method(method, request.path)
            if len(rest) == 1 and rest[0] in _UNSUPPORTED:
                raise _unsupported(rest[0])
            sandbox_id = rest[0]
            if len(rest) == 1:
                if method == "GET" and version == 1:
                    return self.get_info(sandbox_id)
                if method == "DELETE" and version == 1:
                    return await self.kill(sandbox_id)
                raise _method(method, request.path)
            if len(rest) == 2:
                action = rest[1]
                if action == "connect" and method == "POST":
                    return await self.connect(request, sandbox_id)
                if action == "timeout" and method == "POST" and version == 1:
                    return await self.set_timeout(request, sandbox_id)
                if action == "refreshes" and method == "POST" and version == 1:
                    return await self.refresh(request, sandbox_id)
                if action in _UNSUPPORTED:
                    raise _unsupported(action)
        elif parts[:1] and parts[0] in _UNSUPPORTED:
            raise _unsupported(parts[0])
        raise error(404, f"{method} {request.path[:200]} is not part of E2B's API as vmcache serves it")

    # ---------------------------------------------------------------- routes

    async def create(self, request: HttpRequest) -> HttpResponse:
        body = await _json_body(request)
        template = body.get("templateID")
        if not isinstance(template, str) or not 0 < len(template) <= 256:
            raise error(400, "templateID: a template id (string) is required")
        timeout = _timeout(body.get("timeout", DEFAULT_TIMEOUT), "timeout")
        envs = _string_map(body.get("envVars"), "envVars")
        metadata = _string_map(body.get("metadata"), "metadata")
        for name, what in (("autoPause", "pausing a sandbox"), ("autoResume", "resuming a paused sandbox")):
            value = body.get(name)
            if value not in (None, False) and not (name == "autoResume" and isinstance(value, dict)
                                                   and not value.get("enabled")):
                raise _unsupported_text(f"{name}: {what}")
        for name in ("volumeMounts", "mcp", "network", "iam"):
            if body.get(name):
                raise _unsupported_text(f"{name}: a sandbox's {name} (its network is the pool's policy)"
                                        if name == "network" else f"{name} at create")
        key = request.headers.get("idempotency-key")
        if key is not None:
            if not 0 < len(key) <= 255:
                raise error(400, "Idempotency-Key: 1 to 255 characters")
            known = self._idempotent.get(key)
            existing = self.provider.get(known) if known is not None else None
            if existing is not None:
                return json_response(201, _created(existing))
        pool = self.provider.pool_for(template)
        if pool is None:
            raise error(404, f"template '{template[:100]}' not found: vmcache serves 'base' and "
                             "'code-interpreter-v1' (its default pool) and the names of its pools")
        try:
            sandbox = await self.provider.create(template, timeout=timeout, envs=envs, metadata=metadata,
                                                 alias=template if template != pool else None)
        except QuotaReachedError as failure:
            raise error(429, failure.message, retry=False) from None
        except (WaitExpiredError, NoVMAvailableError) as failure:
            raise error(503, failure.message) from None  # a VM may be ready soon: the SDK retries
        except HardwareAccelRequiredError as failure:
            raise error(503, failure.message, retry=False) from None
        except VMGoneError as failure:  # the daemon is stopping
            raise error(503, failure.message, retry=False) from None
        except NotAllowedError as failure:
            raise error(403, failure.message, retry=False) from None
        except BadRequestError as failure:
            raise error(400, failure.message, retry=False) from None
        except VmcacheError as failure:
            raise error(500, f"the sandbox could not be created: {failure.message}",
                        retry=False) from None
        if key is not None:
            if len(self._idempotent) >= MAX_IDEMPOTENCY_KEYS:
                self._idempotent = {k: v for k, v in self._idempotent.items() if self.provider.get(v)}
            if len(self._idempotent) < MAX_IDEMPOTENCY_KEYS:
                self._idempotent[key] = sandbox.id
        return json_response(201, _created(sandbox))

    def list(self, request: HttpRequest, *, paged: bool) -> HttpResponse:
        wanted = _metadata_filter(request)
        states = _states(request)
        found = [sandbox for sandbox in self.provider.sandboxes()
                 if "running" in states and all(sandbox.metadata.get(k) == v for k, v in wanted.items())]
        found.sort(key=_order)
        headers: list[tuple[str, str]] = []
        if paged:
            limit = _limit(request)
            token = request.query_value("nextToken")
            if token:
                after = _decode_token(token)
                found = [sandbox for sandbox in found if _order(sandbox) > after]
            if len(found) > limit:
                headers.append(("x-next-token", _encode_token(_order(found[limit - 1]))))
                found = found[:limit]
        return json_response(200, [_listed(sandbox) for sandbox in found], headers)

    def get_info(self, sandbox_id: str) -> HttpResponse:
        return json_response(200, _detail(self._find(sandbox_id)))

    async def kill(self, sandbox_id: str) -> HttpResponse:
        sandbox = self._find(sandbox_id)
        await self.provider.kill(sandbox)
        return HttpResponse(204)

    async def set_timeout(self, request: HttpRequest, sandbox_id: str) -> HttpResponse:
        body = await _json_body(request)
        if "timeout" not in body:
            raise error(400, "timeout: the seconds the sandbox has left are required")
        timeout = _timeout(body["timeout"], "timeout")
        sandbox = self._find(sandbox_id)
        await self.provider.set_timeout(sandbox, timeout)
        return HttpResponse(204)

    async def refresh(self, request: HttpRequest, sandbox_id: str) -> HttpResponse:
        body = await _json_body(request)
        duration = _timeout(body.get("duration", DEFAULT_TIMEOUT), "duration")
        sandbox = self._find(sandbox_id)
        await self._extend(sandbox, duration)
        return HttpResponse(204)

    async def connect(self, request: HttpRequest, sandbox_id: str) -> HttpResponse:
        body = await _json_body(request)
        timeout = body.get("timeout")
        sandbox = self._find(sandbox_id)
        if timeout is not None:
            await self._extend(sandbox, _timeout(timeout, "timeout"))
        return json_response(200, _created(sandbox))

    async def _extend(self, sandbox: SandboxInfo, seconds: float) -> None:
        """E2B's connect and refresh only ever lengthen a running sandbox's life."""
        if sandbox.end_at < time.time() + seconds:
            await self.provider.set_timeout(sandbox, seconds)

    def _find(self, sandbox_id: str) -> SandboxInfo:
        sandbox = self.provider.get(sandbox_id) if valid_sandbox_id(sandbox_id) else None
        if sandbox is None:
            raise error(404, f"sandbox \"{sandbox_id[:100]}\" doesn't exist or you don't have access to it")
        return sandbox


def _method(method: str, path: str) -> HttpError:
    return error(405, f"{method} is not allowed on {path[:200]}")


def _unsupported(name: str) -> HttpError:
    return _unsupported_text(_UNSUPPORTED[name])


def _unsupported_text(what: str) -> HttpError:
    return error(501, f"vmcache does not support {what}: see docs/e2b.md for what it serves")


async def _json_body(request: HttpRequest) -> dict[str, Any]:
    raw = await request.read_body(MAX_API_BODY)
    if not raw.strip():
        return {}
    try:
        return parse_json_object(raw, "the request body")
    except NotJsonObject as failure:
        raise error(400, str(failure)) from None


def _timeout(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(400, f"{name}: a number of seconds, not {json.dumps(value)[:40]}")
    if not 0 < value <= MAX_TIMEOUT:
        raise error(400, f"{name}: between 1 and {MAX_TIMEOUT} seconds, not {value:g}")
    return float(value)


def _string_map(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(400, f"{name}: an object of strings")
    if len(value) > MAX_ENTRIES:
        raise error(400, f"{name}: at most {MAX_ENTRIES} entries")
    for key, item in value.items():
        if not isinstance(item, str):
            raise error(400, f"{name}.{key[:60]}: a string, not {json.dumps(item)[:40]}")
        if not 0 < len(key) <= MAX_KEY or len(item) > MAX_VALUE or "\0" in key or "\0" in item:
            raise error(400, f"{name}.{key[:60]}: keys 1 to {MAX_KEY} characters, values at most "
                             f"{MAX_VALUE}, no NUL")
    return dict(value)


def _metadata_filter(request: HttpRequest) -> dict[str, str]:
    """``metadata=k%3Dv%26k2%3Dv2``: the SDK urlencodes the pairs into one parameter."""
    wanted: dict[str, str] = {}
    for text in request.query.get("metadata", []):
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise error(400, "metadata: key=value pairs, URL-encoded") from None
        wanted.update(pairs)
    return wanted


def _states(request: HttpRequest) -> set[str]:
    values = [part for text in request.query.get("state", []) for part in text.split(",") if part]
    for value in values:
        if value not in ("running", "paused"):
            raise error(400, f"state: running or paused, not {value[:40]!r}")
    return set(values) if values else {"running", "paused"}


def _limit(request: HttpRequest) -> int:
    text = request.query_value("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise error(400, f"limit: 1 to {MAX_LIMIT}, not {text[:20]!r}")
    return int(text)


def _order(sandbox: SandboxInfo) -> tuple[float, str]:
    return (sandbox.started_at, sandbox.id)


def _encode_token(key: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([key[0], key[1]]).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        started, sandbox_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(started, int | float) or not isinstance(sandbox_id, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise error(400, "nextToken: not a token this API gave") from None
    return (float(started), sandbox_id)


def _created(sandbox: SandboxInfo) -> dict[str, Any]:
    return {"templateID": sandbox.template_id, "sandboxID": sandbox.id, "alias": sandbox.alias,
            "clientID": CLIENT_ID, "envdVersion": ENVD_VERSION, "envdAccessToken": sandbox.access_token,
            "trafficAccessToken": sandbox.traffic_token, "domain": None}


def _listed(sandbox: SandboxInfo) -> dict[str, Any]:
    return {"templateID": sandbox.template_id, "alias": sandbox.alias, "sandboxID": sandbox.id,
            "clientID": CLIENT_ID, "startedAt": _iso(sandbox.started_at), "endAt": _iso(sandbox.end_at),
            "cpuCount": sandbox.cpu_count, "memoryMB": sandbox.memory_mb, "diskSizeMB": 0,
            "metadata": sandbox.metadata, "state": "running", "envdVersion": ENVD_VERSION}


def _detail(sandbox: SandboxInfo) -> dict[str, Any]:
    return {**_listed(sandbox), "envdAccessToken": sandbox.access_token, "domain": None}
