"""``python -m bitlaw.train``: the same as ``bitlaw-train``."""

from .cli import main

main()
