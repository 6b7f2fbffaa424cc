"""``bitlaw-info``: a model preset's shape, parameter counts and the bytes its block weights take in a recipe.

    bitlaw-info model=30m quant=quest_w4a4
    bitlaw-info model=tiny data=embedded                 # the vocabulary training would use with that data set
    bitlaw-info model=tiny model.vocab_size=4096

The vocabulary size is not part of a model preset: training takes it from the data set's tokenizer. bitlaw-info
takes it, in this order, from ``model.vocab_size=N``, from a data config given as in ``bitlaw-prepare``
(``data=<source>`` and ``data.<field>=...``: the prepared data set's meta.json, else the tokenizer's target size),
else the model's default of 32,000; it always prints which one it used and why.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Sequence

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ..core.config import CONF_DIR
from ..data.cli import to_data_config
from ..data.config import DataConfig
from ..data.shards import META_FILE, dataset_dir
from ..kernels.linear import triton_unsupported_reason
from ..kernels.packing import field_bits
from ..kernels.recipe import Recipe, TensorSpec
from ..models.convert import BLOCK_PROJECTIONS, convert
from ..models.llama import LlamaConfig, LlamaModel


def block_weight_bytes(model: torch.nn.Module, recipe: Recipe) -> tuple[int, int]:
    """``(elements, bytes)`` of the block projection weights stored as ``recipe.weight`` says.

    Quantized weights take the bytes of the native export (:mod:`bitlaw.deploy.native`): codes packed at 1, 2, 4
    or 8 bits plus one fp32 scale per output row (``gaussian_rms``/``absmax``) or per tensor (``lsq``, ``lsq_step``);
    unquantized ones take 2 bytes (bf16). Sparse, grouped or outlier-keeping weights, which no export packs yet,
    take what :meth:`~bitlaw.kernels.recipe.TensorSpec.storage_bits` counts (docs/numerics.md §7).
    """
    elements = total = 0
    spec = recipe.weight
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not _is_block_projection(name):
            continue
        rows, cols = module.weight.shape
        elements += rows * cols
        if spec.sparse or spec.group is not None or spec.outliers:
            total += math.ceil(rows * cols * spec.storage_bits(cols) / 8)
        elif spec.quantized:
            scales = 1 if spec.learned_scale else rows
            total += rows * -(-cols * field_bits(len(spec.fmt.levels)) // 8) + 4 * scales
        else:
            total += 2 * rows * cols
    return elements, total


def _is_block_projection(name: str) -> bool:
    return re.fullmatch(BLOCK_PROJECTIONS, name) is not None


def _describe(spec: TensorSpec) -> str:
    extra = []
    if spec.sparse:
        amount = spec.structure if spec.nm else f"{spec.sparsity:g} per {spec.structure}"
        extra.append(f"sparsity {amount} ({spec.sparse_rule})")
    if spec.group is not None:
        extra.append(f"scale groups of {spec.group}")
    if spec.outliers:
        extra.append(f"outliers {spec.outliers:g} in bf16")
    suffix = "".join(f", {e}" for e in extra)
    if not spec.quantized:
        return f"bf16 (not quantized{suffix})"
    clip = f" s={spec.mask_threshold:g}" if spec.grad == "clip" else ""
    rotation = f"hadamard/{spec.block}" if spec.rotated else "no rotation"
    return f"{spec.format} ({spec.scale} scale, {spec.grad}{clip} gradient, {rotation}{suffix})"


def fast_path_line(recipe: Recipe) -> str:
    """Which kernels train ``recipe``'s projections on CUDA (under bf16 autocast), and why not the fast path."""
    if not recipe.compressed:
        return "on CUDA: nn.Linear (cuBLAS bf16); nothing is quantized"
    reason = triton_unsupported_reason(recipe, torch.bfloat16, torch.float32)
    if reason is not None:
        return f"on CUDA: the reference path (plain PyTorch), not the fast path: {reason}"
    if not recipe.input.quantized:
        return "on CUDA: the fast path (fused Triton weight quantizer, then cuBLAS)"
    from ..kernels.triton.quant import code_dtype  # the fast path decided to run: Triton is importable

    int8 = torch.int8 in (code_dtype(recipe.weight.fmt.bits), code_dtype(recipe.input.fmt.bits))
    gemm = "torch._int_mm on int8 codes" if int8 else "torch._scaled_mm on fp8 e4m3 codes"
    backward = "8-bit gradients on the same vendor GEMMs" if recipe.quantized_backward else "bf16 cuBLAS backward"
    return f"on CUDA: the fast path (fused Triton quantizers, {gemm}, {backward})"


def report(model_cfg: LlamaConfig, recipe: Recipe, model_name: str, vocab_source: str | None = None) -> str:
    """The text ``bitlaw-info`` prints; ``vocab_source`` says where the vocabulary size came from (a line of its
    own when given). Builds the model on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = LlamaModel(model_cfg)
    if recipe.compressed:
        convert(model, recipe)
    elements, nbytes = block_weight_bytes(model, recipe)
    _, bf16_bytes = block_weight_bytes(model, Recipe())
    c = model_cfg
    lines = [
        f"model {model_name}: n_layer={c.n_layer} d_model={c.d_model} n_head={c.n_head} head_dim={c.head_dim} "
        f"mlp_hidden={c.hidden} vocab_size={c.vocab_size} max_seq_len={c.max_seq_len}",
        *([f"vocab_size {c.vocab_size:,}: {vocab_source}"] if vocab_source else []),
        f"non-embedding parameters N: {model.num_params(non_embedding=True):,}",
        f"embedding parameters (embed_tokens + lm_head): {c.params_embedding:,}",
        f"total parameters: {model.num_params(non_embedding=False):,}",
        f"recipe {recipe.name}: weight {_describe(recipe.weight)}; input {_describe(recipe.input)}"
        + ("; the weight stays rotated (layout rotated: y = x·Q(W·H)ᵀ)" if recipe.layout == "rotated" else ""),
        f"block weights: {elements:,} elements, {nbytes:,} bytes ({nbytes / 2**20:,.1f} MiB) in {recipe.name}, "
        f"{nbytes / bf16_bytes:.3f}x of bf16 ({bf16_bytes:,} bytes)",
        fast_path_line(recipe),
    ]
    return "\n".join(lines)


def _key(override: str) -> str:
    """The config key an override sets: ``data`` for ``data=files``, ``data.paths`` for ``+data.paths=[...]``."""
    return override.split("=", 1)[0].lstrip("+~")


def _data_config(overrides: list[str]) -> DataConfig:
    """The data config ``overrides`` (``data=<source>``, ``data.<field>=...``) compose to, as bitlaw-prepare sees it,
    with relative paths taken from the current directory."""
    # conf/info.yaml has no data group: the data group is composed through conf/prepare.yaml, whose default it is.
    selection = [o.lstrip("+") if _key(o) == "data" else o for o in overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="prepare", overrides=selection)
    data = to_data_config(cfg.data)
    data.cache_dir = os.path.abspath(data.cache_dir)
    data.paths = [os.path.abspath(path) for path in data.paths]
    if data.tokenizer.endswith(".json"):
        data.tokenizer = os.path.abspath(data.tokenizer)
    return data


def vocab_from_data(data: DataConfig, name: str) -> tuple[int | None, str]:
    """``(vocab_size or None, where it comes from)`` for the data set ``data`` (``name``: how the user chose it):
    the prepared data set's meta.json, else a tokenizer file's size or the BPE's target size; None for a hub
    tokenizer whose size is known only once the data set is prepared."""
    data.validate()
    meta = dataset_dir(data) / META_FILE
    if meta.is_file():
        size = int(json.loads(meta.read_text(encoding="utf-8"))["vocab_size"])
        return size, f"the prepared data set of {name} ({meta})"
    not_prepared = f"{name} is not prepared yet (no {meta})"
    if data.tokenizer == "bpe":
        return data.bpe_vocab_size, f"data.bpe_vocab_size of {name}, the BPE's target size; {not_prepared}"
    if data.tokenizer.endswith(".json"):
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(data.tokenizer).get_vocab_size(with_added_tokens=True)
        return size, f"the tokenizer file {data.tokenizer} of {name}"
    return None, (f"{not_prepared} and its tokenizer {data.tokenizer!r} is known only once it is: run bitlaw-prepare "
                  f"with it, or pass model.vocab_size=N")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``bitlaw-info model=<preset> quant=<preset> [model.<field>=<value> ...] [data=<source>
    data.<field>=<value> ...] [model.vocab_size=N]``."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    data_overrides = [o for o in overrides if _key(o) == "data" or _key(o).startswith("data.")]
    vocab_overrides = [o for o in overrides if _key(o) == "model.vocab_size"]
    rest = [o for o in overrides if o not in data_overrides and o not in vocab_overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="info", overrides=rest)
        model = OmegaConf.to_container(cfg.model, resolve=True)
        if vocab_overrides:
            value = vocab_overrides[-1].split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"model.vocab_size={value!r} must be an integer >= 1")
            model["vocab_size"], vocab_source = int(value), "model.vocab_size on the command line"
        elif data_overrides:
            name = " ".join(data_overrides)
            size, vocab_source = vocab_from_data(_data_config(data_overrides), name)
            if size is None:
                raise ValueError(f"vocab_size unknown: {vocab_source}")
            model["vocab_size"] = size
        else:
            vocab_source = ("the model's default; training takes it from its data set's tokenizer (pass data=<source> "
                            "or model.vocab_size=N)")
        model_cfg = LlamaConfig.from_dict(model)
        recipe = Recipe.from_dict(OmegaConf.to_container(cfg.quant, resolve=True))
        model_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "tiny")
        text = report(model_cfg, recipe, model_name, vocab_source)
    except (HydraException, ValueError, FileNotFoundError) as err:
        print(f"bitlaw-info: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
