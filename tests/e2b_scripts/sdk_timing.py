"""Run by bench/e2b_bench.py in the E2B SDK's own venv (never vmcache's): times what a user's
program does, ``Sandbox.create()`` to the first command's output, step by step.

Prints ``{"import_s": ...}`` first (``import e2b`` in this fresh process), then for each
line ``go`` read on stdin one iteration: ``Sandbox.create()`` (the HTTP create),
the first ``commands.run`` (the first envd call: connection, the daemon's agent connection,
the command), the same command again (the command alone), ``kill()``; each as one JSON line.
The driver paces the iterations (it waits for a full cache before each ``go``)."""

# The SDK lives in its own venv, never in the one mypy runs in: its names are Any here.
# mypy: disable-error-code="import-not-found"

from __future__ import annotations

import json
import sys
import time

COMMAND = "echo hello"

started = time.perf_counter()
from e2b import Sandbox  # noqa: E402 - the import is what is timed

print(json.dumps({"import_s": time.perf_counter() - started}), flush=True)

for line in sys.stdin:
    if line.strip() != "go":
        break
    t0 = time.perf_counter()
    sandbox = Sandbox.create()
    t1 = time.perf_counter()
    first = sandbox.commands.run(COMMAND)
    t2 = time.perf_counter()
    again = sandbox.commands.run(COMMAND)
    t3 = time.perf_counter()
    sandbox.kill()
    t4 = time.perf_counter()
    assert first.stdout == again.stdout == "hello\n", (first, again)
    print(
        json.dumps(
            {
                "create_s": t1 - t0,
                "first_command_s": t2 - t1,
                "command_s": t3 - t2,
                "kill_s": t4 - t3,
                "create_to_output_s": t2 - t0,
            }
        ),
        flush=True,
    )
