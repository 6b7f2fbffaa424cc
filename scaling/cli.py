"""``bitlaw-fit`` (also ``python -m bitlaw.scaling``): fit precision scaling laws to runs, predict losses, redraw plots.

    bitlaw-fit RUNS... --out DIR [--forms decoupled gmse factorized kumar] [--delta 1e-3] [--bootstrap 100] [--seed 0]
    bitlaw-fit predict --fit DIR/fit.json --recipe R --N n --D d [--form F]
    bitlaw-fit predict --fit DIR/fit.json --memory-bytes M --D d [--recipes R...]
    bitlaw-fit predict --fit DIR/fit.json --compute-flops C [--ratio 100 | --D d] [--cost bits|flat] [--recipes R...]
    bitlaw-fit plot --fit DIR/fit.json [--runs DIR/runs.csv] --out DIR

RUNS are run directories (searched for run.json), run.json files, CSV files (N, D, loss, recipe) or
wandb:[entity/]project. ``fit`` may be written explicitly (``bitlaw-fit fit RUNS...``). ``predict`` uses the form
report.md calls "(best)" (lowest RMSE) unless ``--form`` names another, and says on stderr which form and why, and
warns there about any capacity it uses that lies outside (0, 1]. Errors exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..kernels.gmse import COMPONENT_TYPES
from ..kernels.recipe import Recipe, load_recipe, recipe_names
from .fit import DEFAULT_DELTA, DEFAULT_REFINE, FitResult, IdentifiabilityWarning, fit_forms
from .laws import FORMS, capacity, capacity_in_range, capacity_range_warning, predict_loss
from .predict import COST_MODELS, rank_recipes
from .report import primary_form, read_fit_json, write_report
from .runs import load_runs, read_csv

COMMANDS = ("fit", "predict", "plot")
DEFAULT_RATIO = 100.0  # D/N of the QuEST recipe (docs/training.md §3)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a positive number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a positive number")
    return value


def _refine(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: an integer ≥ 1 or 'all'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitlaw-fit", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit the law forms and write fit.json, report.md and plots")
    fit.add_argument("runs", nargs="+", help="run directories, run.json or CSV files, or wandb:[entity/]project")
    fit.add_argument("--out", required=True, type=Path, help="output directory")
    fit.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="law forms to fit")
    fit.add_argument("--delta", type=_positive_float, default=DEFAULT_DELTA,
                     help="Huber δ on log-loss residuals (1e-3 Chinchilla/QuEST, 1e-4 Unified)")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for 1σ intervals (0: none)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--refine", type=_refine, default=DEFAULT_REFINE,
                     help=f"L-BFGS-B runs from the best screened grid points ({DEFAULT_REFINE}) or 'all'")

    predict = commands.add_parser("predict", help="predicted loss of a recipe, or the best recipe at a budget")
    predict.add_argument("--fit", required=True, type=Path, help="a fit.json written by bitlaw-fit")
    predict.add_argument("--form", choices=FORMS,
                         help="law form (default: the one report.md calls best, the lowest RMSE)")
    predict.add_argument("--recipe", help="recipe (a fitted recipe name, a conf/quant preset or a recipe YAML file) "
                                          "for one prediction")
    predict.add_argument("--N", type=_positive_float, help="non-embedding parameters")
    predict.add_argument("--D", type=_positive_float, help="training tokens")
    predict.add_argument("--memory-bytes", type=_positive_float,
                         help="rank recipes at this block-weight memory: N = 8·M / weight bits (needs --D)")
    predict.add_argument("--compute-flops", type=_positive_float,
                         help="rank recipes at this training compute in bf16-equivalent FLOPs (6·N·D·P/16 with "
                              "--cost bits; with --D, or D = ratio·N)")
    predict.add_argument("--ratio", type=_positive_float,
                         help=f"D/N for --compute-flops without --D (default {DEFAULT_RATIO:g})")
    predict.add_argument("--cost", choices=COST_MODELS, default="bits",
                         help="compute cost per FLOP: 'bits' (P/16, P the wider operand's bits) or 'flat' (1)")
    predict.add_argument("--recipes", nargs="+", help="candidates to rank (default: the fitted recipes)")

    plot = commands.add_parser("plot", help="redraw report.md and the plots from a fit.json without refitting")
    plot.add_argument("--fit", required=True, type=Path, help="a fit.json written by bitlaw-fit")
    plot.add_argument("--runs", type=Path, help="run table CSV (default: runs.csv beside fit.json)")
    plot.add_argument("--out", type=Path, help="output directory (default: the directory of fit.json)")
    return parser


def run_fit(args: argparse.Namespace) -> None:
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap={args.bootstrap} is not allowed; allowed: an integer ≥ 0")
    runs = load_runs(args.runs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IdentifiabilityWarning)
        results = fit_forms(runs, args.forms, delta=args.delta, bootstrap=args.bootstrap, seed=args.seed,
                            refine=args.refine)
    for warning in caught:  # the fit's own warnings are in fit.json too; show them once here
        print(f"bitlaw-fit: warning: {warning.message}", file=sys.stderr)
    written = write_report({form: result.to_dict() for form, result in results.items()}, runs, args.out)
    for form, result in results.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.params.items())
        print(f"{form}: RMSE {result.rmse:.4g}; {shown}")
        for line in details(result):
            print(f"  {line}")
    print(f"wrote {', '.join(str(p) for p in written)}")


def details(result: FitResult) -> list[str]:
    """The lines below a form's summary: the factorized form's parameters per compression type with their 1σ
    intervals, what it left unfitted, and the decoupled form's factorization errors."""
    lines = []
    if result.form == "factorized":
        for kind in COMPONENT_TYPES:
            names = [name for name in result.params if name.endswith(f"[{kind}]")]
            if names:
                lines.append(f"{kind}: " + ", ".join(
                    f"{name.removesuffix(f'[{kind}]')}={result.params[name]:.4g}"
                    + (" [{:.4g}, {:.4g}]".format(*result.intervals[name]) if name in result.intervals else "")
                    for name in names))
    lines += [note.removeprefix(f"{result.form}: ") for note in result.notes]
    if result.form == "decoupled":
        if not result.factorization:
            lines.append("factorization: no recipe is a product of other recipes of the table; not measured")
        for row in result.factorization:
            interval = " (1σ [{:+.2%}, {:+.2%}])".format(*row["interval"]) if "interval" in row else ""
            lines.append(f"factorization: {row['composite']} vs {' × '.join(row['parts'])}: ρ {row['rho']:.4f} vs "
                         f"{row['rho_product']:.4f}, relative error {row['relative_error']:+.2%}{interval}")
    return lines


def _resolve(name: str, entry: dict[str, Any]) -> Recipe:
    """A fitted recipe of ``entry``, a conf/quant preset, or a recipe YAML file (``*.yaml``: any recipe, e.g. a
    combination of fitted compression types that no run trained)."""
    if name in entry.get("recipes", {}):
        return Recipe.from_dict(entry["recipes"][name])
    if name in recipe_names() or name.endswith((".yaml", ".yml")):
        return load_recipe(name)
    raise ValueError(f"unknown recipe {name!r}; allowed: the fitted recipes ({', '.join(entry.get('recipes', {}))}), "
                     f"a conf/quant preset ({', '.join(recipe_names())}) or a recipe YAML file")


def choose_form(requested: str | None, entries: dict[str, dict[str, Any]], path: Path) -> tuple[str, str]:
    """(form, why) for ``bitlaw-fit predict``: ``requested`` (``--form``) when given, else the form report.md calls
    "(best)" (:func:`scaling.report.primary_form`, lowest RMSE), so a prediction and the report it sits beside
    speak of one fit. ValueError when ``requested`` was not fitted, or when there is no best form to default to
    because an entry of ``path`` records no finite ``rmse``."""
    if requested is not None:
        if requested not in entries:
            raise ValueError(f"--form {requested} was not fitted in {path}; allowed: {', '.join(entries)}")
        return requested, f"form {requested}: chosen with --form"
    if len(entries) == 1:
        form = next(iter(entries))
        return form, f"form {form}: the only form in {path.name}"
    missing = [form for form, entry in entries.items()
               if not (isinstance(entry.get("rmse"), int | float) and math.isfinite(entry["rmse"]))]
    if missing:
        raise ValueError(f"{path}: form(s) {', '.join(missing)} record no finite rmse, so there is no best form to "
                         f"default to; pass --form (allowed: {', '.join(entries)})")
    form = primary_form(entries)
    return form, f"form {form}: the best by RMSE in report.md; --form to choose"


def _warn_out_of_range(form: str, capacities: dict[str, float]) -> None:
    """A warning line on stderr per capacity used that lies outside (0, 1] (only a fit.json written without the
    bounds, or edited, holds one)."""
    for name, rho in capacities.items():
        if not capacity_in_range(rho):
            print(f"bitlaw-fit: warning: {capacity_range_warning(form, name, rho)}", file=sys.stderr)


def run_predict(args: argparse.Namespace) -> None:
    entries = read_fit_json(args.fit)
    form, why = choose_form(args.form, entries, args.fit)
    entry, params = entries[form], entries[form]["params"]
    modes = [name for name, value in (("--recipe/--N", args.N), ("--memory-bytes", args.memory_bytes),
                                      ("--compute-flops", args.compute_flops)) if value is not None]
    if len(modes) != 1:
        raise ValueError(f"give exactly one of --recipe R --N n --D d, --memory-bytes M --D d, --compute-flops C; "
                         f"got {', '.join(modes) or 'none'}")
    if args.N is not None:
        if args.recipe is None or args.D is None:
            raise ValueError("a single prediction needs --recipe, --N and --D")
        recipe = _resolve(args.recipe, entry)
        loss = predict_loss(form, params, recipe, args.N, args.D)
        rho = capacity(form, params, recipe)
        print(f"bitlaw-fit: {why}", file=sys.stderr)  # after every check, so bad input still gets one line
        _warn_out_of_range(form, {args.recipe: rho})
        print(f"{loss:.4f}  predicted loss (nats/token), {form} law: recipe {args.recipe} (ρ {rho:.4f}), "
              f"N {args.N:.4g}, D {args.D:.4g}")
        return
    if args.recipe is not None:
        raise ValueError("--recipe is for one prediction (with --N and --D); rank candidates with --recipes")
    names = args.recipes or list(entry.get("recipes", {}))
    if not names:
        raise ValueError(f"{args.fit}: the {form} entry lists no recipes; pass --recipes")
    if args.memory_bytes is not None:
        if args.D is None or args.ratio is not None:
            raise ValueError("--memory-bytes needs --D (training tokens) and takes no --ratio")
        budget = {"memory_bytes": args.memory_bytes, "D": args.D}
        what = f"block-weight memory {args.memory_bytes:.4g} bytes, D {args.D:.4g}"
    else:
        if args.D is not None and args.ratio is not None:
            raise ValueError("--compute-flops takes --D or --ratio, not both")
        ratio = args.ratio if args.D is None else None
        if args.D is None and ratio is None:
            ratio = DEFAULT_RATIO
        budget = {"compute_flops": args.compute_flops, "D": args.D, "ratio": ratio, "cost": args.cost}
        what = (f"compute {args.compute_flops:.4g} bf16-equivalent FLOPs (cost model {args.cost}), "
                + (f"D {args.D:.4g}" if args.D is not None else f"D/N {ratio:g}"))
    rows = rank_recipes(form, params, {name: _resolve(name, entry) for name in names}, **budget)
    print(f"bitlaw-fit: {why}", file=sys.stderr)
    _warn_out_of_range(form, {row.name: row.rho for row in rows})
    print(f"{form} law at {what}:")
    print(f"{'rank':>4} {'recipe':>14} {'bits_w':>6} {'bits_a':>6} {'stored_w':>8} {'N':>10} {'D':>10} {'rho':>7} "
          f"{'loss':>8}")
    for rank, row in enumerate(rows, start=1):
        print(f"{rank:>4} {row.name:>14} {row.bits_w:>6} {row.bits_a:>6} {row.storage_w:>8.3f} {row.N:>10.4g} "
              f"{row.D:>10.4g} {row.rho:>7.4f} {row.loss:>8.4f}")
    print(f"best: {rows[0].name} (predicted loss {rows[0].loss:.4f})")


def run_plot(args: argparse.Namespace) -> None:
    entries = read_fit_json(args.fit)
    known = {name: Recipe.from_dict(data) for entry in entries.values() for name, data in entry["recipes"].items()}
    runs = read_csv(args.runs or args.fit.parent / "runs.csv", known)
    written = write_report(entries, runs, args.out or args.fit.parent, tables=False)
    print(f"wrote {', '.join(str(p) for p in written)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; ``fit`` is the default command when the first argument names no command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "fit")
    args = build_parser().parse_args(argv)
    try:
        {"fit": run_fit, "predict": run_predict, "plot": run_plot}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"bitlaw-fit: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
