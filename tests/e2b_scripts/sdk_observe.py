"""What an SDK script saw, as one JSON line: each step's value, or the exception it raised.

The scripts run in the SDK's own venv (never vmcache's): they import only the SDK and the
standard library. A step that raises is recorded as ``{"raised": class name, "message": ...}``
and the script goes on, so one Python start reports every case it covers and a test sees
each failure as what the SDK call raised.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any


class Observed:
    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    def step(self, name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            value = call()
        except BaseException as error:
            self.seen[name] = raised(error)
            return None
        finally:
            self.timings[name] = round(time.perf_counter() - started, 4)
        self.seen[name] = value
        return value

    async def astep(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        try:
            value = await call()
        except BaseException as error:
            self.seen[name] = raised(error)
            return None
        finally:
            self.timings[name] = round(time.perf_counter() - started, 4)
        self.seen[name] = value
        return value

    def done(self) -> None:
        print(json.dumps({**self.seen, "_timings": self.timings}, default=str), flush=True)


def raised(error: BaseException) -> dict[str, Any]:
    where = traceback.extract_tb(error.__traceback__)
    return {
        "raised": type(error).__name__,
        "message": str(error)[:500],
        "at": f"{where[-1].filename.rsplit('/', 1)[-1]}:{where[-1].lineno}" if where else "",
        "mro": [cls.__name__ for cls in type(error).__mro__],
    }


def fail(message: str) -> None:
    print(json.dumps({"fatal": message}), flush=True)
    sys.exit(1)
