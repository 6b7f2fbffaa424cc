"""``python -m scaling``: the ``bitlaw-fit`` command line (see :mod:`scaling.cli`)."""

from scaling.cli import main

main()
