"""``python -m bitlaw.scaling``: the ``bitlaw-fit`` command line (see :mod:`bitlaw.scaling.cli`)."""

from bitlaw.scaling.cli import main

main()
