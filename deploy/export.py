"""``bitlaw-export``: write a trained checkpoint as a native packed export, a Hugging Face directory or a
compressed-tensors checkpoint for serving engines.

Every check — the source, the output directory, the tokenizer — runs before anything is written; the export is
written beside ``--out`` and swapped in only once complete (:mod:`bitlaw.deploy.staging`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..data.shards import load_prepared
from .compressed import export_compressed_tensors, load_for_transformers, storage_plan
from .evaluate import evaluate
from .hf import export_hf, wrap_transformers_model
from .load import LoadedModel, describe_source, load_checkpoint, resolve_source, training_run
from .manifest import MANIFEST_FILE, NATIVE_FORMAT, export_format, read_manifest
from .native import NO_TOKENIZER_NOTE, export_native, load_native
from .staging import check_out

PROG = "bitlaw-export"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Export a bitlaw-train checkpoint or a native export.")
    parser.add_argument("checkpoint", help="a bitlaw-train checkpoint (runs/<run>/checkpoints/last.ckpt), a run "
                                           "directory (its checkpoints/last.ckpt), or a native export (e.g. "
                                           "bitlaw-compress' output) for --format hf or native")
    parser.add_argument("--format", choices=["native", "hf", "compressed-tensors"], required=True,
                        help="native: packed quantized safetensors, exact; hf: a transformers LlamaForCausalLM "
                             "directory, weights dequantized; compressed-tensors: packed integers for transformers "
                             "and vLLM")
    parser.add_argument("--bits", type=int, default=None,
                        help="compressed-tensors: stored weight width, 4 or 8 (default: the narrowest exact one)")
    parser.add_argument("--rotation", default=None, choices=["online", "folded"],
                        help="compressed-tensors: the Hadamard rotation as an online transform (default, exact) or "
                             "folded into the weights and requantized (inexact, needs no transform support)")
    parser.add_argument("--no-measure", action="store_true",
                        help="compressed-tensors: skip measuring the export's validation loss against the "
                             "checkpoint's")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier bitlaw export at --out (only its own files; files you added stay)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", help="tokenizer.json to ship, instead of the one the checkpoint records")
    which.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    return parser


def _is_native_export(path: Path) -> bool:
    """True for a directory holding a native export's manifest."""
    return path.is_dir() and (path / MANIFEST_FILE).is_file() and export_format(path) == NATIVE_FORMAT


def _with_tokenizer(loaded: LoadedModel, tokenizer: str | None, no_tokenizer: bool) -> LoadedModel:
    """``loaded`` with the tokenizer the export ships: ``tokenizer`` (an existing file), none with ``no_tokenizer``,
    else the recorded one. FileNotFoundError / ValueError when there is none to ship and --no-tokenizer was not
    given, or the one given is not a tokenizer that fits the model."""
    if no_tokenizer:
        return replace(loaded, tokenizer_path=None)
    if tokenizer is not None:
        path = Path(tokenizer)
        try:
            size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"--tokenizer {tokenizer!r} is not a tokenizers file ({err})") from None
        if size > loaded.config.vocab_size:
            raise ValueError(f"--tokenizer {tokenizer!r} has {size} token ids, more than the model's vocab_size="
                             f"{loaded.config.vocab_size}: not the tokenizer it was trained with (nothing was written)")
        return replace(loaded, tokenizer_path=path)
    if loaded.tokenizer_path is None:
        raise ValueError(f"checkpoint {loaded.source} records no tokenizer: pass --tokenizer PATH/tokenizer.json, or "
                         "--no-tokenizer to export without one (nothing was written)")
    if not loaded.tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer {str(loaded.tokenizer_path)!r} recorded in checkpoint {loaded.source} "
                                "does not exist (moved or deleted data set?): pass --tokenizer PATH/tokenizer.json, "
                                "or --no-tokenizer to export without one (nothing was written)")
    return loaded


def main(argv: list[str] | None = None) -> int:
    """``bitlaw-export SOURCE --format native|hf|compressed-tensors --out DIR [--force] [--tokenizer FILE |
    --no-tokenizer] [--bits 4|8] [--rotation online|folded] [--no-measure]``; 0 on success, 2 on bad input (one
    line on stderr, nothing written)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        source = resolve_source(args.checkpoint)
        native_source = _is_native_export(source)
        if not source.is_file() and not native_source:
            raise ValueError(f"{source} is neither a training checkpoint nor a native export: bitlaw-export reads a "
                             "*.ckpt file, a run directory (its checkpoints/last.ckpt) or a native export directory "
                             "(bitlaw-compress writes one)")
        if native_source and args.format == "compressed-tensors":
            raise ValueError(f"{source} is a native export: --format compressed-tensors is written from training "
                             "checkpoints only (allowed from a native export: --format hf, --format native)")
        check_out(out, args.force, source)  # before the (possibly long) checkpoint load
        if args.tokenizer is not None and not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer!r}: no such file (nothing was written)")
        used = describe_source(args.checkpoint, source)
        if used:
            print(used, file=sys.stderr)
        ct_options = [name for name, given in (("--bits", args.bits is not None),
                                               ("--rotation", args.rotation is not None),
                                               ("--no-measure", args.no_measure)) if given]
        if ct_options and args.format != "compressed-tensors":
            raise ValueError(f"{', '.join(ct_options)}: only for --format compressed-tensors, not {args.format}")
        loaded = _with_tokenizer(load_native(source) if native_source else load_checkpoint(source), args.tokenizer,
                                 args.no_tokenizer)
        if args.format == "compressed-tensors":
            _export_compressed(loaded, out, args)
        elif args.format == "native":
            sizes = export_native(loaded, out, args.force)
            ratio = sizes["block_weight_bytes"] / sizes["block_weight_bytes_bf16"]
            print(f"wrote {out} ({sizes['file_bytes']:,} bytes); block weights {sizes['block_weight_bytes']:,} bytes = "
                  f"{ratio:.3f}x of bf16 ({sizes['block_weight_bytes_bf16']:,} bytes)")
            if loaded.tokenizer_path is None:
                print(f"note: {NO_TOKENIZER_NOTE}")
        else:
            for note in export_hf(loaded, out, args.force):
                print(f"note: {note}")
            print(f"wrote {out}: load it with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    return 0


def _export_compressed(loaded: LoadedModel, out: Path, args: argparse.Namespace) -> None:
    plan = storage_plan(loaded.recipe, args.bits, args.rotation or "online")
    measure, why_not = (None, "--no-measure") if args.no_measure else measurement(loaded)
    notes = export_compressed_tensors(loaded, out, plan, args.force, measure)
    what = f"W{plan.bits}A{plan.input_bits or 16}, rotation {plan.rotation}"
    weights = "weights exact" if plan.weights_exact else "weights requantized: inexact"
    inputs = "" if plan.input_bits is None else "; inputs quantized as a serving engine does: inexact"
    print(f"wrote {out} ({what}; {weights}{inputs})")
    for note in notes:
        print(f"note: {note}")
    measured = read_manifest(out).measured
    if measured:
        difference = round(measured["difference"], 4) or 0.0  # no "-0.0000" for a difference of float rounding
        print(f"validation loss on {measured['windows']}: checkpoint {measured['trained_loss']:.4f}, this export "
              f"{measured['export_loss']:.4f} ({difference:+.4f} nats/token, loaded with "
              f"{measured['loaded_with']})")
    else:
        print(f"note: the export's loss was not measured: {why_not}")


def measurement(loaded: LoadedModel) -> tuple[Callable[[Path], dict[str, Any]] | None, str | None]:
    """A function that measures a written compressed-tensors export (its directory) against ``loaded``: the
    validation loss of both on the same windows, the export loaded by transformers and compressed-tensors — or
    ``(None, why not)`` when there is no data set to measure on or the ``deploy`` extra is missing."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return None, "compressed-tensors is not installed (pip install 'bitlaw[deploy]')"
    data = loaded.data
    if not data or not (Path(data.directory) / "meta.json").is_file():
        where = f"{data.directory} is not a prepared data set" if data else "the checkpoint records no data set"
        return None, where
    run = training_run(loaded.source)
    if run is not None and None not in (run.seq_len, run.global_batch, run.val_batches):
        seq_len, batch, batches = run.seq_len, run.global_batch, run.val_batches
        windows = f"training's validation windows ({batches} × {batch}, seq_len {seq_len})"
    else:
        seq_len, batch, batches = min(256, loaded.config.max_seq_len), 8, 8
        windows = f"the first {batch * batches} validation windows (seq_len {seq_len})"
    tokens = load_prepared(Path(data.directory)).val_tokens

    def measure(directory: Path) -> dict[str, Any]:
        trained = evaluate(loaded.model, tokens, seq_len, batch, batches)["loss"]
        exported = evaluate(wrap_transformers_model(load_for_transformers(directory)), tokens, seq_len, batch,
                            batches)["loss"]
        versions = ", ".join(f"{name} {importlib.metadata.version(name)}"
                             for name in ("transformers", "compressed-tensors"))
        return {"windows": windows, "trained_loss": trained, "export_loss": exported,
                "difference": exported - trained, "loaded_with": versions}

    return measure, None


if __name__ == "__main__":
    raise SystemExit(main())
