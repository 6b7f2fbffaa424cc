"""What ``bitlaw-compress`` reports about a model after each stage: storage in the native export's layout, sparsity
and bits per block weight, and the report files (``report.json``, ``report.md``, ``sparsity.png``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..deploy.native import packed_layer_bytes
from ..models.frozen_linear import FrozenQuantLinear
from ..models.quant_linear import QuantLinear

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SPARSITY_PLOT = "sparsity.png"


def _bias_bytes(layer: nn.Module) -> int:
    return 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()


def layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"params", "bytes", "bits_per_weight", "sparsity", "kind"}}`` for every linear projection of
    the blocks (``layers.*``), in module order. ``bytes`` as the native export stores the layer; ``sparsity`` the
    fraction of exact zeros of the weight the layer multiplies by."""
    table = {}
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue
        if isinstance(module, FrozenQuantLinear):
            nbytes = packed_layer_bytes(*module.codes.shape, module.recipe.weight.fmt, module.mask is not None)
            nbytes, params = nbytes + _bias_bytes(module), module.codes.numel()
            zeros = 0.0 if module.mask is None else 1.0 - module.mask.float().mean().item()
            kind = f"{module.recipe.weight.format} frozen"
        elif isinstance(module, QuantLinear) and module.recipe.weight.quantized:
            nbytes = packed_layer_bytes(*module.weight.shape, module.recipe.weight.fmt, False)
            nbytes, params = nbytes + _bias_bytes(module), module.weight.numel()
            zeros = (module.weight == 0).float().mean().item()
            kind = f"{module.recipe.weight.format} trained"
        elif isinstance(module, nn.Linear):
            nbytes = module.weight.numel() * module.weight.element_size() + _bias_bytes(module)
            params, zeros = module.weight.numel(), (module.weight == 0).float().mean().item()
            kind = str(module.weight.dtype).removeprefix("torch.")
        else:
            continue
        table[name] = {"params": params, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params, "sparsity": zeros,
                       "kind": kind}
    return table


def model_size(model: nn.Module) -> dict[str, Any]:
    """Storage of ``model`` in the native export's layout (bytes; the safetensors header not counted): ``bytes``
    (everything), ``block_bytes`` and ``block_params`` (the block projections), ``bits_per_weight`` (of those),
    ``sparsity`` (parameter-weighted, of those), ``n_layer``, and ``layers`` (:func:`layer_table`)."""
    layers = layer_table(model)
    covered = {f"{name}.{leaf}" for name in layers for leaf, _ in model.get_submodule(name).named_parameters()}
    covered |= {f"{name}.{leaf}" for name in layers for leaf, _ in model.get_submodule(name).named_buffers()}
    rest = sum(t.numel() * t.element_size() for key, t in model.state_dict().items()
               if key not in covered and not key.startswith("rope_"))
    block_bytes = sum(row["bytes"] for row in layers.values())
    block_params = sum(row["params"] for row in layers.values())
    return {"bytes": rest + block_bytes, "block_bytes": block_bytes, "block_params": block_params,
            "bits_per_weight": 8 * block_bytes / block_params,
            "sparsity": sum(row["sparsity"] * row["params"] for row in layers.values()) / block_params,
            "n_layer": len(getattr(model, "layers", [])), "layers": layers}


def write_report(directory: Path, report: dict[str, Any]) -> None:
    """``report.json`` (``report`` as it is), ``report.md`` (a table per stage) and ``sparsity.png`` into
    ``directory``."""
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (directory / REPORT_MD).write_text(markdown(report), encoding="utf-8")
    plot_sparsity(report["stages"][-1]["size"]["layers"], directory / SPARSITY_PLOT,
                  f"{report['source']} after {' → '.join(s['stage'] for s in report['stages'][1:]) or 'nothing'}")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report for people: one row per stage (quality, size, time), then the layers of the final model."""
    lines = [f"# bitlaw-compress: {report['source']}", "",
             f"Calibration: {report['calibration']['sequences']} sequences × {report['calibration']['length']} "
             f"tokens of the training split of {report['data']}; evaluation: {report['evaluation']['windows']} "
             f"windows × {report['evaluation']['seq_len']} tokens of its validation split.", "",
             "| stage | loss (nats/token) | perplexity | bits/byte | blocks | block bits/weight | sparsity | bytes | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in report["stages"]:
        quality, size = stage["eval"], stage["size"]
        lines.append(f"| {stage['stage']} | {_fmt(quality['loss'])} | {_fmt(quality['perplexity'], 2)} | "
                     f"{_fmt(quality['bits_per_byte'])} | {size['n_layer']} | {size['bits_per_weight']:.3f} | "
                     f"{size['sparsity']:.3f} | {size['bytes']:,} | {stage['seconds']:.1f} |")
    lines += ["", f"Written: {report['file_bytes']:,} bytes of model.safetensors.", "",
              "## Layers after the last stage", "", "| layer | kind | params | sparsity | bits/weight |",
              "|---|---|---|---|---|"]
    for name, row in report["stages"][-1]["size"]["layers"].items():
        lines.append(f"| {name} | {row['kind']} | {row['params']:,} | {row['sparsity']:.3f} | "
                     f"{row['bits_per_weight']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_sparsity(layers: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """A bar per block projection (in module order) of its sparsity, coloured by projection kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(layers)
    kinds = sorted({name.split(".", 2)[2] for name in names})
    colours = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    figure, axes = plt.subplots(figsize=(max(6.0, 0.18 * len(names) + 2), 4.0))
    axes.bar(range(len(names)), [layers[n]["sparsity"] for n in names],
             color=[colours[n.split(".", 2)[2]] for n in names])
    blocks = sorted({int(name.split(".")[1]) for name in names})
    centres = [sum(i for i, n in enumerate(names) if int(n.split(".")[1]) == b)
               / sum(1 for n in names if int(n.split(".")[1]) == b) for b in blocks]
    axes.set_xticks(centres, [f"block {b}" for b in blocks], rotation=90 if len(blocks) > 12 else 0, fontsize=7)
    axes.set_ylim(0, 1)
    axes.set_ylabel("sparsity (fraction of zeros)")
    axes.set_title(title, fontsize=8)
    axes.legend(handles=[Patch(color=colours[kind], label=kind) for kind in kinds], fontsize=6,
                ncol=min(len(kinds), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
