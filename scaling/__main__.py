"""``python -m bitlaw.scaling``: the ``bitlaw-fit`` command line (see :mod:`bitlaw.scaling.cli`)."""

from .cli import main

main()
