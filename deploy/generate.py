"""``bitlaw-generate``: sample text from a checkpoint or an export, with a KV cache, streamed to the terminal.

    bitlaw-generate runs/tiny-bf16-seed0/checkpoints/last.ckpt --prompt "The list" --max-new-tokens 50
    bitlaw-generate exports/tiny-w4a4 --prompt "def " --greedy
    bitlaw-generate runs/tiny-bf16-seed0 --prompt "The" --device cuda      # a run directory: its last checkpoint

The library function :func:`generate` does the decoding; :class:`TextStream` turns the growing list of token ids
into printable text increments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from ..models.llama import LlamaModel
from .load import check_device, load_model, resolve_source, source_notes, tokenizer_file

EOS_TOKEN = "<|endoftext|>"
PROG = "bitlaw-generate"


def check_source(source: str, tokenizer: str | None) -> Path:
    """The path to load for ``source`` (:func:`bitlaw.deploy.load.resolve_source`: a run directory means its last
    checkpoint); FileNotFoundError naming what is missing when it or the ``tokenizer`` file is absent."""
    path = resolve_source(source)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer!r}: no such file")
    return path


def check_sampling(temperature: float, top_k: int | None, top_p: float, greedy: bool) -> None:
    """Raise ValueError naming the argument when a sampling setting is outside what is allowed."""
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling (use greedy decoding for the "
                         "arg-max token)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 or None: no top-k filter)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no top-p filter)")


def filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """logits [..., V] with every entry outside the k largest of its row set to -inf (k = 0 / None / >= V: all
    kept). Exactly k entries survive even when values tie at the k-th place."""
    if not k or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: logits [..., V] keeping, per row, the smallest set of most probable tokens whose
    probability mass is >= p (the others set to -inf). p = 1 keeps everything; the top token always survives."""
    if p >= 1:
        return logits
    probs, order = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
    # A token is needed while the tokens before it hold less than p.
    keep_sorted = mass_before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float, greedy: bool,
               generator: torch.Generator | None) -> int:
    """Choose the next token from one row of logits [V]: arg-max when greedy, else a draw from
    softmax(logits / temperature) after the top-k and top-p filters, using ``generator`` (a CPU generator)."""
    if greedy:
        return int(torch.argmax(logits))
    filtered = filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)
    # Drawn on the CPU with a CPU generator, so a seed gives the same tokens whatever device ran the model.
    probs = torch.softmax(filtered, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _model_limit(model: nn.Module, max_seq_len: int | None) -> int:
    """The longest sequence to decode: max_seq_len if given (at most a LlamaModel's own), else the model's."""
    own = model.config.max_seq_len if isinstance(model, LlamaModel) else None
    if max_seq_len is None:
        if own is None:
            raise ValueError(f"generate: cannot read max_seq_len from a {type(model).__name__}; pass max_seq_len")
        return own
    if max_seq_len < 1 or (own is not None and max_seq_len > own):
        raise ValueError(f"max_seq_len={max_seq_len} must be in [1, the model's max_seq_len={own}]")
    return max_seq_len


@torch.inference_mode()
def generate(model: nn.Module, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, greedy: bool = False,
             generator: torch.Generator | None = None, eos_id: int | None = None, *, max_seq_len: int | None = None,
             use_cache: bool | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue one prompt; returns the new token ids (without the prompt, without a final EOS).

    model: ``forward(input_ids [1, T] int64) -> logits [1, T, V]`` in eval mode. input_ids: the prompt, a
    sequence of ints or an int tensor of shape [T] or [1, T], 1 <= T <= max_seq_len. Decoding stops after
    ``max_new_tokens`` tokens, when ``eos_id`` is produced, or when the sequence reaches ``max_seq_len``
    (default: ``model.config.max_seq_len``). Sampling (greedy=False) draws from softmax(logits / temperature)
    restricted by top-k (0 / None: off) and top-p (1: off) with ``generator`` (a CPU ``torch.Generator``;
    None: the global RNG). use_cache: feed one token per step through a KV cache (default: when the model is a
    :class:`LlamaModel`), else recompute the whole sequence each step. ``on_token(id)`` is called for each new
    token as it is chosen (for streaming), EOS excluded.
    """
    check_sampling(temperature, top_k, top_p, greedy)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    prompt = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).tolist()
    limit = _model_limit(model, max_seq_len)
    if not 1 <= len(prompt) <= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; allowed: 1 to max_seq_len={limit}")
    use_cache = isinstance(model, LlamaModel) if use_cache is None else use_cache
    if use_cache and not isinstance(model, LlamaModel):
        raise ValueError(f"use_cache=True needs a LlamaModel, got a {type(model).__name__}")
    device = next(model.parameters()).device
    tokens = list(prompt)
    new: list[int] = []
    cache = model.make_cache(limit) if use_cache else None
    feed = prompt  # with a cache: the tokens the model has not seen yet; without: the whole sequence
    while len(new) < max_new_tokens and len(tokens) < limit:
        ids = torch.tensor([feed if use_cache else tokens], dtype=torch.long, device=device)
        logits = model(ids, cache=cache) if use_cache else model(ids)
        token = next_token(logits[0, -1], temperature, top_k, top_p, greedy, generator)
        if token == eos_id:
            break
        tokens.append(token)
        new.append(token)
        feed = [token]
        if on_token is not None:
            on_token(token)
    return new


class TextStream:
    """Decodes a growing list of token ids and hands out only the text not handed out before.

    Byte-level tokens can end in the middle of a UTF-8 character, which decodes to U+FFFD until the next token
    completes it; such a tail is held back until it resolves (or until ``finish``).
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prefix_ids)
        self.printed = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, token: int) -> str:
        """Add one token; returns the newly printable text (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def finish(self) -> str:
        """Whatever is still held back (an unresolved partial character prints as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        if not text.startswith(self.printed):
            return ""  # the decoder rewrote printed text (e.g. cleanup of spaces); what is printed stays
        new, self.printed = text[len(self.printed):], text
        return new


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Generate text from a bitlaw checkpoint or export.")
    parser.add_argument("source", help="a training checkpoint (*.ckpt), a run directory (its last checkpoint), a "
                                       "native export or a Hugging Face export")
    parser.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="at most this many new tokens (100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0 (0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most probable tokens; 0: off (50)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]; 1: off (0.95)")
    parser.add_argument("--greedy", action="store_true", help="always take the most probable token")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (0)")
    parser.add_argument("--tokenizer", help="tokenizer.json to use instead of the one recorded with the model")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the model, stream the continuation of the prompt to stdout; 0 on success, 2 on bad
    input (with a one-line message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.greedy)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
        source = check_source(args.source, args.tokenizer)
        check_device(args.device)
        loaded = load_model(source, args.device)
        for note in source_notes(args.source, loaded):
            print(note, file=sys.stderr)
        tokenizer_path = tokenizer_file(loaded, args.tokenizer)
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if tokenizer.get_vocab_size(with_added_tokens=True) > loaded.config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size(with_added_tokens=True)} "
                             f"ids, more than the model's vocab_size={loaded.config.vocab_size}")
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not prompt_ids:
            if eos_id is None:
                raise ValueError(f"the prompt {args.prompt!r} encodes to no token and the tokenizer has no "
                                 f"{EOS_TOKEN} to start from: give a non-empty prompt")
            prompt_ids = [eos_id]  # documents follow an EOS in training, so EOS is the start-of-document context
        if len(prompt_ids) > loaded.config.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than the model's max_seq_len="
                             f"{loaded.config.max_seq_len}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2

    stream = TextStream(tokenizer, prompt_ids)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def emit(token: int) -> None:
        text = stream.push(token)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    generator = torch.Generator().manual_seed(args.seed)
    generate(loaded.model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.greedy,
             generator, eos_id, max_seq_len=loaded.config.max_seq_len, on_token=emit)
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
