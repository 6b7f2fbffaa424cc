"""The README's examples, as a new user runs them after the quick start.

``test_readme_examples_run_as_written`` runs every CPU command of the Quick start, Training, Export and Post-training
compression sections in order in an empty directory (about 18 minutes on 2 cores: two full default trainings),
so it is marked ``slow`` and deselected by default (``python -m pytest -m slow``). The fast test checks on every run
of the suite what made an example fail right after the quick start before: each training example must either be
the quick start's own run or get a directory of its own.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bitlaw.core.config import CONF_DIR
from bitlaw.train.config import register_configs, run_dir_suffix

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("## Quick start", "## Training", "## Export and inference", "## Post-training compression")
NOT_HERE = ("trainer=gpu", "trainer=ddp", "trainer=slurm", "-m ", "...", "data=c4", "data=fineweb_edu")


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    """The README's shell commands of :data:`SECTIONS` that run on this machine, in order (continuation lines
    joined, comments dropped; the install line of the quick start reduced to its ``bitlaw-train``)."""
    commands = []
    for title in SECTIONS:
        for block in _blocks(_section(title), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                line = line.rsplit("&& ", 1)[-1] if "pip install" in line else line
                if line.startswith("bitlaw-") and not any(marker in line for marker in NOT_HERE):
                    commands.append(line)
    return commands


def _train_run_dir(command: str) -> str:
    """The run directory ``bitlaw-train <overrides>`` trains in by default (conf/train.yaml's naming)."""
    overrides = shlex.split(command)[1:]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "tiny")
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    named = ",".join(sorted(o for o in overrides if o.split("=", 1)[0] not in excluded))
    return f"runs/{model}-{cfg.quant.name}-seed{cfg.seed}{run_dir_suffix(named)}"


def test_every_training_example_is_the_quick_start_run_or_gets_its_own_directory():
    trainings = [c for c in readme_commands() if c.startswith("bitlaw-train")]
    assert trainings[0] == "bitlaw-train" and len(trainings) >= 3, trainings
    directories = {}
    for command in trainings:
        directory = _train_run_dir(command)
        assert directories.setdefault(directory, command) == command or command == "bitlaw-train", (
            f"{command!r} would train in {directory}, the directory of {directories[directory]!r}")
    assert _train_run_dir("bitlaw-train trainer.max_steps=50") == "runs/tiny-bf16-seed0--trainer.max_steps=50"
    assert _train_run_dir("bitlaw-train quant=quest_w4a4") == "runs/tiny-quest_w4a4-seed0"


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path):
    (tmp_path / "notes.txt").write_text("The module docstring says what the module is for. " * 40)
    for command in readme_commands():
        if "<hash>" in command:  # the reader fills in the data set's folder, as the README says
            (prepared,) = (tmp_path / "data_cache").glob("embedded-*")
            command = command.replace("data_cache/embedded-<hash>", f"data_cache/{prepared.name}")
        program, *args = shlex.split(command)
        done = subprocess.run([str(Path(sys.executable).parent / program), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    for block in _blocks(_section("## Quick start"), "python"):
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
