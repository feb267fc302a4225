# The SDK lives in its own venv, never in the one mypy runs in: its names are Any here.
# mypy: disable-error-code="import-not-found"
"""A client that goes away mid-stream, and the one that comes after it.

``client_gone.py start``: create a sandbox, print its id as one JSON line, start a command
that prints ``started`` and then sleeps, print ``STREAMING`` when that output arrives, and
block in the stream: the test kills this process there (SIGKILL, as a crashed program).

``client_gone.py after ID``: what a second program sees: the sandbox is still there,
connect works, the orphaned command is still listed (E2B's envd keeps a process whose
stream went away) and can be killed, new commands and files work; then it kills the
sandbox. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import time

from e2b import Sandbox
from sdk_observe import Observed

if sys.argv[1] == "start":
    sbx = Sandbox.create(timeout=300)
    print(json.dumps({"sandbox_id": sbx.sandbox_id}), flush=True)

    def on_stdout(chunk: str) -> None:
        if "started" in chunk:
            print("STREAMING", flush=True)

    sbx.commands.run("echo started; sleep 600; echo never", on_stdout=on_stdout, timeout=0)
    sys.exit("the stream ended: the test should have killed this process")

obs = Observed()
sandbox_id = sys.argv[2]
sbx = obs.step("connect", lambda: Sandbox.connect(sandbox_id))
if sbx is not None:
    obs.seen["connect"] = sbx.sandbox_id
    obs.step("run", lambda: sbx.commands.run("echo still-here").stdout)
    orphans = obs.step(
        "orphans", lambda: [p.pid for p in sbx.commands.list() if "sleep 600" in " ".join(p.args)]
    )
    obs.step("kill_orphans", lambda: [sbx.commands.kill(pid) for pid in orphans or []])

    def orphans_after_kill() -> list[int]:
        """The killed command leaves the list when it has exited (SIGKILL is asynchronous)."""
        deadline = time.monotonic() + 10
        while True:
            left = [p.pid for p in sbx.commands.list() if "sleep 600" in " ".join(p.args)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    obs.step("orphans_after_kill", orphans_after_kill)
    obs.step(
        "files", lambda: (sbx.files.write("/tmp/after.txt", "after"), sbx.files.read("/tmp/after.txt"))[1]
    )
    obs.step("kill", lambda: sbx.kill())
obs.done()
