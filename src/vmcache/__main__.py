"""``python -m vmcache`` is the ``vmcache`` command."""

from .cli import main

main()
