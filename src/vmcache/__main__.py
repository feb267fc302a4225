"""``python -m vmcache`` and the ``vmcache`` command.

Before anything else (the command's own imports take a few hundred milliseconds), a
stop signal ends the process with the command's one line and exit status: nothing
has started that would need cleaning up yet. :func:`vmcache.cli.main` then installs
the handlers that do clean up.
"""

import os
import signal


def _interrupted_before_start(signum: int, _frame: object) -> None:
    os.write(2, f"vmcache: interrupted ({signal.Signals(signum).name})\n".encode())
    os._exit(128 + signum)


def run() -> None:
    """The ``vmcache`` console script."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted_before_start)
    from .cli import main

    main()


if __name__ == "__main__":
    run()
