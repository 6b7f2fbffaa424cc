"""The compressed-tensors export: a ``LlamaForCausalLM`` directory whose block projections are stored as packed
integers times one scale per output row (compressed-tensors ``pack-quantized``), the format transformers loads
through the ``compressed-tensors`` package and vLLM serves.

What is exact (docs/exports.md §2–4 argues each case; docs/numerics.md has the grids):

- QuEST's odd grids ``int{b}`` have no zero level: the trained values are ``(2q+1) · step/2``. They are stored as the
  odd integers ``2q+1`` with scale ``step/2``, which is exact whenever ``2^b - 1`` fits the stored width: int1–int3
  in 4 bits, int4–int7 in 8 bits. A narrower width (``bits=4`` for int4) or int8 is an explicit requantization to the
  nearest integers of a per-row MSE-optimal scale: inexact, and the export measures what it costs.
- The grids with a zero level (``int{b}z``, ``int{b}s``) are integers times ``step`` already: exact in ``b`` bits
  (stored in 4 or 8, the widths vLLM's kernels take). Ternary is exact as ``{-1, 0, 1} · scale``.
- The Hadamard rotation: bitlaw quantizes ``W·H`` and multiplies it by ``x·H``. The export stores ``Q(W·H)`` and
  declares an online block Hadamard on every projection's input (compressed-tensors ``transform_config``, the
  deterministic Sylvester matrix, orthonormal, ``head_dim`` = bitlaw's block), which is the same matrix:
  ``(x·H)·Q(W·H)ᵀ`` is what was trained. transformers (5.x) reads ``transform_config`` but does not apply it;
  :func:`load_for_transformers` applies it with compressed-tensors' own ``apply_transform_config``. With
  ``rotation="folded"`` the rotation is multiplied back into the weights instead (``Q(W·H)·Hᵀ``, no transform to
  apply) and requantized: inexact, measured. A ``layout='rotated'`` recipe (QuEST's weight-only runs) computes
  ``x·Q(W·H)ᵀ``: ``Q(W·H)`` is stored with no transform and nothing to fold, exactly.
- Quantized inputs are declared the way a serving engine quantizes activations: dynamic, symmetric, one scale per
  token, at the recipe's input width. That is not QuEST's RMS-scaled, clipped input quantizer, so a
  weight+activation recipe is never exact there; the export measures the loss it gives.

The directory holds ``config.json`` (with ``quantization_config``), ``model.safetensors`` (per projection
``weight_packed`` int32, ``weight_scale`` fp32 ``[out, 1]``, ``weight_shape``), ``tokenizer.json`` and
``tokenizer_config.json`` unless exported without a tokenizer, and ``bitlaw.json`` (format
``bitlaw-compressed-tensors``): model, recipe, tokenizer, the data set it was trained on, the storage plan and what
the export measured, and the size and sha256 of every file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..kernels.formats import Format
from ..kernels.quantizers import QuantResult, quantize, unrotate
from ..kernels.recipe import Recipe, TensorSpec
from ..models.convert import quantized_layers
from ..models.llama import LlamaConfig
from .hf import hf_config, wrap_transformers_model, write_hf_tokenizer
from .load import LoadedModel
from .manifest import CT_FORMAT, verify_export, write_manifest
from .native import (
    NO_TOKENIZER_NOTE,
    TENSOR_FILE,
    TOKENIZER_FILE,
    compression_fields,
    export_manifest,
    export_tokenizer,
)
from .staging import staged

WIDTHS = (4, 8)
"""Stored weight widths: the ones vLLM's integer weight kernels (WNA16) take; compressed-tensors packs 1 to 8."""
ROTATIONS = ("online", "folded")
_SCALE_CANDIDATES = 64  # per-row scales tried by the MSE search of an inexact requantization


@dataclass(frozen=True)
class StoragePlan:
    """How a recipe's weights and inputs are written: ``bits`` per stored weight integer; ``weights_exact`` when
    the stored integers times their scales equal the trained weight values; ``exact`` when, in addition, the export
    computes what was trained (no input quantization that differs from training's); ``rotation`` "online"
    (declared as a transform), "folded" (multiplied into the weights) or "none"; ``input_bits`` of the dynamic
    per-token input quantization (None: weight-only); ``inexact`` says why when not exact."""

    bits: int
    exact: bool
    weights_exact: bool
    rotation: str
    input_bits: int | None
    inexact: tuple[str, ...]


def trained_integers(fmt: Format) -> tuple[int, int]:
    """The range of the integers a trained weight of format ``fmt`` is, times one per-row scale: the odd codes
    ``2q+1`` of ``int{b}``, ``q`` of ``int{b}z``/``int{b}s``, ``-1, 0, 1`` of ternary. ValueError for grids that
    are not integers times one scale (fp formats), naming what is allowed."""
    if fmt.kind == "int":
        top = 2**fmt.bits - 1
        return -top, top
    if fmt.kind == "intz":
        return fmt.integer_range
    if fmt.kind == "ternary":
        return -1, 1
    raise ValueError(f"weight format {fmt.name!r} is not integers times one scale per row, which is what "
                     "compressed-tensors pack-quantized stores; allowed: int1 … int8 (QuEST's odd grids), "
                     "int{b}z, int{b}s, ternary")


def _fits(low: int, high: int, bits: int) -> bool:
    return -(2 ** (bits - 1)) <= low and high <= 2 ** (bits - 1) - 1


def storage_plan(recipe: Recipe, bits: int | None = None, rotation: str = "online") -> StoragePlan:
    """Decide how ``recipe``'s weights are stored: ``bits`` (4 or 8; None: the narrowest exact width, else 8) and
    ``rotation`` ("online" or "folded"). ValueError, naming the recipe and what is allowed, for recipes without
    quantized weights, grids that are not integers, inputs that are not integer-quantized, sparsity, group scales or
    outliers on either role (docs/numerics.md §7), and bad options."""
    if bits is not None and bits not in WIDTHS:
        raise ValueError(f"--bits {bits} is not allowed; allowed: {', '.join(map(str, WIDTHS))} (the widths serving "
                         "kernels take)")
    if rotation not in ROTATIONS:
        raise ValueError(f"--rotation {rotation!r} is not allowed; allowed: {', '.join(ROTATIONS)}")
    weight, inputs = recipe.weight, recipe.input
    for role, spec in (("weight", weight), ("input", inputs)):
        fields = compression_fields(spec)
        if fields:
            raise ValueError(f"recipe {recipe.name!r}: {role} {' and '.join(fields)} "
                             f"{'is' if len(fields) == 1 else 'are'} not supported by the compressed-tensors export "
                             "(dense integers, one scale per row); --format hf writes the weights exactly as trained")
    if not weight.quantized:
        raise ValueError(f"recipe {recipe.name!r} keeps its weights in {weight.format}: there is nothing for "
                         "compressed-tensors to pack; use --format hf")
    low, high = trained_integers(weight.fmt)
    exact_width = next((width for width in WIDTHS if _fits(low, high, width)), None)
    chosen = bits or exact_width or WIDTHS[-1]
    inexact = []
    if not _fits(low, high, chosen):
        inexact.append(f"the {weight.format} codes ({low} … {high}) do not fit {chosen}-bit integers: weights "
                       f"requantized to {chosen} bits")
    if weight.rotated and inputs.quantized and inputs.rotated != weight.rotated:
        raise ValueError(f"recipe {recipe.name!r} rotates its weights but not its inputs: no transform expresses "
                         "that")
    # layout 'rotated' multiplies the plain input by Q(W·H) itself: no rotation to declare or fold.
    mode = rotation if weight.rotated and recipe.layout == "rotate_back" else "none"
    if mode == "folded":
        inexact.append(f"Hadamard rotation folded into the weights, which were requantized to {chosen} bits")
    weights_exact = not inexact
    input_bits = None
    if inputs.quantized:
        if inputs.fmt.kind not in ("int", "intz"):
            raise ValueError(f"recipe {recipe.name!r} quantizes its inputs to {inputs.format}; a serving engine "
                             "quantizes activations to integers (allowed: int and int{b}z/int{b}s input formats)")
        input_bits = inputs.fmt.bits
        inexact.append(f"inputs quantized as a serving engine does (dynamic, symmetric, per token, {input_bits} "
                       f"bits) instead of {inputs.scale}-scaled {inputs.format}")
    return StoragePlan(chosen, not inexact, weights_exact, mode, input_bits, tuple(inexact))


def trained_as_integers(res: QuantResult, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``(integers int8 [out, in], scale fp32 [out, 1])`` with ``integers · scale`` equal to ``res.values``
    bitwise in fp32 (the products are of the same exact factors: ``(q + ½)·step = (2q+1)·(step/2)``)."""
    if fmt.kind == "int":
        return res.codes.to(torch.int8), (res.step / 2).float()
    if fmt.kind == "intz":
        return (res.codes.to(torch.int32) + fmt.integer_range[0]).to(torch.int8), res.step.float()
    return (res.codes.to(torch.int32) - 1).to(torch.int8), res.scale.float()


def requantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest ``bits``-bit integers of ``weight`` ``[out, in]`` with the per-row scale, among
    :data:`_SCALE_CANDIDATES` between 0.5 and 1 times absmax/qmax, that minimises the squared error:
    ``(integers int8, scale fp32 [out, 1])``."""
    w = weight.float()
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    top = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / high
    best_scale, best_err = top, torch.full_like(top, torch.inf)
    for factor in torch.linspace(0.5, 1.0, _SCALE_CANDIDATES).tolist():
        scale = top * factor
        err = (torch.clamp(torch.round(w / scale), low, high) * scale - w).square().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    return torch.clamp(torch.round(w / best_scale), low, high).to(torch.int8), best_scale


def pack_int32(integers: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' packing of ``integers`` (int8 ``[out, in]``, in the signed ``bits``-bit range): each
    stored as ``q + 2^(bits-1)`` (unsigned), element ``i`` of a row at bits ``i·bits …`` of the row's
    little-endian int32 words. Returns int32 ``[out, ceil(in · bits / 32)]``."""
    per_word = 32 // bits
    unsigned = integers.to(torch.int64) + 2 ** (bits - 1)
    rows, cols = unsigned.shape
    unsigned = torch.nn.functional.pad(unsigned, (0, -cols % per_word)).view(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantization_config(recipe: Recipe, plan: StoragePlan) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for ``plan``: one group over every ``Linear`` but ``lm_head``."""
    group: dict[str, Any] = {
        "targets": ["Linear"],
        "weights": {"num_bits": plan.bits, "type": "int", "symmetric": True, "strategy": "channel",
                    "dynamic": False},
        "input_activations": None if plan.input_bits is None else {
            "num_bits": plan.input_bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
        "output_activations": None,
        "format": "pack-quantized",
    }
    transforms: dict[str, Any] = {}
    if plan.rotation == "online":
        transforms = {"config_groups": {"bitlaw_hadamard": {
            "type": "hadamard", "head_dim": recipe.weight.block, "randomize": False,
            "apply": [{"targets": ["Linear"], "location": "input", "inverse": False, "ignore": ["lm_head"]}]}}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], "sparsity_config": {},
            "transform_config": transforms}


def ct_state_dict(loaded: LoadedModel, plan: StoragePlan) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensor names → tensors: per quantized projection ``weight_packed``, ``weight_scale``
    and ``weight_shape``; every other tensor as trained, fp32."""
    model, spec = loaded.model, loaded.recipe.weight
    qlayers = quantized_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        prefix = "" if key.startswith("lm_head.") else "model."
        if module_name not in qlayers:
            out[prefix + key] = value.detach().float().contiguous().cpu()
        elif leaf == "weight":
            integers, scale = _stored(qlayers[module_name], spec, plan)
            base = f"{prefix}{module_name}"
            out[f"{base}.weight_packed"] = pack_int32(integers, plan.bits).contiguous()
            out[f"{base}.weight_scale"] = scale.contiguous()
            out[f"{base}.weight_shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
    return out


def _stored(layer: torch.nn.Module, spec: TensorSpec, plan: StoragePlan) -> tuple[torch.Tensor, torch.Tensor]:
    res = quantize(layer.weight.detach().cpu().float(), spec, layer.weight_lsq_scale)
    if plan.rotation == "folded":
        return requantize(unrotate(res.values, spec), plan.bits)
    low, high = trained_integers(spec.fmt)
    if _fits(low, high, plan.bits):
        return trained_as_integers(res, spec.fmt)
    return requantize(res.values, plan.bits)


def export_compressed_tensors(loaded: LoadedModel, out: str | Path, plan: StoragePlan, force: bool = False,
                              measure: Callable[[Path], dict[str, Any]] | None = None) -> list[str]:
    """Write the compressed-tensors export of ``loaded`` (a checkpoint model) to ``out`` following ``plan``
    (:func:`storage_plan`). ``measure``, given the finished directory before it is swapped in, returns what it
    measured (e.g. both validation losses), recorded in the manifest as ``measured``. Returns notes for the user.
    ``out`` follows :func:`bitlaw.deploy.staging.check_out`."""
    out = Path(out)
    tokenizer = export_tokenizer(loaded)
    notes = [f"inexact: {why}" for why in plan.inexact]
    if plan.rotation == "online":
        notes.append("the Hadamard rotation is declared in quantization_config.transform_config: vLLM applies it "
                     "when serving; transformers does not by itself — load with "
                     "bitlaw.deploy.compressed.load_for_transformers, or apply compressed_tensors.transform."
                     "apply_transform_config after from_pretrained")
    with staged(out, force, loaded.source) as staging:
        eos_id = write_hf_tokenizer(staging, tokenizer, loaded.config.max_seq_len)
        if tokenizer is None:
            notes.append(NO_TOKENIZER_NOTE)
        save_file(ct_state_dict(loaded, plan), str(staging / TENSOR_FILE), metadata={"format": "pt"})
        config = {**hf_config(loaded.config, eos_id), "quantization_config": quantization_config(loaded.recipe, plan)}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        measured = measure(staging) if measure is not None else None
        write_manifest(staging, export_manifest(loaded, CT_FORMAT, TOKENIZER_FILE if tokenizer else None,
                                                storage=asdict(plan), measured=measured))
    return notes


def load_for_transformers(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``transformers.LlamaForCausalLM`` of a compressed-tensors export, decompressed by compressed-tensors, with
    the ``transform_config`` of its ``quantization_config`` applied by compressed-tensors'
    ``apply_transform_config`` (transformers 5.x loads it but does not apply it). Needs the ``deploy`` extra."""
    try:
        from compressed_tensors.transform import TransformConfig, apply_transform_config
        from transformers import LlamaForCausalLM
    except ImportError as err:
        raise ImportError("loading a compressed-tensors export needs transformers and compressed-tensors: pip "
                          "install 'bitlaw[deploy]'") from err
    directory = Path(directory)
    model = LlamaForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    transforms = json.loads((directory / "config.json").read_text())["quantization_config"].get("transform_config")
    if transforms:
        apply_transform_config(model, TransformConfig.model_validate(transforms))
    return model.eval()


def load_compressed_tensors(directory: str | Path, device: str = "cpu") -> LoadedModel:
    """A compressed-tensors export written by bitlaw, verified against its manifest (every file's size and
    sha256) before anything is read, then loaded with :func:`load_for_transformers`."""
    directory = Path(directory)
    manifest = verify_export(directory, CT_FORMAT, ("config.json", TENSOR_FILE))
    model = wrap_transformers_model(load_for_transformers(directory)).to(device)
    tokenizer = directory / manifest.tokenizer if manifest.tokenizer else None
    return LoadedModel(model, LlamaConfig.from_dict(manifest.model), Recipe.from_dict(manifest.recipe), tokenizer,
                       "compressed-tensors", directory, True, manifest.data)
