"""``bitlaw-eval``: loss, perplexity and bits per byte of a checkpoint or an export on held-out text.

    bitlaw-eval runs/tiny-bf16-seed0                       # the whole validation split of the run's data set
    bitlaw-eval runs/tiny-bf16-seed0 --windows training    # the windows training validated on: run.json's val_loss
    bitlaw-eval exports/tiny-w4a4 --max-batches 8          # an export: the data set its run was trained on
    bitlaw-eval exports/tiny-hf --text notes.txt --seq-len 256 --json

The token stream is cut into non-overlapping windows of seq_len + 1 tokens exactly as the training run's
validation does (``bitlaw.data.windows.val_batches``: window i starts at token i * seq_len). By default every whole
window is evaluated; training validates on the first val_batches batches of global_batch windows only, which
``--windows training`` selects (with the run's seq_len), so that the loss equals the run record's ``val_loss``.
The summary line and the JSON say which windows were evaluated.
Bits per byte divide the summed loss (in bits) by the UTF-8 size of the text the target tokens decode to, which
makes models with different tokenizers comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from ..core.records import RunSummary
from ..data.shards import load_prepared
from ..data.windows import TokenStream, val_batches
from .generate import check_source
from .load import (
    RUN_RECORD,
    check_device,
    load_model,
    run_record_path,
    source_notes,
    tokenizer_file,
    training_run,
)

PROG = "bitlaw-eval"
WINDOWS = ("all", "training")


def _batches(tokens: Sequence[int] | np.ndarray | TokenStream, seq_len: int, batch_size: int,
             n_windows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """val_batches' batches, produced one at a time: a long stream is never materialised as windows at once."""
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        # The slice starts on a window boundary, so its window 0 is the stream's window `first`.
        piece = tokens[first * seq_len:(first + count) * seq_len + 1]
        yield val_batches(piece, seq_len, count, 1)[0]


class _ByteCounter:
    """UTF-8 bytes of the text that consecutive chunks of one token stream decode to, summed without double
    counting a character split across chunks: a chunk whose decoding ends in U+FFFD (an incomplete UTF-8
    sequence of byte-level tokens) keeps its last tokens pending until the next chunk completes them.
    Special tokens (EOS) decode to nothing, so they count 0 bytes."""

    _MAX_PENDING = 8  # a UTF-8 character has at most 4 bytes, so at most 4 tokens end in an incomplete one

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []
        self.total = 0

    def _bytes(self, ids: list[int]) -> tuple[int, bool]:
        text = self.tokenizer.decode(ids)
        return len(text.encode("utf-8")), text.endswith("\ufffd")

    def add(self, ids: list[int]) -> None:
        self.pending.extend(ids)
        for cut in range(len(self.pending), max(len(self.pending) - self._MAX_PENDING, 0), -1):
            size, incomplete = self._bytes(self.pending[:cut])
            if not incomplete:
                self.total += size
                self.pending = self.pending[cut:]
                return
        if len(self.pending) > 4 * self._MAX_PENDING:  # a real U+FFFD in the text: stop waiting for completion
            self.finish()

    def finish(self) -> int:
        if self.pending:
            self.total += self._bytes(self.pending)[0]
            self.pending = []
        return self.total


@torch.inference_mode()
def evaluate(model: nn.Module, tokens: Sequence[int] | np.ndarray | TokenStream, seq_len: int, batch_size: int,
             max_batches: int | None = None, tokenizer: Tokenizer | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Next-token loss of ``model`` over non-overlapping windows of ``tokens``.

    model: eval mode, ``forward(input_ids [B, T] int64) -> logits [B, T, V]``. tokens: a 1-D stream of ids
    (numpy array, TokenStream or list). Windows of seq_len + 1 tokens start at multiples of seq_len and are
    batched in order, batch_size per batch, at most max_batches batches (None: every whole window); each
    window scores its last seq_len tokens given the ones before, within the window.

    Returns ``loss`` (mean cross-entropy, nats/token, accumulated in float64), ``perplexity`` (exp(loss)),
    ``tokens`` (target tokens scored), ``windows`` (windows evaluated), ``windows_total`` (whole windows in
    ``tokens``), and with a tokenizer ``bytes`` (UTF-8 bytes of the text
    the target tokens decode to; special tokens count 0) and ``bits_per_byte`` = loss · tokens / (ln 2 · bytes);
    without one both are None.
    """
    if seq_len < 1 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"need seq_len >= 1, batch_size >= 1 and max_batches >= 1 or None; got seq_len={seq_len}, "
                         f"batch_size={batch_size}, max_batches={max_batches}")
    total = max(len(tokens) - 1, 0) // seq_len
    if total == 0:
        raise ValueError(f"{len(tokens)} tokens hold no window of seq_len={seq_len} + 1 tokens: use a shorter "
                         "--seq-len or more text")
    n_windows = total if max_batches is None else min(total, max_batches * batch_size)
    device = next(model.parameters()).device
    counter = _ByteCounter(tokenizer) if tokenizer is not None else None
    loss_sum, count = 0.0, 0
    batches = _batches(tokens, seq_len, batch_size, n_windows)
    for x, y in tqdm(batches, total=math.ceil(n_windows / batch_size), desc="evaluating", unit="batch",
                     disable=None if progress else True):  # None: only on a terminal
        out = model(x.to(device))
        logits = out[0] if isinstance(out, tuple) else out
        # float32 softmax as in training; the running sum in float64 so long evaluations do not drift.
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        loss_sum += float(losses.double().sum())
        count += y.numel()
        if counter is not None:
            counter.add(y.flatten().tolist())  # consecutive windows' targets are contiguous in the stream
    loss = loss_sum / count
    n_bytes = counter.finish() if counter is not None else None
    bits_per_byte = loss_sum / (math.log(2) * n_bytes) if n_bytes else None
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": n_windows,
            "windows_total": total, "bytes": n_bytes, "bits_per_byte": bits_per_byte}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Loss, perplexity and bits per byte of a bitlaw checkpoint or export.")
    parser.add_argument("source", help="a training checkpoint (*.ckpt), a run directory (its last checkpoint), a "
                                       "native export or a Hugging Face export")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--text", help="a UTF-8 text file to evaluate on (tokenized with the model's tokenizer)")
    where.add_argument("--data-dir", help="a prepared data set folder (meta.json); its validation split is used. "
                                          "Default: the data set recorded in the run's run.json")
    parser.add_argument("--windows", choices=WINDOWS, default="all",
                        help="all: every whole window (default); training: the windows training validated on (the "
                             "first val_batches batches of global_batch windows of seq_len, from run.json), so the "
                             "loss equals run.json's val_loss")
    parser.add_argument("--tokenizer", help="tokenizer.json for --text and bytes, instead of the model's one")
    parser.add_argument("--seq-len", type=int, help="window length (default: the run's seq_len, else max_seq_len)")
    parser.add_argument("--batch-size", type=int, help="windows per batch (default: the run's global_batch, else 8)")
    parser.add_argument("--max-batches", type=int, help="evaluate at most this many batches (default: all windows)")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on: cpu, cuda, cuda:N, mps "
                                                        "(cpu)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout (summary to stderr)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name}={value} must be >= 1")


def _load_tokenizer(path: Path | None, what: str) -> Tokenizer:
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no tokenizer for {what} (looked for {path}); pass --tokenizer PATH/tokenizer.json")
    return Tokenizer.from_file(str(path))


def _training_windows(args: argparse.Namespace, source: Path) -> RunSummary:
    """The training run whose validation ``--windows training`` reproduces (a checkpoint's run.json, or the run
    summary an export carries); ValueError when an option would change those windows or the record is missing or
    lacks a field."""
    given = [f"--{name.replace('_', '-')}" for name in ("text", "data_dir", "seq_len", "batch_size", "max_batches")
             if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--windows training takes the data set, seq_len, global_batch and val_batches from the "
                         f"run's {RUN_RECORD}: drop {', '.join(given)}")
    run = training_run(source)
    if run is None:
        raise ValueError(f"--windows training needs the record of the training run: {_no_data_reason(source)}")
    missing = [key for key in ("seq_len", "global_batch", "val_batches") if getattr(run, key) is None]
    if missing or run.data is None:
        raise ValueError(f"the run record of {source} lacks {missing or ['data.directory']}: --windows training "
                         "cannot know the windows training validated on")
    return run


def _no_data_reason(source: Path) -> str:
    if source.is_dir():
        return f"the export {source} records no training run (exported from a checkpoint outside a run directory)"
    path = run_record_path(source)
    if path is None:
        return f"{source} is not a checkpoint in a run directory, so no {RUN_RECORD} names its data set"
    if not path.is_file():
        return f"{path} does not exist (the run has not finished, or the checkpoint was moved out of its run)"
    return f"{path} names no data set"


def describe_windows(results: dict[str, Any], seq_len: int, batch_size: int, where: str,
                     run: RunSummary | None) -> tuple[str, str]:
    """``(selection, description)`` of the windows ``results`` (from :func:`evaluate`) covered: selection is
    "training" (``run`` given: the run's validation windows), "all" or "first" (the first of them only)."""
    n, total = results["windows"], results["windows_total"]
    if run is not None:
        val_loss = f", run.json val_loss {run.val_loss:.4f}" if isinstance(run.val_loss, float) else ""
        return "training", (f"the first {n} windows ({run.val_batches} batches of {run.global_batch}, "
                            f"seq_len {seq_len}) of {where}, as training's validation{val_loss}")
    if n == total:
        return "all", f"all {n} windows (seq_len {seq_len}) of {where}"
    return "first", (f"the first {n} of {total} windows ({math.ceil(n / batch_size)} batches of {batch_size}, seq_len "
                     f"{seq_len}) of {where}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the model and the evaluation tokens, print the results; 0 on success, 2 on bad
    input (with a one-line message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        for name in ("seq_len", "batch_size", "max_batches"):
            _check_positive(name.replace("_", "-"), getattr(args, name))
        source = check_source(args.source, args.tokenizer)
        check_device(args.device)
        if args.text is not None and not Path(args.text).is_file():
            raise FileNotFoundError(f"--text {args.text!r}: no such file")
        training = _training_windows(args, source) if args.windows == "training" else None
        run = training or training_run(source)
        data_dir = None
        if args.text is None:
            if args.data_dir is not None:
                data_dir = Path(args.data_dir)
            elif run is not None and run.data is not None:
                data_dir = Path(run.data.directory)
            else:
                raise ValueError(f"no validation data known for {source}: {_no_data_reason(source)}; pass "
                                 "--data-dir DIR or --text FILE")
            if args.data_dir is None and not (data_dir / "meta.json").is_file():
                raise FileNotFoundError(f"{source} was trained on the data set prepared at {str(data_dir)!r} "
                                        f"(config hash {(run.data.config_hash or 'unknown')[:12]}), which "
                                        "is not on this machine: prepare it again with the run's data settings "
                                        "(bitlaw-prepare data=...), or pass --data-dir DIR or --text FILE")
            if not (data_dir / "meta.json").is_file():
                raise FileNotFoundError(f"data directory {str(data_dir)!r} is not a prepared data set (no "
                                        "meta.json): pass --data-dir with a folder written by bitlaw-prepare")
        loaded = load_model(source, args.device)
        for note in source_notes(args.source, loaded):
            print(note, file=sys.stderr)
        if data_dir is not None:
            data = load_prepared(data_dir)
            tokens: Sequence[int] | np.ndarray | TokenStream = data.val_tokens
            tokenizer = _load_tokenizer(Path(args.tokenizer) if args.tokenizer else data.tokenizer_path,
                                        f"data set {data_dir}")
            vocab_size, what = data.vocab_size, f"data set {data_dir}"
            where = f"the validation split of {data_dir}"
        else:
            tokenizer_path = tokenizer_file(loaded, args.tokenizer)
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            text = Path(args.text).read_text(encoding="utf-8")
            tokens = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
            vocab_size, what = tokenizer.get_vocab_size(with_added_tokens=True), f"tokenizer {tokenizer_path}"
            where = str(args.text)
        if vocab_size > loaded.config.vocab_size:
            raise ValueError(f"{what} has {vocab_size} token ids, more than the model's vocab_size="
                             f"{loaded.config.vocab_size}: it was not trained with this tokenizer")
        if training is not None:
            seq_len, batch_size, max_batches = training.seq_len, training.global_batch, training.val_batches
        else:
            seq_len = args.seq_len or (run.seq_len if run else None) or loaded.config.max_seq_len
            batch_size = args.batch_size or (run.global_batch if run else None) or 8
            max_batches = args.max_batches
        if seq_len > loaded.config.max_seq_len:
            raise ValueError(f"--seq-len={seq_len} exceeds the model's max_seq_len={loaded.config.max_seq_len}")
        results = evaluate(loaded.model, tokens, seq_len, batch_size, max_batches, tokenizer,
                           progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    selection, evaluated = describe_windows(results, seq_len, batch_size, where, training)
    results.update(source=str(source), kind=loaded.kind, recipe=loaded.recipe.name,
                   data=str(data_dir) if data_dir is not None else None, text=args.text, seq_len=seq_len,
                   batch_size=batch_size, max_batches=max_batches, selection=selection, evaluated=evaluated)
    bpb = f"{results['bits_per_byte']:.4f}" if results["bits_per_byte"] is not None else "n/a"
    summary = (f"loss {results['loss']:.4f} nats/token | perplexity {results['perplexity']:.3f} | bits/byte {bpb} | "
               f"{results['tokens']:,} tokens, {results['bytes'] or 0:,} bytes | {evaluated} | {loaded.kind} {source}")
    if args.json:
        print(summary, file=sys.stderr)
        print(json.dumps(results, indent=2))
    else:
        print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
