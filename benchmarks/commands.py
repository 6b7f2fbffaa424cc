"""Run bitlaw's console commands the way a user does, for the benchmarks that time or inspect them: in a fresh
Python process (``python -m <module>``, the same code as the console script), timed by the wall clock, the output
shown as it comes and kept for reading afterwards.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The console script of each module a benchmark runs (pyproject's [project.scripts]), to write commands as a user
# types them.
SCRIPTS = {"bitlaw.train": "bitlaw-train", "bitlaw.deploy.export": "bitlaw-export", "bitlaw.scaling": "bitlaw-fit"}
_TAIL_LINES = 20  # of a failed command's output, quoted in the error


class CommandFailed(RuntimeError):
    """A command a benchmark ran exited with a non-zero status; the message names it and quotes its last lines."""


@dataclass(frozen=True)
class Finished:
    """A command that exited with status 0: the command line as a user types it, its output (stdout and stderr
    interleaved, as printed) and its wall-clock seconds."""

    command: str
    output: str
    seconds: float

    def lines(self) -> list[str]:
        return self.output.splitlines()


def user_command(module: str, args: list[str]) -> str:
    """``module``'s console script (:data:`SCRIPTS`) with ``args``, quoted for a shell: ``bitlaw-train quant=bf16``."""
    return shlex.join([SCRIPTS[module], *args])


def run(module: str, args: list[str], cwd: Path, echo: bool = True) -> Finished:
    """Run ``python -m <module> <args>`` in ``cwd`` and wait for it; its output is copied to this process's stdout
    as it comes (``echo``) and returned. CommandFailed, naming the command, its directory and exit status and
    quoting its last lines, when it exits with another status than 0."""
    command = user_command(module, args)
    started = time.perf_counter()
    with subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None  # stdout=PIPE
        lines = []
        for line in process.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        status = process.wait()
    seconds = time.perf_counter() - started
    output = "".join(lines)
    if status != 0:
        tail = "\n".join(output.splitlines()[-_TAIL_LINES:])
        raise CommandFailed(f"`{command}` (in {cwd}) exited with status {status}; its last lines:\n{tail}")
    return Finished(command, output, seconds)
