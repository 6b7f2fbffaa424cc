"""``bitlaw-info``: a model preset's shape, parameter counts and the bytes its block weights take in a recipe."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from bitlaw.kernels.packing import field_bits
from bitlaw.kernels.recipe import CONF_DIR, Recipe, TensorSpec
from bitlaw.models.convert import BLOCK_PROJECTIONS, convert
from bitlaw.models.llama import LlamaConfig, LlamaModel


def block_weight_bytes(model: torch.nn.Module, recipe: Recipe) -> tuple[int, int]:
    """``(elements, bytes)`` of the block projection weights stored as ``recipe.weight`` says.

    Quantized weights take the bytes of the native export (:mod:`bitlaw.deploy.native`): codes packed at 1, 2, 4
    or 8 bits plus one fp32 scale per output row (``gaussian_rms``/``absmax``) or per tensor (``lsq``); unquantized ones
    take 2 bytes (bf16).
    """
    elements = total = 0
    spec = recipe.weight
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not _is_block_projection(name):
            continue
        rows, cols = module.weight.shape
        elements += rows * cols
        if spec.quantized:
            scales = 1 if spec.scale == "lsq" else rows
            total += rows * -(-cols * field_bits(len(spec.fmt.levels)) // 8) + 4 * scales
        else:
            total += 2 * rows * cols
    return elements, total


def _is_block_projection(name: str) -> bool:
    return re.fullmatch(BLOCK_PROJECTIONS, name) is not None


def _describe(spec: TensorSpec) -> str:
    if not spec.quantized:
        return "bf16 (not quantized)"
    clip = f" s={spec.mask_threshold:g}" if spec.grad == "clip" else ""
    rotation = f"hadamard/{spec.block}" if spec.rotated else "no rotation"
    return f"{spec.format} ({spec.scale} scale, {spec.grad}{clip} gradient, {rotation})"


def report(model_cfg: LlamaConfig, recipe: Recipe, model_name: str) -> str:
    """The text ``bitlaw-info`` prints. Builds the model on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = LlamaModel(model_cfg)
    if recipe.quantized:
        convert(model, recipe)
    elements, nbytes = block_weight_bytes(model, recipe)
    _, bf16_bytes = block_weight_bytes(model, Recipe())
    c = model_cfg
    lines = [
        f"model {model_name}: n_layer={c.n_layer} d_model={c.d_model} n_head={c.n_head} head_dim={c.head_dim} "
        f"mlp_hidden={c.hidden} vocab_size={c.vocab_size} max_seq_len={c.max_seq_len}",
        f"non-embedding parameters N: {model.num_params(non_embedding=True):,}",
        f"embedding parameters (embed_tokens + lm_head): {c.params_embedding:,}",
        f"total parameters: {model.num_params(non_embedding=False):,}",
        f"recipe {recipe.name}: weight {_describe(recipe.weight)}; input {_describe(recipe.input)}",
        f"block weights: {elements:,} elements, {nbytes:,} bytes ({nbytes / 2**20:,.1f} MiB) in {recipe.name}, "
        f"{nbytes / bf16_bytes:.3f}x of bf16 ({bf16_bytes:,} bytes)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``bitlaw-info model=<preset> quant=<preset> [model.<field>=<value> ...]``."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="info", overrides=overrides)
        model_cfg = LlamaConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        recipe = Recipe.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
        model_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "tiny")
        text = report(model_cfg, recipe, model_name)
    except (HydraException, ValueError) as err:
        print(f"bitlaw-info: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
