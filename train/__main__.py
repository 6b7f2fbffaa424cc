"""``python -m bitlaw.train``: the same as ``bitlaw-train``."""

from bitlaw.train.cli import main

main()
