"""``bitlaw-export``: write a trained checkpoint as a native packed export or a Hugging Face directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitlaw.deploy.hf import export_hf
from bitlaw.deploy.load import load_checkpoint
from bitlaw.deploy.native import export_native


def main(argv: list[str] | None = None) -> int:
    """``bitlaw-export CKPT --format native|hf --out DIR [--force]``."""
    parser = argparse.ArgumentParser(prog="bitlaw-export", description="Export a bitlaw-train checkpoint.")
    parser.add_argument("checkpoint", help="a bitlaw-train checkpoint, e.g. runs/<run>/checkpoints/last.ckpt")
    parser.add_argument("--format", choices=["native", "hf"], required=True,
                        help="native: packed quantized safetensors; hf: a transformers LlamaForCausalLM directory")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} already exists; pass --force to replace it (nothing was written)")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
        loaded = load_checkpoint(args.checkpoint)
        if args.format == "native":
            sizes = export_native(loaded, out, args.force)
            ratio = sizes["block_weight_bytes"] / sizes["block_weight_bytes_bf16"]
            print(f"wrote {out} ({sizes['file_bytes']:,} bytes); block weights {sizes['block_weight_bytes']:,} bytes = "
                  f"{ratio:.3f}x of bf16 ({sizes['block_weight_bytes_bf16']:,} bytes)")
        else:
            for note in export_hf(loaded, out, args.force):
                print(f"note: {note}")
            print(f"wrote {out}: load it with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"bitlaw-export: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
