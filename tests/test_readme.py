"""The README's examples, as a new user runs them after the quick start.

``test_readme_examples_run_as_written`` runs every CPU command of the Quick start, Training, Export and Post-training
compression sections in order in an empty directory (about 18 minutes on 2 cores: two full default trainings),
so it is marked ``slow`` and deselected by default (``python -m pytest -m slow``). The fast test checks on every run
of the suite what made an example fail right after the quick start before: each training example must either be
the quick start's own run or get a directory of its own. ``test_the_readmes_figures_equal_their_records`` holds every
figure the README quotes from a benchmark to that benchmark's record in ``benchmarks/records/``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bitlaw.benchmarks.record import BenchmarkRecord, read_records
from bitlaw.core.config import CONF_DIR
from bitlaw.train.config import register_configs, run_dir_suffix

README = Path(__file__).resolve().parents[1] / "README.md"
RECORDS = README.parent / "benchmarks" / "records"
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


def _readme_words() -> str:
    """The README with every run of whitespace as one space: its lines wrap anywhere."""
    return " ".join(README.read_text().split())


def _record(benchmark: str) -> BenchmarkRecord:
    (found,) = [r for r in read_records(RECORDS) if r.benchmark == benchmark] or [None]
    assert found is not None, f"the README quotes {benchmark!r}, which has no record in {RECORDS}"
    return found


def _row(record: BenchmarkRecord, **where) -> dict:
    (row,) = [r for r in record.rows if all(r.get(key) == value for key, value in where.items())]
    return row


def _quickstart(record: BenchmarkRecord) -> list[str]:
    # The summary line ends with the run record's absolute path, which names the folder the benchmark ran in.
    figures = record.notes["summary_line"].partition(" run record ")[0]
    return [f"{figures} run record /", f"the whole command took {record.rows[0]['wall_s'] / 60:.1f} minutes here"]


def _exports(record: BenchmarkRecord) -> list[str]:
    native = _row(record, recipe="quest_w4a4", format="native")
    return [f"A W4A4 export's block weights take {native['block_bytes'] / native['block_bytes_bf16']:.3f}x of bf16"]


def _compression(record: BenchmarkRecord) -> list[str]:
    def loss(method: str, setting: str = "70% sparse") -> str:
        (row,) = [r for r in record.rows if r["method"] == method and r["setting"].startswith(setting)]
        return f"{row['loss']:.4f}"

    return [f"validation loss {record.notes['source_run']['val_loss']:.4f} on training's first windows, "
            f"{loss('none (the trained model)', '')} on the whole validation split",
            f"at 70 % sparsity magnitude pruning {loss('magnitude uniform')}, uniform SparseGPT "
            f"{loss('sparsegpt uniform')}, scheduled SparseGPT {loss('sparsegpt scheduled')}; GPTQ int2 "
            f"{loss('GPTQ', 'int2')}, with PV-tuning {loss('GPTQ + PV-tuning', 'int2')}; one of four blocks removed by "
            f"ShortGPT {loss('ShortGPT', 'blocks')}, healed with 200k tokens {loss('ShortGPT + healing', '200,000')}"]


def _sweep(record: BenchmarkRecord) -> list[str]:
    return [f"a laptop CPU, {record.notes['sweep_wall_s'] / 60:.0f} minutes on 2 cores and the fit "
            f"{record.notes['fit_wall_s']:.0f} s"]


def _backward_study(record: BenchmarkRecord) -> list[str]:
    def paired(recipe: str, against: str = "vs_quest_w4a4") -> str:
        mean, se, _ = _row(record, model="mini", recipe=recipe)[against]
        return f"{mean:+.4f} ± {se:.4f}".replace("-", "−")

    e4m3 = _row(record, model="mini", recipe="quest_w4a4_g8g8_e4m3")["fidelity"]["rel_error"]
    e5m2 = _row(record, model="mini", recipe="quest_w4a4_g8g8_e5m2")["fidelity"]["rel_error"]
    return [f"`quest_w4a4` ({_row(record, model='mini', recipe='quest_w4a4')['mean']:.4f}): e4m3 row-wise "
            f"{paired('quest_w4a4_g8g8_e4m3')}, e5m2 row-wise {paired('quest_w4a4_g8g8_e5m2')}, int8 block-scaled "
            f"{paired('quest_w4a4_g8g8')}, the one-ulp control {paired('quest_w4a4_replica')}",
            f"(relative error {e4m3[1]:.3f} mean, {e4m3[2]:.3f} max along training", f"than e5m2 ({e5m2[1]:.3f} / "
            f"{e5m2[2]:.3f})"]


def _estimate(record: BenchmarkRecord) -> list[str]:
    blocks = [row for row in record.rows if row["scope"] == "block"]
    w4a4 = {row["efficiency"]: row["ratio"] for row in blocks if row["recipe"] == "quest_w4a4"}.__getitem__
    g8g8 = {row["efficiency"]: row["ratio"] for row in blocks if row["recipe"] == "quest_w4a4_g8g8"}.__getitem__
    return [f"With every GEMM at 60 % of its dense peak it puts the block at {w4a4(0.6):.2f}x the bf16 block for "
            f"`quest_w4a4` and {g8g8(0.6):.2f}x for the fp8 backward of `quest_w4a4_g8g8` ({w4a4(0.7):.2f}x and "
            f"{g8g8(0.7):.2f}x at 70 %, {w4a4(0.8):.2f}x and {g8g8(0.8):.2f}x at 80 %)",
            f"**{g8g8(0.6):.2f}x** the bf16 block with `quest_w4a4_g8g8` ({w4a4(0.6):.2f}x with QuEST's backward) with "
            f"every GEMM at 60 % of its dense peak, {g8g8(0.8):.2f}x ({w4a4(0.8):.2f}x) at 80 %"]


FIGURES = {"quickstart": _quickstart, "exports": _exports, "compression": _compression,
           "sweep-cpu_mini_sweep": _sweep, "sweep-cpu_sparse_sweep": _sweep,
           "estimate-800m": _estimate, "backward-study": _backward_study}


@pytest.mark.parametrize("record_name", sorted(FIGURES))
def test_the_readmes_figures_equal_their_records(record_name):
    readme = _readme_words()
    phrases = FIGURES[record_name](_record(record_name))
    missing = [phrase for phrase in phrases if " ".join(phrase.split()) not in readme]
    assert not missing, f"README.md does not say what benchmarks/records/{record_name}.json holds: {missing}"
