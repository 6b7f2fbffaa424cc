"""``bitlaw-export``: write a trained checkpoint as a native packed export or a Hugging Face directory.

Every check — the source, the output directory, the tokenizer — runs before anything is written; the export is
written beside ``--out`` and swapped in only once complete (:mod:`bitlaw.deploy.staging`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer

from bitlaw.deploy.hf import export_hf
from bitlaw.deploy.load import LoadedModel, describe_source, load_checkpoint, resolve_source
from bitlaw.deploy.native import NO_TOKENIZER_NOTE, export_native
from bitlaw.deploy.staging import check_out

PROG = "bitlaw-export"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Export a bitlaw-train checkpoint.")
    parser.add_argument("checkpoint", help="a bitlaw-train checkpoint (runs/<run>/checkpoints/last.ckpt) or a run "
                                           "directory (its checkpoints/last.ckpt)")
    parser.add_argument("--format", choices=["native", "hf"], required=True,
                        help="native: packed quantized safetensors; hf: a transformers LlamaForCausalLM directory")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier bitlaw export at --out (only its own files; files you added stay)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", help="tokenizer.json to ship, instead of the one the checkpoint records")
    which.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    return parser


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
    """``bitlaw-export SOURCE --format native|hf --out DIR [--force] [--tokenizer FILE | --no-tokenizer]``; 0 on
    success, 2 on bad input (one line on stderr, nothing written)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        source = resolve_source(args.checkpoint)
        if not source.is_file():
            raise ValueError(f"{source} is not a training checkpoint: bitlaw-export reads a *.ckpt file or a run "
                             "directory (its checkpoints/last.ckpt)")
        check_out(out, args.force, source)  # before the (possibly long) checkpoint load
        if args.tokenizer is not None and not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer!r}: no such file (nothing was written)")
        used = describe_source(args.checkpoint, source)
        if used:
            print(used, file=sys.stderr)
        loaded = _with_tokenizer(load_checkpoint(source), args.tokenizer, args.no_tokenizer)
        if args.format == "native":
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


if __name__ == "__main__":
    raise SystemExit(main())
