"""``python -m train``: the same as ``bitlaw-train``."""

from train.cli import main

main()
