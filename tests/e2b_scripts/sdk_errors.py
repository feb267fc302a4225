# The SDK lives in its own venv, never in the one mypy runs in: its names are Any here.
# mypy: disable-error-code="import-not-found"
"""What the SDK says when things are wrong: a wrong API key, an unknown sandbox id (control
plane and envd), a wrong or missing access token, a code-interpreter call with a wrong token,
and a sandbox whose timeout passes (after which every call says it is gone). Each step
records the exception class the SDK raised. Prints one JSON line."""

from __future__ import annotations

import time

import httpx
from e2b import ConnectionConfig, Sandbox
from packaging.version import Version
from sdk_observe import Observed

obs = Observed()


def sandbox_with_token(sandbox_id: str, token: str | None, envd_version: str = "0.5.7") -> Sandbox:
    """The Sandbox object a program holds for ``sandbox_id`` with ``token`` (as Sandbox.connect
    builds it, with the token the user has instead of the one the API gave)."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token is not None:
        headers["X-Access-Token"] = token
    return Sandbox(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=Version(envd_version),
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=ConnectionConfig(extra_sandbox_headers=headers),
    )


# --- a wrong API key: nothing is created ------------------------------------------------------
obs.step("create_wrong_key", lambda: Sandbox.create(api_key="e2b_not-a-key-we-know").sandbox_id)
obs.step("list_wrong_key", lambda: len(Sandbox.list(api_key="e2b_not-a-key-we-know").next_items()))

# --- an unknown sandbox id ---------------------------------------------------------------------
ghost = "ighost0000000000000000"
obs.step("connect_unknown", lambda: Sandbox.connect(ghost).sandbox_id)
obs.step("get_info_unknown", lambda: Sandbox.get_info(ghost).sandbox_id)
obs.step("kill_unknown", lambda: Sandbox.kill(ghost))
obs.step("set_timeout_unknown", lambda: Sandbox.set_timeout(ghost, 60))
obs.step("run_unknown", lambda: sandbox_with_token(ghost, "token").commands.run("echo never").stdout)
obs.step("read_unknown", lambda: sandbox_with_token(ghost, "token").files.read("/etc/hostname"))
obs.step("is_running_unknown", lambda: sandbox_with_token(ghost, "token").is_running())

# --- a real sandbox reached with a wrong, or no, access token -----------------------------------
real = obs.step("create", lambda: Sandbox.create(timeout=300))
if real is not None:
    version = str(real._envd_version)
    obs.seen["create"] = {"sandbox_id": real.sandbox_id}
    wrong = sandbox_with_token(real.sandbox_id, "not-the-token", version)
    none = sandbox_with_token(real.sandbox_id, None, version)
    obs.step("run_wrong_token", lambda: wrong.commands.run("echo never").stdout)
    obs.step("list_wrong_token", lambda: len(wrong.commands.list()))
    obs.step("read_wrong_token", lambda: wrong.files.read("/etc/hostname"))
    obs.step("write_wrong_token", lambda: wrong.files.write("/tmp/never.txt", "x").path)
    obs.step("run_no_token", lambda: none.commands.run("echo never").stdout)
    obs.step("read_no_token", lambda: none.files.read("/etc/hostname"))

    def code_wrong_token() -> dict[str, object]:
        """POST /execute on port 49999 with a wrong X-Access-Token, as run_code sends it."""
        response = httpx.post(
            f"{ConnectionConfig().get_sandbox_url(real.sandbox_id, '', 49999)}/execute",
            json={"code": "1", "context_id": None, "language": None, "env_vars": None},
            headers={
                "E2b-Sandbox-Id": real.sandbox_id,
                "E2b-Sandbox-Port": "49999",
                "X-Access-Token": "not-the-token",
            },
            timeout=30,
        )
        return {"status": response.status_code, "json": response.headers.get("content-type", "")}

    obs.step("code_wrong_token", code_wrong_token)

    # --- what vmcache does not offer: a clear error, never a hang, and the sandbox unharmed --
    obs.step("unsupported_metrics", lambda: len(real.get_metrics()))
    obs.step("unsupported_pause", lambda: real.pause())
    obs.step("unsupported_snapshot", lambda: str(real.create_snapshot()))
    obs.step("unsupported_fork", lambda: [str(s) for s in real.fork()])
    obs.step("unsupported_network", lambda: real.update_network({"deny_out": ["0.0.0.0/0"]}))

    def stream_input() -> dict[str, object]:
        """commands.stream_input: a client-streaming call (StreamInput), then EOF."""
        handle = real.commands.run("cat", background=True, stdin=True)
        real.commands.stream_input(handle.pid, ["streamed ", b"input\n"])
        real.commands.close_stdin(handle.pid)
        result = handle.wait()
        return {"stdout": result.stdout, "exit_code": result.exit_code}

    obs.step("stream_input", stream_input)
    obs.step(
        "gzip_write",
        lambda: (real.files.write("/tmp/gz.txt", "zipped", gzip=True), real.files.read("/tmp/gz.txt"))[1],
    )
    obs.step("gzip_read", lambda: real.files.read("/tmp/gz.txt", gzip=True))
    obs.step("stream_read", lambda: b"".join(real.files.read("/tmp/gz.txt", format="stream")).decode())
    obs.step("still_fine", lambda: real.commands.run("echo fine").stdout)
    obs.step("kill", lambda: real.kill())

obs.step("unsupported_create_pause", lambda: Sandbox.create(lifecycle={"on_timeout": "pause"}).sandbox_id)
obs.step("unsupported_create_network", lambda: Sandbox.create(network={"deny_out": ["0.0.0.0/0"]}).sandbox_id)
obs.step("unknown_template", lambda: Sandbox.create("no-such-template").sandbox_id)
obs.step("listed_after_refusals", lambda: len(Sandbox.list().next_items()))

# --- a sandbox whose timeout passes ---------------------------------------------------------------
short = obs.step("create_short", lambda: Sandbox.create(timeout=3))
if short is not None:
    obs.seen["create_short"] = {"sandbox_id": short.sandbox_id}
    obs.step("short_alive", lambda: short.commands.run("echo alive").stdout)
    # Wait for the API to say it is gone (bounded), then see what every call says.
    deadline = time.monotonic() + 30
    gone_after = None
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            Sandbox.get_info(short.sandbox_id)
        except Exception:
            gone_after = round(time.monotonic() - started, 2)
            break
        time.sleep(0.2)
    obs.seen["expired_after_s"] = gone_after
    obs.step("expired_get_info", lambda: Sandbox.get_info(short.sandbox_id).sandbox_id)
    obs.step("expired_connect", lambda: Sandbox.connect(short.sandbox_id).sandbox_id)
    obs.step("expired_run", lambda: short.commands.run("echo ghost").stdout)
    obs.step("expired_read", lambda: short.files.read("/etc/hostname"))
    obs.step("expired_is_running", lambda: short.is_running())
    obs.step("expired_kill", lambda: short.kill())
    obs.step(
        "expired_listed", lambda: short.sandbox_id in [s.sandbox_id for s in Sandbox.list().next_items()]
    )
obs.done()
