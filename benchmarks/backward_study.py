"""Loss study of the quantized backward: paired runs of bf16, quest_w4a4 and the presets that quantize the backward.

Usage::

    python -m bitlaw.benchmarks.backward_study --out study/backward [--seeds 0 1 2] [--models tiny mini]
        [--model-seeds mini=0,1,2] [--quant bf16 quest_w4a4 quest_w4a4_replica quest_w4a4_g8 quest_w4a4_g8g8]
        [--probe-every 20]

Every (model, recipe, seed) trains once with ``bitlaw-train``'s own code in ``OUT/runs/<model>-<recipe>-seed<s>``
(finished runs are skipped, so an interrupted study continues). Runs of one seed share the initial weights and the
data order, so differences between recipes are **paired**. Each finished run is evaluated on the whole validation
split (the command ``bitlaw-eval <run>``). Runs whose recipe quantizes the backward also record, every
``--probe-every`` steps, the gradient of the training batch under the recipe and under QuEST's backward (the same
recipe with ``grad_input`` and ``grad_weight`` in bf16, the same weights): their cosine similarity and relative
error (:class:`GradientFidelity`).

``quest_w4a4_replica`` is the control: ``quest_w4a4`` again, its initial weights moved by one unit in the last place
(:class:`PerturbInit`), so it differs from its pair by rounding only. Its paired difference to ``quest_w4a4`` is what
trajectory sensitivity alone produces; a recipe's difference of that size says nothing about the recipe.

The study writes ``results.json``, ``report.md`` (paired differences to quest_w4a4 with standard errors, gradient
fidelity, and each preset against the control) and ``curves.png`` (training loss per recipe, mean over seeds), and
the record ``backward-study`` (``benchmarks.record``): the report's figures per (model, recipe), and the code
version each run was trained at (its ``run.json``), which may be older than the commit the record was made at. A
study folder whose runs are all finished is only summarized again.

Models: ``tiny`` (the default run: 4 layers, d_model 256, 320k tokens) and ``mini`` (the CPU mini-sweep's largest
model, 4 layers at d_model 128, D/N = 1).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from ..core.config import CONF_DIR
from ..core.records import RunRecord
from ..kernels.gradients import noise_context
from ..kernels.recipe import GradSpec, Recipe
from ..models.convert import quantized_layers
from ..train.cli import train
from ..train.config import register_configs
from .options import add_record_arguments, record_directory
from .record import BenchmarkRecord, command_line, write_record

MODULE = "bitlaw.benchmarks.backward_study"
MODELS = {"tiny": [], "mini": ["experiment=cpu_mini_sweep", "model.n_layer=4", "tokens_per_param=1"]}
BASELINE = "quest_w4a4"
REPLICA = BASELINE + "_replica"


class GradientFidelity(L.Callback):
    """Every ``every`` optimizer steps, before the step's first micro-batch: the gradient of that batch's loss under
    the run's recipe and under QuEST's backward (the recipe with bf16 ``grad_input`` / ``grad_weight``), at the same
    weights; appends ``{"step", "cosine", "rel_error", "linear_cosine", "linear_rel_error"}`` as a JSON line to
    ``out`` (``linear_*``: the weights of the quantized layers only). Does nothing for a recipe without a quantized
    backward."""

    def __init__(self, out: str, every: int = 20):
        self.out, self.every = Path(out), every

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        recipe: Recipe = pl_module.recipe
        if not recipe.quantized_backward or trainer.global_step % self.every or \
                batch_idx % trainer.accumulate_grad_batches:
            return
        layers = list(quantized_layers(pl_module.model).values())
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        linear = {id(layer.weight) for layer in layers}
        quest = dataclasses.replace(recipe, grad_input=GradSpec(), grad_weight=GradSpec())
        x, y = batch

        def gradients(spec: Recipe) -> list[torch.Tensor]:
            for layer in layers:
                layer.recipe = spec
            with torch.enable_grad(), noise_context(pl_module.seed, 0, -1 - trainer.global_step):
                _, loss = pl_module.model(x, y)
                return [g.detach().float().flatten() for g in torch.autograd.grad(loss, params)]

        try:
            reference, ours = gradients(quest), gradients(recipe)
        finally:
            for layer in layers:
                layer.recipe = recipe
        keep = [id(p) in linear for p in params]
        row = {"step": trainer.global_step, **_agreement(reference, ours, "")}
        row.update(_agreement([g for g, k in zip(reference, keep, strict=True) if k],
                              [g for g, k in zip(ours, keep, strict=True) if k], "linear_"))
        with open(self.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


class PerturbInit(L.Callback):
    """Before a fresh run's first step, every floating-point parameter entry moves by one unit in the last place, up
    or down with equal odds (a CPU generator seeded by ``seed``, the same draws on every rank): a replica of the run
    that differs from it by rounding only. A resumed run (``global_step > 0``) keeps its weights."""

    def __init__(self, seed: int = 1):
        self.seed = seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step:
            return
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for param in pl_module.model.parameters():
                if param.is_floating_point():
                    up = torch.rand(param.shape, generator=generator) < 0.5
                    toward = torch.where(up, math.inf, -math.inf).to(param.device, param.dtype)
                    param.copy_(torch.nextafter(param, toward))


def _agreement(reference: list[torch.Tensor], ours: list[torch.Tensor], prefix: str) -> dict[str, float]:
    # float64: sums over millions of entries in fp32 put the cosine off by ~1e-3, the size of what is measured.
    a, b = torch.cat(reference).double(), torch.cat(ours).double()
    cosine = float(a @ b / (a.norm() * b.norm()))
    return {f"{prefix}cosine": cosine, f"{prefix}rel_error": float((b - a).norm() / a.norm())}


Seeds = Sequence[int] | Mapping[str, Sequence[int]]
FIDELITY_KEYS = ("cosine", "rel_error", "linear_cosine", "linear_rel_error")


def seeds_of(seeds: Seeds, model: str) -> list[int]:
    """The seeds of ``model``: ``seeds`` itself, or its entry for ``model`` when it maps models to seeds."""
    return list(seeds[model]) if isinstance(seeds, Mapping) else list(seeds)


def run_dir_of(out: Path, model: str, quant: str, seed: int) -> Path:
    """A run's directory in the study folder ``out`` (the layout every version of the study wrote)."""
    return out / "runs" / f"{model}-{quant}-seed{seed}"


def run_one(out: Path, model: str, quant: str, seed: int, probe_every: int) -> None:
    """Train (unless ``run.json`` exists) and evaluate one run on the whole validation split (``full_val.json``)."""
    run_dir = run_dir_of(out, model, quant, seed)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        register_configs()
        replica = [f"+callbacks.replica._target_={MODULE}.PerturbInit"] if quant == REPLICA else []
        overrides = [*MODELS[model], f"quant={BASELINE if quant == REPLICA else quant}", f"seed={seed}",
                     f"run_dir={run_dir}", "trainer.enable_progress_bar=false", *replica,
                     f"+callbacks.fidelity._target_={MODULE}.GradientFidelity",
                     f"+callbacks.fidelity.out={run_dir / 'fidelity.jsonl'}",
                     f"+callbacks.fidelity.every={probe_every}"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="train", overrides=overrides)
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():  # a fresh run (a resumed one keeps its probes)
            (run_dir / "fidelity.jsonl").unlink(missing_ok=True)
        train(cfg)
    full = run_dir / "full_val.json"
    if not full.is_file():
        # bitlaw-eval as a user runs it: full_val.json is exactly that command's --json output.
        done = subprocess.run([sys.executable, "-m", "bitlaw.deploy.evaluate", str(run_dir), "--json", "--no-progress"],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"bitlaw-eval {run_dir} failed (exit {done.returncode}): {done.stderr[-2000:]}")
        full.write_text(done.stdout)


def train_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, train/loss)`` from the run's CSV log."""
    points = []
    with open(run_dir / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss"):
                points.append((int(row["step"]), float(row["train/loss"])))
    return points


def fidelity(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "fidelity.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def paired(values: dict[int, float], base: dict[int, float]) -> tuple[float, float, int]:
    """Mean and standard error of ``values[s] − base[s]`` over the seeds both have."""
    diffs = [values[s] - base[s] for s in sorted(values) if s in base]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.nan
    return mean, se, n


def summarize(out: Path, models: list[str], quants: list[str], seeds: Seeds) -> dict[str, Any]:
    """Every figure of the report from the run directories under ``out``: per model and recipe, the full validation
    loss per seed (``val_loss``) and its ``mean``, the paired differences ``vs_<recipe>`` (mean, standard error,
    pairs) and the gradient fidelity (min, mean, max of each probe figure, and the mean per step)."""
    summary: dict[str, Any] = {}
    for model in models:
        model_seeds = seeds_of(seeds, model)
        losses: dict[str, dict[int, float]] = {}
        rows: dict[str, Any] = {}
        for quant in quants:
            for seed in model_seeds:
                full = json.loads((run_dir_of(out, model, quant, seed) / "full_val.json").read_text())
                losses.setdefault(quant, {})[seed] = full["loss"]
        for quant in quants:
            mean = sum(losses[quant].values()) / len(losses[quant])
            row: dict[str, Any] = {"val_loss": losses[quant], "mean": mean}
            if quant != BASELINE and BASELINE in losses:
                row["vs_" + BASELINE] = paired(losses[quant], losses[BASELINE])
            if quant != "bf16" and "bf16" in losses:
                row["vs_bf16"] = paired(losses[quant], losses["bf16"])
            if quant not in ("bf16", BASELINE, REPLICA) and REPLICA in losses:
                row["vs_" + REPLICA] = paired(losses[quant], losses[REPLICA])
            probes = [p for seed in model_seeds for p in fidelity(run_dir_of(out, model, quant, seed))]
            if probes:
                row["fidelity"] = {key: (min(p[key] for p in probes), sum(p[key] for p in probes) / len(probes),
                                         max(p[key] for p in probes))
                                   for key in FIDELITY_KEYS}
                row["fidelity_by_step"] = _by_step(probes)
            rows[quant] = row
        summary[model] = rows
    return summary


def _by_step(probes: list[dict[str, float]]) -> list[dict[str, float]]:
    steps: dict[int, list[dict[str, float]]] = {}
    for probe in probes:
        steps.setdefault(int(probe["step"]), []).append(probe)
    return [{"step": step, **{key: sum(p[key] for p in group) / len(group) for key in FIDELITY_KEYS}}
            for step, group in sorted(steps.items())]


def report(summary: dict[str, Any]) -> str:
    """The Markdown tables of the study (``report.md``): per model a heading and :func:`model_report`."""
    return "\n".join(f"### {model}\n\n{model_report(rows)}" for model, rows in summary.items())


def model_report(rows: dict[str, Any]) -> str:
    """One model's table (paired differences, gradient fidelity), the target check and the control paragraph, from
    its :func:`summarize` rows (``{recipe: row}``)."""
    seeds = max(len(row["val_loss"]) for row in rows.values())
    gap = rows.get(BASELINE, {}).get("vs_bf16")
    lines = [f"| recipe | full validation loss, mean of {seeds} seeds | paired Δ vs {BASELINE} (± SE) | "
             "paired Δ vs bf16 (± SE) | gradient cosine vs QuEST (min / mean) | relative error (mean / max) |",
             "|---|---:|---:|---:|---:|---:|"]
    for quant, row in rows.items():
        fid = row.get("fidelity")
        cos = f"{fid['cosine'][0]:.5f} / {fid['cosine'][1]:.5f}" if fid else "—"
        err = f"{fid['rel_error'][1]:.4f} / {fid['rel_error'][2]:.4f}" if fid else "—"
        lines.append(f"| {quant} | {row['mean']:.4f} | {_paired_text(row, 'vs_' + BASELINE)} | "
                     f"{_paired_text(row, 'vs_bf16')} | {cos} | {err} |")
    if gap:
        lines += ["", f"Target: |paired Δ vs {BASELINE}| ≤ 0.02 and < half of {BASELINE}'s gap to bf16 "
                      f"({gap[0]:+.4f}, half {abs(gap[0]) / 2:.4f})."]
        for quant, row in rows.items():
            if "vs_" + BASELINE in row and quant != "bf16":
                diff = row["vs_" + BASELINE][0]
                held = abs(diff) <= 0.02 and abs(diff) < abs(gap[0]) / 2
                lines.append(f"- {quant}: {diff:+.4f} → {'holds' if held else 'does not hold'}")
    if REPLICA in rows and "vs_" + BASELINE in rows[REPLICA]:
        mean, se, n = rows[REPLICA]["vs_" + BASELINE]
        spread = math.sqrt(n) * se if n > 1 else math.nan
        lines += ["", f"Control: {REPLICA} ({BASELINE}, initial weights one ulp off) lands {mean:+.4f} ± {se:.4f} "
                      f"from its pair (per-seed standard deviation {spread:.4f}): differences of that size are "
                      "trajectory sensitivity, not the recipe. Against the control (both runs perturbed):"]
        lines += [f"- {quant}: {_paired_text(row, 'vs_' + REPLICA)}" for quant, row in rows.items()
                  if "vs_" + REPLICA in row]
    lines.append("")
    return "\n".join(lines)


def _paired_text(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "—"
    mean, se, _ = row[key]
    return f"{mean:+.4f} ± {se:.4f}"


def plot(out: Path, models: list[str], quants: list[str], seeds: Seeds, path: Path) -> None:
    """Training loss per recipe (mean over seeds, 10-step running mean), one panel per model, and the gradient
    cosine along the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        ax, fid_ax = axes[0][column], axes[1][column]
        model_seeds = seeds_of(seeds, model)
        for quant in quants:
            curves = [dict(train_curve(run_dir_of(out, model, quant, seed))) for seed in model_seeds]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [sum(c[s] for c in curves) / len(curves) for s in steps]
            smooth = [sum(mean[max(0, i - 9):i + 1]) / len(mean[max(0, i - 9):i + 1]) for i in range(len(mean))]
            ax.plot(steps, smooth, label=quant)
            probes = _by_step([p for seed in model_seeds for p in fidelity(run_dir_of(out, model, quant, seed))])
            if probes:
                fid_ax.plot([p["step"] for p in probes], [1 - p["cosine"] for p in probes], marker="o", label=quant)
        ax.set_title(f"{model}: training loss (mean of {len(model_seeds)} seeds, 10-step mean)")
        ax.set_xlabel("step")
        ax.set_ylabel("nats/token")
        ax.legend()
        fid_ax.set_title(f"{model}: 1 − cosine(gradient, QuEST's backward)")
        fid_ax.set_xlabel("step")
        fid_ax.set_yscale("log")
        fid_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the record ----

def record_rows(summary: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """One record row per model and recipe: ``model, recipe, seeds, val_loss`` (per seed, nats/token on the whole
    validation split), ``mean``, ``vs_<recipe>`` ([mean, standard error, pairs] of the paired difference, or None),
    ``fidelity`` ({figure: [min, mean, max]} of the gradient probes, or None) and ``code_versions`` (per seed: the
    code version the run was trained at, from its run.json)."""
    rows = []
    for model, model_rows in summary.items():
        for quant, row in model_rows.items():
            seeds = sorted(row["val_loss"])
            versions = [RunRecord.read(run_dir_of(out, model, quant, seed)).code_version for seed in seeds]
            rows.append({"model": model, "recipe": quant, "seeds": seeds,
                         "val_loss": [row["val_loss"][seed] for seed in seeds], "mean": row["mean"],
                         **{key: list(row[key]) if key in row else None
                            for key in (f"vs_{BASELINE}", "vs_bf16", f"vs_{REPLICA}")},
                         "fidelity": {key: list(value) for key, value in row["fidelity"].items()}
                         if "fidelity" in row else None,
                         "code_versions": versions})
    return rows


def summary_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The :func:`summarize` figures :func:`model_report` reads, rebuilt from :func:`record_rows`."""
    summary: dict[str, Any] = {}
    for row in rows:
        entry = {key: value for key, value in row.items() if value is not None and key not in ("model", "recipe")}
        entry["val_loss"] = dict(zip(row["seeds"], row["val_loss"], strict=True))
        summary.setdefault(row["model"], {})[row["recipe"]] = entry
    return summary


def evaluation_of(out: Path, model: str, quant: str, seed: int) -> dict[str, Any]:
    """What one run's full evaluation covered (``windows``, ``seq_len``, ``tokens`` from its full_val.json)."""
    full = json.loads((run_dir_of(out, model, quant, seed) / "full_val.json").read_text())
    return {key: full.get(key) for key in ("windows", "seq_len", "tokens")}


def render(record: BenchmarkRecord) -> str:
    """The Markdown body of the ``backward-study`` record's section of BENCHMARKS.md: per model its seeds and
    :func:`model_report`, then the code versions the runs were trained at."""
    parts = []
    for model, rows in summary_of(record.rows).items():
        seeds = sorted({seed for row in record.rows if row["model"] == model for seed in row["seeds"]})
        evaluated = record.notes["evaluation"][model]
        parts.append(f"**{model}** (seeds {', '.join(map(str, seeds))}; every loss `bitlaw-eval` on the whole "
                     f"validation split: {evaluated['windows']} windows of {evaluated['seq_len']} tokens)\n\n"
                     f"{model_report(rows)}")
    versions = ", ".join(f"{version} ({count} runs)" for version, count in record.notes["code_versions"].items())
    return "\n".join(parts) + (f"\nRuns trained at code version {versions}; the report was made at commit "
                               f"{record.commit}.\n")


def _model_seeds(text: str) -> tuple[str, list[int]]:
    model, _, seeds = text.partition("=")
    try:
        values = [int(seed) for seed in seeds.split(",")]
    except ValueError:
        values = []
    if model not in MODELS or len(values) < 2:
        raise argparse.ArgumentTypeError(f"--model-seeds {text!r} is not allowed; allowed: MODEL=S,S,… with MODEL one "
                                         f"of {', '.join(MODELS)} and at least 2 integer seeds, e.g. mini=0,1,2")
    return model, values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="study folder (runs, results.json, report.md)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--quant", nargs="+", default=["bf16", BASELINE, REPLICA, "quest_w4a4_g8", "quest_w4a4_g8g8"],
                        help=f"recipes (conf/quant names) and {REPLICA}, the control: {BASELINE} with its initial "
                             "weights one ulp off")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model-seeds", nargs="+", type=_model_seeds, default=[], metavar="MODEL=S,S,…",
                        help="other seeds for a model than --seeds, e.g. mini=0,1,2")
    parser.add_argument("--probe-every", type=int, default=20, help="steps between gradient-fidelity probes")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error(f"--seeds {args.seeds}: paired standard errors need at least 2 seeds")
    seeds = {model: args.seeds for model in args.models} | dict(args.model_seeds)
    if set(seeds) - set(args.models):
        parser.error(f"--model-seeds names {', '.join(sorted(set(seeds) - set(args.models)))}, not among --models "
                     f"{' '.join(args.models)}")
    start = time.time()
    for model in args.models:
        for seed in seeds[model]:
            for quant in args.quant:
                run_one(args.out, model, quant, seed, args.probe_every)
    summary = summarize(args.out, args.models, args.quant, seeds)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    text = report(summary)
    (args.out / "report.md").write_text(text)
    plot(args.out, args.models, args.quant, seeds, args.out / "curves.png")
    print(text)
    print(f"study took {(time.time() - start) / 60:.1f} min; {args.out / 'curves.png'}")
    rows = record_rows(summary, args.out)
    versions = Counter(version or "unknown" for row in rows for version in row["code_versions"])
    devices = {RunRecord.read(run_dir_of(args.out, model, quant, seed)).device or "unknown"
               for model in args.models for seed in seeds[model] for quant in args.quant}
    record = BenchmarkRecord(
        benchmark="backward-study", title="Quantized backward: paired loss study", kind="measured", module=MODULE,
        command=command_line(MODULE, argv), rows=rows,
        notes={"out": str(args.out), "seeds": seeds, "probe_every": args.probe_every,
               "code_versions": dict(sorted(versions.items())),
               "evaluation": {model: evaluation_of(args.out, model, args.quant[0], seeds[model][0])
                              for model in args.models}},
        device=", ".join(sorted(devices)))  # where the runs trained (their run.json), not where this summary ran
    path = write_record(record, record_directory(args))
    if path is not None:
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
