"""Running the external tools the image builder needs, bounded in time, failing in one line."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from ..errors import ImageError

Progress = Callable[[str], None]

#: Default bound for one tool run (apt-get download, dpkg-deb, depmod, mkfs ...).
TOOL_TIMEOUT = 600.0


def quiet(_message: str) -> None:
    """A progress callback that says nothing."""


def run_tool(argv: list[str], what: str, cwd: Path | None = None,
             timeout: float = TOOL_TIMEOUT, hint: str = "") -> str:
    """Run ``argv``; return its stdout, or raise an ImageError quoting its last stderr line.

    ``what`` names the step in the message; ``hint`` says how to get the tool if it is
    missing (e.g. "apt-get install kmod").
    """
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} is not installed{f' ({hint})' if hint else ''}") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: {' '.join(argv)} took longer than {timeout:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{what} failed: {last}")
    return done.stdout
