"""E2B's control plane and the listener's routing.

First without QEMU, over a fake sandbox provider: every route, a wrong or missing API key, an
unknown sandbox, bad JSON, paging, what vmcache does not do, the sandbox headers (token, port,
health), a create whose client goes away, the api_keys_file checks. Then one real daemon
(``qemu``) driven by a plain HTTP client: create, list, get, set a timeout, let a short one
pass, kill, and nothing left behind.
"""

from __future__ import annotations

import base64
import hmac
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import h11
import pytest
import trio
import trio.testing
from fakes import FakeProcess

from vmcache.e2b_http import HttpLimits, HttpRequest, serve_connection
from vmcache.e2b_sandbox import CREATE_WAIT, Sandbox, SandboxManager, SandboxState
from vmcache.e2b_server import E2BServer, load_api_keys, user_of
from vmcache.errors import AgentError, ConfigError, QuotaReachedError, VMGoneError, WaitExpiredError
from vmcache.handle import VMHandle
from vmcache.ledger import HandedOut
from vmcache.lifecycle import Phase, StopReason, VMLife

if TYPE_CHECKING:
    from daemon import Daemon

T = TypeVar("T")
KEY = "e2b_test_key_0123456789"


class FakeAgent:
    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy

    async def ping(self) -> str:
        await trio.lowlevel.checkpoint()
        if not self.healthy:
            raise AgentError("no answer")
        return "pong"


class FakeSandbox:
    """What the API and the router read of a sandbox."""

    def __init__(self, sandbox_id: str, template: str, metadata: dict[str, str], timeout: float,
                 started_at: float) -> None:
        self._id = sandbox_id
        self.template_id = template
        self.alias: str | None = None
        self.metadata = metadata
        self.started_at = started_at
        self.end = started_at + timeout
        self.access_token = f"token-{sandbox_id}"
        self.traffic_token = f"traffic-{sandbox_id}"
        self.healthy = True
        self.tasks: list[Any] = []
        self._ended = trio.Event()

    @property
    def id(self) -> str:
        return self._id

    @property
    def end_at(self) -> float:
        return self.end

    cpu_count = 1
    memory_mb = 256

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    @property
    def envs(self) -> Mapping[str, str]:
        return {}

    @property
    def ended(self) -> trio.Event:
        return self._ended

    async def agent(self) -> FakeAgent:
        await trio.lowlevel.checkpoint()
        return FakeAgent(self.healthy)

    def service(self, kind: type[T]) -> T:
        return kind(self)  # type: ignore[call-arg]

    def start_soon(self, fn: Any, *args: object) -> None:
        self.tasks.append(fn)  # not run: no agent behind this sandbox

    def check_access_token(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.access_token)

    def check_traffic_token(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.traffic_token)


class FakeProvider:
    def __init__(self) -> None:
        self.sandboxes_by_id: dict[str, FakeSandbox] = {}
        self.counter = 0
        self.refuse: Exception | None = None

    def pool_for(self, template: str) -> str | None:
        return {"base": "default", "code-interpreter-v1": "default", "big": "big"}.get(template)

    def get(self, sandbox_id: str) -> FakeSandbox | None:
        return self.sandboxes_by_id.get(sandbox_id)

    def sandboxes(self) -> list[FakeSandbox]:
        return list(self.sandboxes_by_id.values())

    async def create(self, template: str, *, timeout: float, envs: Mapping[str, str],
                     metadata: Mapping[str, str], alias: str | None = None) -> FakeSandbox:
        await trio.lowlevel.checkpoint()
        if self.refuse is not None:
            raise self.refuse
        self.counter += 1
        sandbox = FakeSandbox(f"{self.counter:012x}", template, dict(metadata), timeout,
                              1_700_000_000.0 + self.counter)
        self.sandboxes_by_id[sandbox.id] = sandbox
        return sandbox

    async def kill(self, sandbox: FakeSandbox) -> None:
        await trio.lowlevel.checkpoint()
        sandbox._ended.set()
        del self.sandboxes_by_id[sandbox.id]

    async def set_timeout(self, sandbox: FakeSandbox, timeout: float) -> None:
        await trio.lowlevel.checkpoint()
        sandbox.end = time.time() + timeout


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def server(provider: FakeProvider) -> E2BServer:
    return E2BServer(provider, [KEY, "second-key"])


Call = Callable[..., Any]


async def call(server: E2BServer, method: str, target: str, body: object = None, *,
               key: str | None = KEY, headers: list[tuple[str, str]] | None = None
               ) -> tuple[int, Any, dict[str, str]]:
    """One request through the server, answered as the SDK reads it: status, JSON, headers."""
    heads = list(headers or [])
    if key is not None:
        heads.append(("X-API-KEY", key))
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    if raw:
        heads.append(("content-type", "application/json"))
    from vmcache.e2b_http import HttpError

    try:
        response = await server.handle(HttpRequest.make(method, target, heads, raw))
    except HttpError as error:
        response = error.response()
    data = response.body if isinstance(response.body, bytes) else b"".join(
        [piece async for piece in response.body])
    value = json.loads(data) if data else None
    return response.status, value, {name.lower(): v for name, v in response.headers}


async def create(server: E2BServer, **body: Any) -> dict[str, Any]:
    status, value, _ = await call(server, "POST", "/v2/sandboxes", {"templateID": "base", **body})
    assert status == 201, value
    assert isinstance(value, dict)
    return value


# ---------------------------------------------------------------- control plane


async def test_create_answers_201_with_what_the_sdk_reads(server: E2BServer, provider: FakeProvider) -> None:
    created = await create(server, timeout=300, metadata={"team": "a"}, envVars={"A": "1"})
    assert created["templateID"] == "base"
    assert created["clientID"] and created["envdVersion"] >= "0.1.0"
    sandbox = provider.sandboxes_by_id[created["sandboxID"]]
    assert created["envdAccessToken"] == sandbox.access_token
    assert created["trafficAccessToken"] == sandbox.traffic_token
    assert sandbox.end - sandbox.started_at == 300
    status, again, _ = await call(server, "POST", "/sandboxes", {"templateID": "code-interpreter-v1"})
    assert status == 201  # E2B's first create path
    default = provider.sandboxes_by_id[again["sandboxID"]]
    assert default.end - default.started_at == 300  # no timeout given: E2B's API gives 300 s


async def test_get_info_and_list_describe_the_sandbox(server: E2BServer) -> None:
    created = await create(server, metadata={"team": "a"})
    status, info, _ = await call(server, "GET", f"/sandboxes/{created['sandboxID']}")
    assert status == 200
    assert info["sandboxID"] == created["sandboxID"] and info["state"] == "running"
    assert info["metadata"] == {"team": "a"} and info["envdAccessToken"] == created["envdAccessToken"]
    assert info["startedAt"].endswith("Z") and info["endAt"].endswith("Z")
    assert {"cpuCount", "memoryMB", "diskSizeMB", "envdVersion", "templateID", "clientID"} <= set(info)
    status, listed, _ = await call(server, "GET", "/v2/sandboxes")
    assert status == 200 and [item["sandboxID"] for item in listed] == [created["sandboxID"]]
    assert "envdAccessToken" not in listed[0]
    status, listed, _ = await call(server, "GET", "/sandboxes")
    assert status == 200 and len(listed) == 1


async def test_kill_is_204_then_404(server: E2BServer) -> None:
    created = await create(server)
    assert (await call(server, "DELETE", f"/sandboxes/{created['sandboxID']}"))[0] == 204
    status, error, _ = await call(server, "DELETE", f"/sandboxes/{created['sandboxID']}")
    assert status == 404 and error["code"] == 404 and "doesn't exist" in error["message"]


async def test_set_timeout_and_connect(server: E2BServer, provider: FakeProvider) -> None:
    created = await create(server, timeout=30)
    sandbox_id = created["sandboxID"]
    assert (await call(server, "POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": 600}))[0] == 204
    assert 590 < provider.sandboxes_by_id[sandbox_id].end - time.time() <= 600
    status, connected, _ = await call(server, "POST", f"/sandboxes/{sandbox_id}/connect", {"timeout": 10})
    assert status == 200 and connected["sandboxID"] == sandbox_id
    assert connected["envdAccessToken"] == created["envdAccessToken"]
    assert provider.sandboxes_by_id[sandbox_id].end - time.time() > 590  # connect only lengthens
    assert (await call(server, "POST", f"/v2/sandboxes/{sandbox_id}/connect", {"timeout": 900}))[0] == 200
    assert provider.sandboxes_by_id[sandbox_id].end - time.time() > 890
    assert (await call(server, "POST", f"/sandboxes/{sandbox_id}/refreshes", {"duration": 1000}))[0] == 204


@pytest.mark.parametrize(("method", "target", "body"), [
    ("GET", "/sandboxes/0000000000aa", None), ("DELETE", "/sandboxes/0000000000aa", None),
    ("POST", "/sandboxes/0000000000aa/timeout", {"timeout": 5}),
    ("POST", "/sandboxes/0000000000aa/connect", {"timeout": 5}),
    ("GET", "/sandboxes/not-hex!", None),
])
async def test_an_unknown_sandbox_is_404_json(server: E2BServer, method: str, target: str,
                                              body: object) -> None:
    status, error, headers = await call(server, method, target, body)
    assert status == 404 and headers["content-type"] == "application/json"
    assert error["code"] == 404 and isinstance(error["message"], str)


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x", ""])
async def test_a_wrong_or_missing_api_key_is_401(server: E2BServer, provider: FakeProvider,
                                                 key: str | None) -> None:
    status, error, _ = await call(server, "POST", "/v2/sandboxes", {"templateID": "base"}, key=key)
    assert status == 401 and error["code"] == 401
    assert provider.counter == 0
    assert (await call(server, "GET", "/v2/sandboxes", key=key))[0] == 401


async def test_every_key_of_the_file_is_accepted(server: E2BServer) -> None:
    assert (await call(server, "GET", "/v2/sandboxes", key="second-key"))[0] == 200


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "not JSON"), (b"[]", "JSON object"), ({}, "templateID"),
    ({"templateID": 7}, "templateID"), ({"templateID": "base", "timeout": "long"}, "timeout"),
    ({"templateID": "base", "timeout": -1}, "timeout"), ({"templateID": "base", "timeout": 10**9}, "timeout"),
    ({"templateID": "base", "timeout": True}, "timeout"),
    ({"templateID": "base", "envVars": {"A": 1}}, "envVars.A"),
    ({"templateID": "base", "metadata": []}, "metadata"),
])
async def test_bad_create_bodies_are_400_and_cost_no_vm(server: E2BServer, provider: FakeProvider,
                                                        body: object, needle: str) -> None:
    status, error, _ = await call(server, "POST", "/v2/sandboxes", body)
    assert status == 400 and needle in error["message"], error
    assert provider.counter == 0


async def test_an_unknown_template_is_404(server: E2BServer, provider: FakeProvider) -> None:
    status, error, _ = await call(server, "POST", "/v2/sandboxes", {"templateID": "nope"})
    assert status == 404 and "template 'nope' not found" in error["message"]
    assert (await call(server, "POST", "/v2/sandboxes", {"templateID": "big"}))[0] == 201


async def test_the_daemons_refusals_keep_their_meaning(server: E2BServer, provider: FakeProvider) -> None:
    provider.refuse = QuotaReachedError("uid 0 already holds 2 VMs")
    status, error, headers = await call(server, "POST", "/v2/sandboxes", {"templateID": "base"})
    assert (status, error["message"]) == (429, "uid 0 already holds 2 VMs")
    assert headers.get("should-retry") == "false"  # the SDK would retry a bare 429
    provider.refuse = WaitExpiredError("no VM of pool 'default' became ready within 40 s")
    status, _, headers = await call(server, "POST", "/v2/sandboxes", {"templateID": "base"})
    assert status == 503 and "should-retry" not in headers  # a VM may come: the SDK retries
    provider.refuse = VMGoneError("the E2B sandboxes are not being served (the daemon is stopping)")
    status, _, headers = await call(server, "POST", "/v2/sandboxes", {"templateID": "base"})
    assert (status, headers.get("should-retry")) == (503, "false")


async def test_deeply_nested_json_is_400_not_500(server: E2BServer) -> None:
    status, error, _ = await call(server, "POST", "/v2/sandboxes", b"[" * 100_000)
    assert status == 400 and "nested too deeply" in error["message"]
    token = base64.urlsafe_b64encode(b"[" * 100_000).decode()
    assert (await call(server, "GET", f"/v2/sandboxes?nextToken={token}"))[0] == 400


async def test_a_sandbox_that_ends_under_a_request_is_404(server: E2BServer,
                                                         provider: FakeProvider) -> None:
    created = await create(server)

    async def ended(sandbox: FakeSandbox, timeout: float) -> None:
        raise VMGoneError("the VM is being stopped")  # what the ledger says of a dying VM

    provider.set_timeout = ended  # type: ignore[method-assign]
    status, error, _ = await call(server, "POST", f"/sandboxes/{created['sandboxID']}/timeout",
                                  {"timeout": 30})
    assert status == 404 and "doesn't exist" in error["message"]


async def test_what_vmcache_does_not_do_is_501_naming_it(server: E2BServer) -> None:
    created = await create(server)
    sandbox_id = created["sandboxID"]
    for method, target in [("POST", f"/sandboxes/{sandbox_id}/pause"),
                           ("POST", f"/sandboxes/{sandbox_id}/resume"),
                           ("GET", f"/sandboxes/{sandbox_id}/metrics"), ("GET", "/templates"),
                           ("POST", "/v3/templates"), ("GET", "/volumes"), ("GET", "/sandboxes/metrics"),
                           ("POST", f"/sandboxes/{sandbox_id}/snapshots")]:
        status, error, _ = await call(server, method, target, {})
        assert status == 501 and "vmcache does not support" in error["message"], (target, error)
    status, error, _ = await call(server, "POST", "/v2/sandboxes", {"templateID": "base", "autoPause": True})
    assert status == 501 and "autoPause" in error["message"]
    assert (await call(server, "GET", "/nothing/here"))[0] == 404
    assert (await call(server, "PUT", "/v2/sandboxes"))[0] == 405


async def test_list_filters_by_metadata_and_state(server: E2BServer) -> None:
    a = await create(server, metadata={"team": "a", "env": "x y"})
    await create(server, metadata={"team": "b"})
    from urllib.parse import quote, urlencode

    query = quote(urlencode({"team": "a", "env": "x y"}))
    status, listed, _ = await call(server, "GET", f"/v2/sandboxes?metadata={query}")
    assert status == 200 and [item["sandboxID"] for item in listed] == [a["sandboxID"]]
    assert (await call(server, "GET", "/v2/sandboxes?state=paused"))[1] == []
    assert len((await call(server, "GET", "/v2/sandboxes?state=running,paused"))[1]) == 2
    assert (await call(server, "GET", "/v2/sandboxes?state=sleeping"))[0] == 400


async def test_list_pages_with_limit_and_next_token(server: E2BServer) -> None:
    ids = [(await create(server))["sandboxID"] for _ in range(5)]
    seen: list[str] = []
    target = "/v2/sandboxes?limit=2"
    pages = 0
    while True:
        status, page, headers = await call(server, "GET", target)
        assert status == 200 and len(page) <= 2
        seen += [item["sandboxID"] for item in page]
        pages += 1
        token = headers.get("x-next-token")
        if token is None:
            break
        target = f"/v2/sandboxes?limit=2&nextToken={token}"
    assert (seen, pages) == (ids, 3)
    for bad in ("limit=0", "limit=101", "limit=x", "nextToken=garbage%21"):
        assert (await call(server, "GET", f"/v2/sandboxes?{bad}"))[0] == 400, bad


async def test_an_idempotency_key_gets_the_same_sandbox(server: E2BServer, provider: FakeProvider) -> None:
    first = await call(server, "POST", "/v2/sandboxes", {"templateID": "base"},
                       headers=[("Idempotency-Key", "abc-1")])
    again = await call(server, "POST", "/v2/sandboxes", {"templateID": "base"},
                       headers=[("Idempotency-Key", "abc-1")])
    assert first[0] == again[0] == 201 and first[1]["sandboxID"] == again[1]["sandboxID"]
    assert provider.counter == 1


async def test_a_create_whose_client_goes_away_while_it_waits_claims_nothing(
        server: E2BServer, provider: FakeProvider) -> None:
    """A client that gave up waiting for a VM (closed its connection) gets none claimed for
    it: the wait is cancelled, no sandbox is made for nobody."""
    release = trio.Event()
    cancelled = trio.Event()
    real_create = provider.create

    async def slow_create(*args: Any, **kwargs: Any) -> FakeSandbox:
        try:
            await release.wait()
        except trio.Cancelled:
            cancelled.set()
            raise
        return await real_create(*args, **kwargs)

    provider.create = slow_create  # type: ignore[method-assign]
    client, served = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    body = json.dumps({"templateID": "base", "timeout": 60}).encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, served, server.handle, HttpLimits())
        with trio.fail_after(5):
            await client.send_all(conn.send(h11.Request(method="POST", target="/v2/sandboxes", headers=[
                ("host", "t"), ("x-api-key", KEY), ("content-length", str(len(body)))])) or b"")
            await client.send_all(conn.send(h11.Data(data=body)) or b"")
            await client.send_all(conn.send(h11.EndOfMessage()) or b"")
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
            await cancelled.wait()
            release.set()
    status, listed, _ = await call(server, "GET", "/v2/sandboxes")
    assert status == 200 and listed == []


# ---------------------------------------------------------------- the sandbox headers


def envd_headers(sandbox: dict[str, Any], port: int = 49983,
                 token: str | None = None) -> list[tuple[str, str]]:
    return [("E2b-Sandbox-Id", sandbox["sandboxID"]), ("E2b-Sandbox-Port", str(port)),
            ("X-Access-Token", token if token is not None else sandbox["envdAccessToken"])]


async def test_an_unknown_sandbox_is_what_e2bs_proxy_answers(server: E2BServer) -> None:
    status, error, _ = await call(server, "GET", "/health", key=None, headers=[
        ("E2b-Sandbox-Id", "00000000abcd"), ("E2b-Sandbox-Port", "49983"), ("X-Access-Token", "x")])
    assert status == 502 and "was not found" in error["message"]  # SandboxNotRunningException


async def test_a_wrong_access_token_is_401(server: E2BServer) -> None:
    created = await create(server)
    for token in ("wrong", "", created["trafficAccessToken"]):
        status, error, _ = await call(server, "GET", "/health", key=None,
                                      headers=envd_headers(created, token=token))
        assert status == 401 and error["code"] == 401
    headers = [h for h in envd_headers(created) if h[0] != "X-Access-Token"]
    assert (await call(server, "GET", "/health", key=None, headers=headers))[0] == 401


async def test_health_follows_the_agent(server: E2BServer, provider: FakeProvider) -> None:
    created = await create(server)
    assert (await call(server, "GET", "/health", key=None, headers=envd_headers(created)))[0] == 204
    provider.sandboxes_by_id[created["sandboxID"]].healthy = False
    status, error, _ = await call(server, "GET", "/health", key=None, headers=envd_headers(created))
    assert status == 502 and "port is not open" in error["message"]


async def test_another_port_is_not_open(server: E2BServer) -> None:
    created = await create(server)
    status, error, _ = await call(server, "GET", "/", key=None, headers=envd_headers(created, port=8080))
    assert status == 502 and "port is not open" in error["message"]


async def test_the_code_port_takes_the_traffic_token(server: E2BServer) -> None:
    created = await create(server)
    headers = [("E2b-Sandbox-Id", created["sandboxID"]), ("E2b-Sandbox-Port", "49999"),
               ("E2B-Traffic-Access-Token", created["trafficAccessToken"])]
    status, _, _ = await call(server, "GET", "/nothing-here", key=None, headers=headers)
    assert status != 401
    headers[-1] = ("E2B-Traffic-Access-Token", "wrong")
    assert (await call(server, "GET", "/contexts", key=None, headers=headers))[0] == 401


async def test_an_unknown_procedure_is_connects_unimplemented(server: E2BServer) -> None:
    created = await create(server)
    status, error, _ = await call(server, "POST", "/nothing.Nothing/Call", {}, key=None,
                                  headers=envd_headers(created))
    assert status == 501 and error["code"] == "unimplemented"


def test_the_user_comes_from_basic_authorization() -> None:
    from vmcache.e2b_http import Headers

    assert user_of(Headers()) == "user"
    assert user_of(Headers([("authorization", "Basic " + base64.b64encode(b"root:").decode())])) == "root"
    for bad in ("Bearer x", "Basic !!!", "Basic " + base64.b64encode(b":").decode()):
        with pytest.raises(Exception) as raised:
            user_of(Headers([("authorization", bad)]))
        assert getattr(raised.value, "status", None) in (400, 401)


async def test_an_address_in_use_is_one_line_naming_e2b_listen(server: E2BServer) -> None:
    from vmcache.e2b_server import serve_e2b

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            await serve_e2b(server, "127.0.0.1", port)
    assert f"[e2b] listen 127.0.0.1:{port}: cannot listen there" in str(raised.value)


# ---------------------------------------------------------------- api_keys_file


def keys_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_api_keys_are_one_a_line(tmp_path: Path) -> None:
    path = keys_file(tmp_path, "# ours\nkey-one\n\n  key-two  \n")
    assert load_api_keys(str(path)) == ["key-one", "key-two"]


@pytest.mark.parametrize(("text", "mode", "needle"), [
    ("k\n", 0o640, "chmod 600"), ("k\n", 0o604, "chmod 600"), ("\n# none\n", 0o600, "no API key"),
    ("two words\n", 0o600, "printable word"),
])
def test_a_keys_file_others_can_read_is_refused_in_one_line(tmp_path: Path, text: str, mode: int,
                                                            needle: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_api_keys(str(keys_file(tmp_path, text, mode)))
    assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_or_foreign_keys_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        load_api_keys(str(tmp_path / "absent"))
    path = keys_file(tmp_path, "k\n")
    os.chown(path, 12345, 12345)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        load_api_keys(str(path))
    link = tmp_path / "link"
    link.symlink_to(keys_file(tmp_path, "k\n"))
    with pytest.raises(ConfigError):
        load_api_keys(str(link))




# ---------------------------------------------------------------- SandboxManager


class FakeSource:
    """The daemon's side (VMSource) with VMs that are fake processes."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.entries: dict[str, HandedOut] = {}
        self.ttls: dict[str, float] = {}
        self.stopped: list[str] = []
        self.waits: list[float] = []
        #: Set: a hand-out waits for it (a VM not ready yet).
        self.hold: trio.Event | None = None

    @property
    def pool_names(self) -> list[str]:
        return ["default", "big"]

    async def hand_out_claimed(self, pool: str, *, ttl: float, wait: float) -> HandedOut:
        self.waits.append(wait)
        await trio.lowlevel.checkpoint()
        if self.hold is not None:
            await self.hold.wait()
        vm_id = f"{len(self.entries) + 1:012x}"
        handle = VMHandle(id=vm_id, pid=1, start_time=1, qmp_socket="q", agent_socket="a",
                          console_log="c", run_dir=str(self.run_dir), cpu=2, memory=512)
        life = VMLife(vm_id, 1, 1, Phase.CLAIMED, owner_uid=0, handed_at=time.time(), handle=handle)
        entry = HandedOut(life, FakeProcess(dies_of={signal.SIGKILL}))
        self.entries[vm_id] = entry
        self.ttls[vm_id] = ttl
        return entry

    def set_ttl(self, entry: HandedOut, ttl: float) -> None:
        self.ttls[entry.id] = ttl

    async def stop(self, entry: HandedOut) -> None:
        await trio.lowlevel.checkpoint()
        self.stopped.append(entry.id)
        gone(entry)

    def ledger_entry(self, vm_id: str) -> HandedOut | None:
        return self.entries.get(vm_id)


def state(sandbox: Sandbox) -> SandboxState:
    """The sandbox's state now (a call, so that mypy does not keep an earlier one)."""
    return sandbox.state


def gone(entry: HandedOut) -> None:
    """The VM exits, as the ledger then tells it."""
    entry.process.kill()
    entry.gone.set()


@pytest.fixture
async def managed(tmp_path: Path, nursery: trio.Nursery) -> tuple[SandboxManager, FakeSource, Path]:
    source = FakeSource(tmp_path)
    records = tmp_path / "e2b"
    manager = SandboxManager(source, records)
    await nursery.start(manager.run)
    return manager, source, records


async def test_a_sandbox_is_a_claimed_vm_with_its_tasks_until_a_kill(
        managed: tuple[SandboxManager, FakeSource, Path]) -> None:
    manager, source, records = managed
    assert manager.pool_for("base") == manager.pool_for("code-interpreter-v1") == "default"
    assert (manager.pool_for("big"), manager.pool_for("nope")) == ("big", None)
    sandbox = await manager.create("base", timeout=30, envs={"A": "1"}, metadata={"m": "x"})
    assert source.ttls[sandbox.id] == 30 and sandbox.envs == {"A": "1"}
    assert sandbox.check_access_token(sandbox.access_token) and not sandbox.check_access_token("x")
    assert source.waits == [CREATE_WAIT] and CREATE_WAIT < 60  # the SDK's request timeout
    record = records / f"{sandbox.id}.json"
    assert record.stat().st_mode & 0o777 == 0o600
    assert json.loads(record.read_text())["envdAccessToken"] == sandbox.access_token
    cancelled = trio.Event()

    async def task() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    sandbox.start_soon(task)
    await trio.testing.wait_all_tasks_blocked()
    assert manager.get(sandbox.id) is sandbox and sandbox.state is SandboxState.LIVE
    with trio.fail_after(5):
        await manager.kill(sandbox)
        await cancelled.wait()
    assert state(sandbox) is SandboxState.ENDED and not sandbox._move(SandboxState.LIVE)
    assert sandbox.ended.is_set() and manager.get(sandbox.id) is None and source.stopped == [sandbox.id]
    assert not record.exists()
    with pytest.raises(VMGoneError):
        sandbox.start_soon(task)


async def test_a_sandbox_ends_when_its_vm_is_gone_for_any_reason(
        managed: tuple[SandboxManager, FakeSource, Path]) -> None:
    manager, source, _ = managed
    sandbox = await manager.create("base", timeout=30, envs={}, metadata={})
    cancelled = trio.Event()

    async def task() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    sandbox.start_soon(task)
    await trio.testing.wait_all_tasks_blocked()
    gone(source.entries[sandbox.id])  # the TTL passed, `vmcache stop`, a crash: all alike
    with trio.fail_after(5):
        await sandbox.ended.wait()
        await cancelled.wait()
    assert manager.sandboxes() == []


async def test_a_daemon_stop_keeps_sandboxes_and_the_next_one_serves_them(tmp_path: Path) -> None:
    source = FakeSource(tmp_path)
    records = tmp_path / "e2b"
    async with trio.open_nursery() as nursery:
        first = SandboxManager(source, records)
        await nursery.start(first.run)
        kept = await first.create("big", timeout=30, envs={"A": "1"}, metadata={"m": "x"})
        dropped = await first.create("base", timeout=30, envs={}, metadata={})
        nursery.cancel_scope.cancel()  # the daemon stops: no VM is stopped
    assert source.stopped == [] and kept.entry.alive and not kept.ended.is_set()
    assert kept.state is SandboxState.DETACHED
    del source.entries[dropped.id]  # its VM went while no daemon ran
    (records / "0000000000ff.json").write_text("{not json")
    async with trio.open_nursery() as nursery:
        second = SandboxManager(source, records)
        await nursery.start(second.run)
        again = second.get(kept.id)
        assert again is not None and again is not kept
        assert (again.access_token, again.envs, again.metadata, again.template_id) == (
            kept.access_token, {"A": "1"}, {"m": "x"}, "big")
        assert second.get(dropped.id) is None
        nursery.cancel_scope.cancel()
    assert sorted(path.name for path in records.iterdir()) == [f"{kept.id}.json"]


async def test_a_sandbox_being_stopped_is_gone_for_the_api(
        managed: tuple[SandboxManager, FakeSource, Path]) -> None:
    manager, source, _ = managed
    sandbox = await manager.create("base", timeout=30, envs={}, metadata={})
    source.entries[sandbox.id].life.ask_stop(StopReason.TTL)  # the ledger stops it
    assert not sandbox.alive and manager.get(sandbox.id) is None and manager.sandboxes() == []
    with pytest.raises(VMGoneError):
        sandbox.start_soon(trio.sleep_forever)


async def test_a_vm_that_arrives_after_the_daemon_began_to_stop_is_stopped(tmp_path: Path) -> None:
    source = FakeSource(tmp_path)
    source.hold = trio.Event()
    manager = SandboxManager(source, tmp_path / "e2b")
    failure: list[BaseException] = []

    async def create() -> None:
        try:
            await manager.create("base", timeout=30, envs={}, metadata={})
        except VMGoneError as error:
            failure.append(error)

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            outer.start_soon(create)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # the daemon stops while the create waits
        source.hold.set()
    assert len(failure) == 1 and source.stopped == list(source.entries)


def test_an_unreadable_records_directory_is_one_config_error(tmp_path: Path) -> None:
    from vmcache.e2b_sandbox import _read_record_files

    (tmp_path / "e2b").write_text("not a directory")
    with pytest.raises(ConfigError, match="E2B sandbox records"):
        _read_record_files(tmp_path / "e2b")


# ---------------------------------------------------------------- [e2b] and the h2 trap


def test_the_e2b_table_is_off_by_default_and_checked() -> None:
    from vmcache.config import Config, config_from_dict, is_loopback_host

    assert Config().e2b.address is None
    config = config_from_dict({"e2b": {"listen": "[::1]:3000", "api_keys_file": "/k"}})
    assert config.e2b.address == ("::1", 3000) and is_loopback_host("::1")
    assert not is_loopback_host("0.0.0.0") and is_loopback_host("127.0.0.2")
    for bad, needle in [({"listen": "3000", "api_keys_file": "/k"}, "e2b.listen: must be HOST:PORT"),
                        ({"listen": "127.0.0.1:3000"}, "e2b.api_keys_file: is needed with listen"),
                        ({"listen": "127.0.0.1:70000", "api_keys_file": "/k"}, "e2b.listen"),
                        ({"port": 3000}, "unknown key e2b.port")]:
        with pytest.raises(ConfigError) as raised:
            config_from_dict({"e2b": bad})
        assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_an_h2_purerpc_cannot_run_with_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from vmcache.errors import DependencyError, check_h2

    check_h2()  # this venv's h2 is purerpc's
    monkeypatch.setattr(metadata, "version", lambda name: "4.4.1" if name == "h2" else "0")
    with pytest.raises(DependencyError) as raised:
        check_h2()
    text = str(raised.value)
    assert "needs h2 >= 3.1, < 4" in text and "found h2 4.4.1" in text and "venv of its own" in text
    assert "\n" not in text


# ---------------------------------------------------------------- one real daemon


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """The module's daemon refills its cache while tests run: its QEMU processes are counted
    around the whole module instead (``real``)."""
    yield


@attrs.frozen
class Real:
    daemon: Daemon
    port: int

    def request(self, method: str, target: str, body: object = None, *, key: str | None = KEY,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """One request as a plain HTTP/1.1 client (not the SDK) sends it."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=90)
        try:
            heads = dict(headers or {})
            if key is not None:
                heads["X-API-KEY"] = key
            data = None if body is None else json.dumps(body).encode()
            if data is not None:
                heads["Content-Type"] = "application/json"
            connection.request(method, target, body=data, headers=heads)
            response = connection.getresponse()
            raw = response.read()
            return (response.status, json.loads(raw) if raw else None,
                    {name.lower(): value for name, value in response.getheaders()})
        finally:
            connection.close()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Real]:
    """``vmcache serve`` with ``[e2b] listen`` on a free loopback port and one cached VM
    (snapshot mode, as the fastest daemon tests run); after the module: nothing handed out,
    no QEMU of its own left, no traceback in its log."""
    from conftest import RUN_DIR_PREFIX, qemu_pids, wait_until
    from daemon import Daemon as RealDaemon

    tmp = tmp_path_factory.mktemp("e2b-api")
    run_dir = Path(f"{RUN_DIR_PREFIX}e2b-api-{time.monotonic_ns() % 10**9}")
    run_dir.mkdir(mode=0o700)
    old_run_dir = os.environ.get("VMCACHE_RUN_DIR")
    os.environ["VMCACHE_RUN_DIR"] = str(run_dir)
    before = qemu_pids()
    keys = tmp / "keys"
    keys.write_text(f"{KEY}\n")
    keys.chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = RealDaemon(tmp, run_dir, cache=1, factory={"boot_mode": "snapshot"})
    with open(daemon.config, "a") as config:
        config.write(f'[e2b]\nlisten = "127.0.0.1:{port}"\napi_keys_file = "{keys}"\n')
    try:
        daemon.start()  # its Unix socket accepts before the E2B listener is up: wait for that
        assert wait_until(lambda: f"E2B API listening on http://127.0.0.1:{port}" in daemon.log(), 30,
                          0.05), daemon.log()
        daemon.wait_cached(1)
        yield Real(daemon, port)
        assert daemon.status()["handed_out_vms"] == [], daemon.log()
        assert daemon.signal(signal.SIGTERM) == 0, daemon.log()
        assert "Traceback" not in daemon.log() and "unexpected error" not in daemon.log(), daemon.log()
    finally:
        daemon.ensure_stopped()
        if old_run_dir is None:
            os.environ.pop("VMCACHE_RUN_DIR", None)
        else:
            os.environ["VMCACHE_RUN_DIR"] = old_run_dir
        leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith("vm-")]
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    assert not leftovers, f"run directories left behind: {leftovers}"
    assert wait_until(lambda: qemu_pids() == before, 10), "QEMU processes left behind"


@pytest.mark.qemu
def test_a_sandbox_is_a_handed_out_vm_from_create_to_kill(real: Real) -> None:
    status, created, _ = real.request("POST", "/v2/sandboxes", {
        "templateID": "base", "timeout": 120, "metadata": {"test": "api"}, "envVars": {"A": "1"}})
    assert status == 201, created
    sandbox_id = created["sandboxID"]
    handed = real.daemon.status()["handed_out_vms"]
    assert [vm["id"] for vm in handed] == [sandbox_id] and handed[0]["state"] == "claimed"
    assert 100 < handed[0]["expires_at"] - time.time() <= 120

    status, info, _ = real.request("GET", f"/sandboxes/{sandbox_id}")
    assert status == 200 and info["metadata"] == {"test": "api"} and info["state"] == "running"
    status, listed, _ = real.request("GET", "/v2/sandboxes?metadata=test%3Dapi")
    assert status == 200 and [item["sandboxID"] for item in listed] == [sandbox_id]

    assert real.request("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": 600})[0] == 204
    expires = real.daemon.status()["handed_out_vms"][0]["expires_at"]
    assert 590 < expires - time.time() <= 600

    envd = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983",
            "X-Access-Token": created["envdAccessToken"]}
    assert real.request("GET", "/health", key=None, headers=envd)[0] == 204  # the agent answers
    assert real.request("GET", "/health", key=None, headers={**envd, "X-Access-Token": "no"})[0] == 401
    assert real.request("GET", "/v2/sandboxes", key="wrong")[0] == 401

    assert real.request("DELETE", f"/sandboxes/{sandbox_id}")[0] == 204
    assert real.daemon.status()["handed_out_vms"] == []
    assert real.request("GET", f"/sandboxes/{sandbox_id}")[0] == 404
    assert real.request("DELETE", f"/sandboxes/{sandbox_id}")[0] == 404
    status, error, _ = real.request("GET", "/health", key=None, headers=envd)
    assert status == 502 and "was not found" in error["message"]


@pytest.mark.qemu
def test_a_sandbox_whose_timeout_passes_is_gone(real: Real) -> None:
    from conftest import wait_until

    status, created, _ = real.request("POST", "/v2/sandboxes", {"templateID": "code-interpreter-v1",
                                                                "timeout": 2})
    assert status == 201, created
    sandbox_id = created["sandboxID"]
    assert wait_until(lambda: real.request("GET", f"/sandboxes/{sandbox_id}")[0] == 404, 30, 0.2)
    assert wait_until(lambda: real.daemon.status()["handed_out_vms"] == [], 10, 0.2)
    assert "TTL passed" in real.daemon.log() or "its TTL" in real.daemon.log()
    status, listed, _ = real.request("GET", "/v2/sandboxes")
    assert (status, listed) == (200, [])


@pytest.mark.qemu
def test_a_restarted_daemon_serves_its_sandboxes_again(real: Real) -> None:
    """A daemon's stop leaves sandboxes running (claimed hand-outs); the next daemon adopts
    their VMs and, from their E2B records, serves them with the same tokens."""
    from conftest import wait_until

    status, created, _ = real.request("POST", "/v2/sandboxes", {"templateID": "base", "timeout": 120,
                                                                "metadata": {"kept": "yes"}})
    assert status == 201, created
    sandbox_id = created["sandboxID"]
    assert real.daemon.signal(signal.SIGTERM) == 0, real.daemon.log()
    real.daemon.start()

    def served_again() -> bool:
        try:
            return real.request("GET", f"/sandboxes/{sandbox_id}")[0] == 200
        except ConnectionRefusedError:  # the E2B listener comes up after the daemon's socket
            return False

    assert wait_until(served_again, 30, 0.2), real.daemon.log()
    status, info, _ = real.request("GET", f"/sandboxes/{sandbox_id}")
    assert info["metadata"] == {"kept": "yes"} and info["envdAccessToken"] == created["envdAccessToken"]
    envd = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983",
            "X-Access-Token": created["envdAccessToken"]}
    assert real.request("GET", "/health", key=None, headers=envd)[0] == 204
    assert real.request("DELETE", f"/sandboxes/{sandbox_id}")[0] == 204
