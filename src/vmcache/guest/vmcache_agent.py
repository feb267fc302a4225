"""PLACEHOLDER guest agent: replaced by the real one at merge. Do not build on it.

Only what the image work needs to check that a guest boots into python3 from
the root image: with ``--init`` (run as PID 1 by the initramfs' ``/init``) it
prints one line to the console, ``vmcache-agent placeholder: python <version>``,
then sleeps forever, reaping any children (PID 1 must). Standard library only,
and Python 3.9 syntax, like the real agent must be.
"""

import os
import signal
import sys


def _console(line: str) -> None:
    try:
        with open("/dev/console", "w") as console:
            console.write(line + "\n")
    except OSError:
        sys.stderr.write(line + "\n")


def main(argv: "list[str]") -> int:
    if "--init" not in argv:
        sys.stderr.write("vmcache-agent placeholder: run with --init as PID 1\n")
        return 2
    version = ".".join(str(part) for part in sys.version_info[:3])
    _console(f"vmcache-agent placeholder: python {version}")
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)  # wake pause() to reap
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            signal.pause()
        except InterruptedError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
