"""Transparent huge pages off for the QEMUs this process starts (host side)."""

from __future__ import annotations

import ctypes

_PR_SET_THP_DISABLE = 41
_PR_GET_THP_DISABLE = 42
_libc = ctypes.CDLL(None, use_errno=True)


class NoHugePagesForChildren:
    """QEMU runs without transparent huge pages: QEMU asks for them on guest RAM
    (MADV_HUGEPAGE), so each guest page touched would make 2 MiB resident. The guest sees
    4 KiB pages either way.

    The flag (PR_SET_THP_DISABLE) belongs to a process, is inherited by its children and
    survives exec. Setting it in the child (``preexec_fn``) forces Python to fork instead
    of vfork, several times slower per QEMU started, holding up the event loop and the
    hand-outs behind it. So it is set on this process while QEMUs are being started, and
    put back as it was once the last start in progress is done. (Numbers: the README,
    "Measured choices in the code".)
    """

    def __init__(self) -> None:
        self._starting = 0
        self._was_disabled = False

    def __enter__(self) -> None:
        if self._starting == 0:
            self._was_disabled = _libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1
            _libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
        self._starting += 1

    def __exit__(self, *_exc: object) -> None:
        self._starting -= 1
        if self._starting == 0 and not self._was_disabled:
            _libc.prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)


no_huge_pages_for_children = NoHugePagesForChildren()
