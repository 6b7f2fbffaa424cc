"""Outputs of a fit: ``fit.json``, a markdown report and plots (PNG files drawn by matplotlib's Agg canvas).

Everything here works on the plain dicts of ``fit.json`` (``{form: FitResult.to_dict()}``) so plots and reports can
be redrawn from a saved fit (``bitlaw-fit plot``) without refitting. Plots:

- ``loss_vs_N.png``: observed loss against N per recipe, one panel per D/N ratio, with the best form's curves;
- ``capacity_vs_gmse.png``: ρ against GMSE with the fitted tanh curves, one per compression type of the factorized
  form and the gmse form's (ρ for one component, ρ² for two of one GMSE);
- ``capacity_per_bit.png``: effective parameters per bit of weight storage, ρ(R) / S_w, against the bits S_w a
  weight takes in storage (``laws.weight_storage_bits``: scales, sparsity and outliers counted): the highest
  point is the most memory-efficient recipe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from ..kernels.gmse import COMPONENT_TYPES, recipe_components
from ..kernels.recipe import Recipe, TensorSpec
from .laws import (
    PUBLISHED_GMSE,
    STORAGE_ROW,
    capacity,
    capacity_in_range,
    capacity_range_warning,
    chinchilla_loss,
    tanh_capacity,
    weight_storage_bits,
)
from .runs import Run, levels, recipes_of, write_csv

PLOTS = ("loss_vs_N.png", "capacity_vs_gmse.png", "capacity_per_bit.png")
MAX_PANELS = 6


def write_fit_json(entries: dict[str, dict[str, Any]], path: str | Path) -> None:
    """``entries`` (form → FitResult dict) as indented JSON."""
    Path(path).write_text(json.dumps(entries, indent=2) + "\n")


def read_fit_json(path: str | Path) -> dict[str, dict[str, Any]]:
    """The form → entry mapping of a ``fit.json``; ValueError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fit file (bitlaw-fit RUNS --out DIR writes DIR/fit.json)")
    entries = json.loads(path.read_text())
    if not isinstance(entries, dict) or not entries or not all(
            isinstance(e, dict) and {"params", "capacity"} <= set(e) for e in entries.values()):
        raise ValueError(f"{path}: not a bitlaw-fit fit.json (expected form → {{params, capacity, …}})")
    return entries


def primary_form(entries: dict[str, dict[str, Any]]) -> str:
    """The form with the lowest RMSE (first in file order on ties): the one report.md marks "(best)", whose curves
    the plots draw, and the one ``bitlaw-fit predict`` uses unless told otherwise."""
    return min(entries, key=lambda form: entries[form]["rmse"])


def entry_warnings(form: str, entry: dict[str, Any]) -> list[str]:
    """The fit's own warnings for ``form``, then one per capacity outside (0, 1]: the fit keeps every ρ in range,
    so such a value comes from a fit.json written without the bounds or edited, and must not be shown silently."""
    return [*entry.get("warnings", []),
            *(capacity_range_warning(form, name, rho) for name, rho in entry["capacity"].items()
              if not capacity_in_range(rho))]


def _recipes(entries: dict[str, dict[str, Any]]) -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for entry in entries.values():
        for name, data in entry.get("recipes", {}).items():
            out.setdefault(name, Recipe.from_dict(data))
    return out


def _figure(size: tuple[float, float]) -> Figure:
    """A figure drawn by the Agg canvas directly: no pyplot, so no global backend is chosen or changed for the
    caller (a notebook keeps its own), and nothing stays registered after saving."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _spec_label(spec: TensorSpec) -> str:
    """A role's format, with its sparsity when it has one (``int4 + 50% row magnitude``, ``bf16 + 2:4``)."""
    if not spec.sparse:
        return spec.format
    pattern = spec.structure if spec.nm else f"{spec.sparsity:.0%} {spec.structure} {spec.sparse_rule}"
    return f"{spec.format} + {pattern}"


def _gmse_cell(recipe: Recipe, role: str) -> str:
    """The GMSE of each component of ``role``: ``q`` quantization, ``s`` sparsity; Monte Carlo values with ± their
    standard error; ``0`` for an uncompressed role."""
    parts = [f"{c.type[0]} {_fmt(c.gmse.value)}" + (f" ± {c.gmse.stderr:.1g}" if c.gmse.method == "monte-carlo" else "")
             for c in recipe_components(recipe) if c.role == role]
    return " · ".join(parts) or "0"


def factorization_section(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: the factorization error of every composite recipe whose parts were trained alone, from the
    decoupled fit (:mod:`scaling.factorization`)."""
    lines = ["## Factorization error", ""]
    if "decoupled" not in entries:
        return lines + ["Not measured: the decoupled form (one free ρ per recipe, which the test needs) was not "
                        "fitted."]
    rows = entries["decoupled"].get("factorization")
    if rows is None:
        return lines + ["Not measured: this fit.json was written before bitlaw-fit measured factorization errors; "
                        "refit the runs to measure them."]
    if not rows:
        return lines + ["No recipe of the table is a product of other recipes of the table (e.g. sparse50_w4a4 beside "
                        "sparse50_magnitude and quest_w4a4), so factorization cannot be tested on these runs."]
    lines += ["Decoupled ρ of each composite recipe against the product of the decoupled ρ of its parts, each trained "
              "alone; relative error = Π ρ(parts) / ρ(composite) − 1, with its bootstrap 1σ interval.", "",
              "| composite | parts | ρ composite | Π ρ parts | relative error | 1σ interval |",
              "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        interval = row.get("interval")
        shown = f"[{row['interval'][0]:+.2%}, {row['interval'][1]:+.2%}]" if interval else "—"
        lines.append(f"| {row['composite']} | {' × '.join(row['parts'])} | {row['rho']:.4f} | "
                     f"{row['rho_product']:.4f} | {row['relative_error']:+.2%} | {shown} |")
    return lines


def markdown_report(entries: dict[str, dict[str, Any]], runs: Sequence[Run]) -> str:
    """The report: fit quality per form, parameters ± 1σ, capacity per recipe, warnings, plots."""
    recipes = _recipes(entries)
    best = primary_form(entries)
    first = next(iter(entries.values()))
    lines = ["# Precision scaling-law fit", "",
             f"{len(runs)} runs, {len(recipes)} recipes, {len({r.N for r in runs})} sizes "
             f"(N {_fmt(min(r.N for r in runs))} … {_fmt(max(r.N for r in runs))}), D/N "
             f"{_fmt(min(r.D / r.N for r in runs))} … {_fmt(max(r.D / r.N for r in runs))}. Huber δ = "
             f"{first['delta']:g} on log loss; {first['bootstrap']} bootstrap resamples (seed {first['seed']}); "
             "L(N, D, R) = A / (N·ρ(R))^α + B / D^β + E.", "",
             "## Fit quality", "", "| form | parameters | RMSE (loss, nats) | Huber objective | warnings |",
             "|---|---:|---:|---:|---:|"]
    for form, entry in entries.items():
        mark = " (best)" if form == best else ""
        lines.append(f"| {form}{mark} | {entry['n_params']} | {entry['rmse']:.4g} | {entry['objective']:.4g} | "
                     f"{len(entry_warnings(form, entry))} |")
    lines += ["", "## Parameters (value, bootstrap 1σ interval)", ""]
    for form, entry in entries.items():
        lines += [f"### {form}", "", "| parameter | value | 1σ interval |", "|---|---:|---:|"]
        for name, value in entry["params"].items():
            interval = entry["intervals"].get(name)
            shown = f"[{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "—"
            lines.append(f"| {name} | {_fmt(value)} | {shown} |")
        notes = [f"Note: {note.removeprefix(f'{form}: ')}." for note in entry.get("notes", [])]
        lines += ["", *notes, ""] if notes else [""]
    forms = list(entries)
    lines += ["## Capacity ρ per recipe", "",
              f"ρ/bit = ρ / bits of weight storage under the best form ({best}): effective parameters per stored "
              "weight bit (storage with scales, sparsity bitmaps and outliers counted, rows of "
              f"{STORAGE_ROW} entries), higher is more memory-efficient. GMSE per component of each role (q "
              "quantization, s sparsity), ± the standard error where it is a Monte Carlo value "
              "(docs/scaling-laws.md §7).", "",
              "| recipe | weight | input | GMSE w | GMSE in | " + " | ".join(f"ρ {f}" for f in forms) + " | ρ/bit |",
              "|---|---|---|---:|---:|" + "---:|" * (len(forms) + 1)]
    per_bit = {}
    for name, recipe in recipes.items():
        bits_w = weight_storage_bits(recipe)
        rho = [entries[f]["capacity"].get(name) for f in forms]
        per_bit[name] = entries[best]["capacity"][name] / bits_w
        lines.append(f"| {name} | {_spec_label(recipe.weight)} | {_spec_label(recipe.input)} | "
                     f"{_gmse_cell(recipe, 'weight')} | {_gmse_cell(recipe, 'input')} | "
                     + " | ".join("—" if v is None else f"{v:.4f}" for v in rho) + f" | {per_bit[name]:.4f} |")
    top = max(per_bit, key=per_bit.get)
    best_warnings = entry_warnings(best, entries[best])
    caveat = (f" The {best} fit has {len(best_warnings)} warning(s) below: read its figures with them."
              if best_warnings else "")
    lines += ["", f"Most memory-efficient recipe ({best}): **{top}** ({per_bit[top]:.4f} effective parameters "
              f"per weight bit).{caveat}", "", "## Warnings", ""]
    # Form-specific messages already start with their form; the shared ones (D/N, sizes) get it here.
    messages = [f"- {m}" if m.startswith(f"{form}:") else f"- {form}: {m}"
                for form, entry in entries.items() for m in entry_warnings(form, entry)]
    lines += messages or ["none"]
    lines += ["", *factorization_section(entries)]
    lines += ["", *throughput_section(runs)]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS] + [""]
    return "\n".join(lines)


def throughput_section(runs: Sequence[Run]) -> list[str]:
    """Markdown lines comparing training tokens/s per recipe, with a warning when the runs do not compare like
    with like: quantized runs that ran different kernel paths (Triton and the reference), or runs on different
    devices."""
    timed = [run for run in runs if run.tokens_per_s is not None]
    lines = ["## Throughput", ""]
    if not timed:
        return lines + ["No run records tokens/s."]
    by_recipe: dict[str, list[Run]] = {}
    for run in timed:
        by_recipe.setdefault(run.recipe_name, []).append(run)
    lines += ["Training tokens/s per run as recorded (run.json); ratios compare recipes only when every run of a "
              "size ran on the same device and the quantized runs on the same kernel path.", "",
              "| recipe | runs | tokens/s (mean) | backend | device |", "|---|---:|---:|---|---|"]
    for name, group in by_recipe.items():
        mean = sum(run.tokens_per_s for run in group) / len(group)
        backends = ", ".join(sorted({run.backend or "unknown" for run in group}))
        devices = ", ".join(sorted({run.device or "unknown" for run in group}))
        lines.append(f"| {name} | {len(group)} | {mean:,.0f} | {backends} | {devices} |")
    quantized = [run for run in timed if run.recipe.quantized]
    paths = sorted({run.backend or "unknown" for run in quantized})
    devices = sorted({run.device or "unknown" for run in timed})
    problems = []
    if len(paths) > 1:
        counts = ", ".join(f"{path}: {sum((r.backend or 'unknown') == path for r in quantized)}" for path in paths)
        problems.append(f"the quantized runs mixed kernel paths ({counts} runs): their tokens/s measure different "
                        "code, not the recipes")
    if len(devices) > 1:
        problems.append(f"the runs ran on different devices ({', '.join(devices)})")
    lines += [""] + [f"**Warning: {problem}.**" for problem in problems]
    return lines


def _ratio_groups(runs: Sequence[Run]) -> list[tuple[float, list[Run]]]:
    """(geometric-mean D/N, runs) per D/N level; one group at the median ratio when there are too many."""
    ratios = [r.D / r.N for r in runs]
    groups = levels(ratios)
    if len(groups) > MAX_PANELS:  # too many to show apart: one panel with curves at the median ratio
        return [(float(np.median(ratios)), list(runs))]
    return [(float(np.exp(np.mean(np.log([ratios[i] for i in group])))), [runs[i] for i in group])
            for group in groups]


def _warned(entries: dict[str, dict[str, Any]], form: str) -> str:
    """A title suffix pointing at the form's warnings, so a plot of an unidentified fit does not look clean."""
    count = len(entry_warnings(form, entries[form]))
    return f" — {count} fit warning{'s' if count > 1 else ''}, see report" if count else ""


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """Distinct colours: tab10 up to 10 recipes (tab20 pairs light and dark shades that read as one), else tab20."""
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_loss_vs_n(entries: dict[str, dict[str, Any]], runs: Sequence[Run], path: str | Path) -> None:
    """Observed loss vs N per recipe (one panel per D/N ratio) with the best form's fitted curves."""
    form = primary_form(entries)
    params = entries[form]["params"]
    recipes = recipes_of(runs)
    colors = _colors(list(recipes))
    groups = _ratio_groups(runs)
    fig = _figure((4.6 * len(groups) + 0.6, 4.4))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)
    n_grid = np.geomspace(min(r.N for r in runs) / 1.5, max(r.N for r in runs) * 1.5, 100)
    for ax, (ratio, group) in zip(axes[0], groups, strict=True):
        for name, recipe in recipes.items():
            mine = [r for r in group if r.recipe_name == name]
            if mine:
                ax.scatter([r.N for r in mine], [r.loss for r in mine], color=colors[name], s=18, zorder=3)
            rho = capacity(form, params, recipe)
            ax.plot(n_grid, chinchilla_loss(params, n_grid, ratio * n_grid, rho), color=colors[name], lw=1.2)
        ax.set_xscale("log")
        # Sizes often span less than a decade: label 1-2-5 steps as 100k, 200k, … instead of crowded minor ticks.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("N (non-embedding parameters)")
        ax.set_title(f"D/N ≈ {ratio:.3g} (curves at this ratio)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("validation loss (nats/token)")
    handles = [Line2D([], [], color=colors[name], marker="o", ms=4, lw=1.2, label=name) for name in recipes]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(f"loss vs N: points = runs, lines = {form} fit (lowest RMSE, {entries[form]['rmse']:.3g})"
                 f"{_warned(entries, form)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _points(entries: dict[str, dict[str, Any]]) -> tuple[str, list[tuple[str, Recipe, float, list[float] | None]]]:
    """(form, [(name, recipe, ρ, interval)]): free efficiencies when fitted, else the best form's capacities."""
    form = "decoupled" if "decoupled" in entries else primary_form(entries)
    recipes = _recipes(entries)
    entry = entries[form]
    return form, [(n, recipes[n], rho, entry["capacity_intervals"].get(n)) for n, rho in entry["capacity"].items()
                  if n in recipes]


def _errorbar(ax: Any, x: float, y: float, interval: list[float] | None, scale: float, top: float,
              **style: Any) -> None:
    """One point at (x, y/scale) with its 1σ bar; a point above ``top`` is drawn as ▲ on the top edge."""
    if y / scale > top:
        ax.plot([x], [top * 0.98], "^", ms=7, **style)
        return
    yerr = None if interval is None else [[max(0.0, y - interval[0]) / scale], [max(0.0, interval[1] - y) / scale]]
    ax.errorbar([x], [y / scale], yerr=yerr, fmt="o", capsize=3, ms=5, **style)


RHO_AXIS_MAX = 1.6  # ρ beyond this (an unidentified fit) is drawn on the edge, so the tanh curves stay readable


def _single_gmse(recipe: Recipe) -> tuple[str, float, int] | None:
    """(type, GMSE, count) when every component of ``recipe`` has one type and one GMSE (W4A4: two int4
    quantizations), else None (bf16, or a mix that no single tanh curve describes)."""
    components = recipe_components(recipe)
    kinds = {(c.type, c.gmse.value) for c in components}
    if len(kinds) != 1:
        return None
    kind, value = kinds.pop()
    return kind, value, len(components)


def plot_capacity_vs_gmse(entries: dict[str, dict[str, Any]], path: str | Path) -> None:
    """ρ vs GMSE: points per recipe whose components share one type and one GMSE; tanh curves (fitted per type by
    the factorized form, the gmse form's single curve, and the published quantization constants)."""
    form, points = _points(entries)
    highest = max([1.0, *(max(rho, interval[1] if interval else rho) for _, _, rho, interval in points)])
    top = 1.08 * min(highest, RHO_AXIS_MAX)
    x = np.geomspace(1e-5, 0.6, 200)
    fig = _figure((6.6, 4.8))
    ax = fig.subplots()
    curves = []
    if "factorized" in entries:
        p = entries["factorized"]["params"]
        for kind, color in zip(COMPONENT_TYPES, ("C0", "C4"), strict=True):
            names = (f"L_c[{kind}]", f"F[{kind}]", f"C[{kind}]")
            if set(names) <= set(p):
                values = {"L_c": p[names[0]], "F": p[names[1]], "C": p[names[2]]}
                curves.append((f"factorized {kind} ({', '.join(f'{v:.3g}' for v in values.values())})", values,
                               color, "-", kind == "quantization"))
    if "gmse" in entries:
        p = entries["gmse"]["params"]
        curves.append((f"gmse fit ({p['L_c']:.3g}, {p['F']:.3g}, {p['C']:.3g})", p, "C1", "-.", True))
    curves.append(("published quantization (1, 0.41, 1.39)", PUBLISHED_GMSE, "0.5", "--", True))
    # ρ² (weights and inputs at one GMSE) only for quantization: recipes sparsify weights alone.
    for label, p, color, style, squared in curves:
        rho = tanh_capacity(x, p["L_c"], p["F"], p["C"])
        off = " (off scale)" if rho.min() > top else ""
        ax.plot(x, rho, color=color, ls=style, label=f"{label}: one component{off}")
        if squared:
            off = " (off scale)" if (rho**2).min() > top else ""
            ax.plot(x, rho**2, color=color, ls=style, lw=0.8, alpha=0.7, label=f"{label}: two (ρ²){off}")
    shown = set()
    for name, recipe, rho, interval in points:
        single = _single_gmse(recipe)
        if single is None:
            continue
        kind, position, count = single
        color = {("quantization", 1): "C2", ("quantization", 2): "C3"}.get((kind, count), "C4")
        shown.add((kind, count, color))
        _errorbar(ax, position, rho, interval, 1.0, top, color=color)
        if rho > top:  # on the top edge: the label goes below-left so it stays inside the axes
            ax.annotate(f"{name} (ρ = {rho:.3g})", (position, top * 0.98), fontsize=7, xytext=(-6, -4),
                        textcoords="offset points", ha="right", va="top")
        else:
            ax.annotate(name, (position, rho), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for kind, count, color in sorted(shown):
        ax.plot([], [], "o", color=color, label=f"{form} fit: {count} {kind} component{'s' if count > 1 else ''} (±1σ)")
    if highest > top:
        ax.plot([], [], "^", color="0.3", label=f"ρ above {top:.2g}, value in the label")
    ax.set_xscale("log")
    ax.set_xlabel("GMSE of each component (Gaussian MSE of the representation)")
    ax.set_ylabel("capacity ρ")
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="lower left")
    ax.set_title(f"capacity vs GMSE (two components of one GMSE: ρ²){_warned(entries, form)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_capacity_per_bit(entries: dict[str, dict[str, Any]], path: str | Path) -> None:
    """ρ(R)/bits_w against weight bits (log-log): fitted points per recipe, and the gmse/kumar laws over
    int1…int8. Log axes because ρ/bit spans bf16's 1/16 to a few tenths, more for an unidentified fit."""
    bits = np.arange(1, 9)
    fig = _figure((6.6, 4.8))
    ax = fig.subplots()
    for form, color in (("gmse", "C0"), ("kumar", "C1")):
        if form in entries:
            p = entries[form]["params"]
            for both, style in ((True, "-"), (False, "--")):
                rho = [capacity(form, p, Recipe(weight=TensorSpec(format=f"int{b}"),
                                                input=TensorSpec(format=f"int{b}" if both else "bf16")))
                       for b in bits]
                what = "weights & inputs" if both else "weights only"
                ax.plot(bits, np.array(rho) / bits, color=color, ls=style, label=f"{form} law: int b, {what}")
    form, points = _points(entries)
    best = max(points, key=lambda item: item[2] / weight_storage_bits(item[1]))
    for name, recipe, rho, interval in points:
        bits_w = weight_storage_bits(recipe)
        _errorbar(ax, bits_w, rho, interval, bits_w, math.inf, color="C3" if name == best[0] else "k")
        ax.annotate(name, (bits_w, rho / bits_w), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    # Plain numbers (0.2, not 2×10⁻¹); minor ticks get labels only while the axis spans about a decade.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if math.log10(high / low) <= 1.3 else NullFormatter())
    ax.set_xticks([1, 2, 3, 4, 8, 16], ["1", "2", "3", "4", "8", "16"])
    ax.set_xlabel("weight bits")
    ax.set_ylabel("ρ / weight bits (effective parameters per stored bit)")
    ax.grid(alpha=0.3, which="both")
    ax.errorbar([], [], yerr=[], fmt="o", color="k", capsize=3, label=f"{form} fit per recipe (±1σ)")
    ax.errorbar([], [], yerr=[], fmt="o", color="C3", capsize=3, label="highest ρ per bit")
    ax.legend(fontsize=7)
    ax.set_title(f"capacity per bit ({form} points): best {best[0]}{_warned(entries, form)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(entries: dict[str, dict[str, Any]], runs: Sequence[Run], out_dir: str | Path,
                 tables: bool = True) -> list[Path]:
    """Write report.md and the PNG plots into ``out_dir`` (and fit.json, runs.csv when ``tables``); return the
    paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / name for name in ("report.md", *PLOTS)]
    if tables:
        write_fit_json(entries, out / "fit.json")
        write_csv(runs, out / "runs.csv")
        written = [out / "fit.json", out / "runs.csv", *written]
    plot_loss_vs_n(entries, runs, out / PLOTS[0])
    plot_capacity_vs_gmse(entries, out / PLOTS[1])
    plot_capacity_per_bit(entries, out / PLOTS[2])
    (out / "report.md").write_text(markdown_report(entries, runs))
    return written
