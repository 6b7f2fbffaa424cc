"""``init_from``: a run that starts from a bitlaw checkpoint's weights instead of a random initialization.

The checkpoint's model and recipe replace the ``model`` and ``quant`` groups; the optimizer, the schedule and the
step count start fresh. :func:`read_init_checkpoint` checks what ``init_from`` names before anything is read in full
or written; :func:`init_weights` reads the weights once the run is planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path

from ..kernels.recipe import Recipe
from ..models.llama import LlamaConfig

INIT_FROM_ALLOWED = ("allowed: a bitlaw checkpoint file (a torch-saved dict with 'bitlaw' {'model', 'recipe', ...} "
                     "and 'state_dict' {'model.<parameter>': tensor}: a bitlaw-train *.ckpt or the checkpoint "
                     "bitlaw-compress writes to heal), a run directory holding checkpoints/last.ckpt, or null "
                     "(random init)")


@dataclass
class InitCheckpoint:
    """What ``init_from`` names, checked: the checkpoint file and its architecture, without its tensors' data."""

    path: Path  # absolute: the file itself, or a run directory's checkpoints/last.ckpt
    model: dict[str, Any]  # LlamaConfig fields, vocab_size included
    recipe: Recipe
    shapes: dict[str, torch.Size]  # state_dict key ("model.<parameter>") → shape


def resolve_init_from(source: str) -> Path:
    """``init_from`` as an absolute checkpoint file: a run directory means its ``checkpoints/last.ckpt`` (as
    ``bitlaw.deploy.load.resolve_source`` maps it; train does not import deploy). FileNotFoundError naming the
    path and what is allowed when there is none."""
    path = Path(to_absolute_path(str(source)))
    if not path.exists():
        raise FileNotFoundError(f"init_from={source!r}: {path} does not exist; {INIT_FROM_ALLOWED}")
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"init_from={source!r}: the directory {path} has no checkpoints/last.ckpt; "
                                    f"{INIT_FROM_ALLOWED}")
        return last
    return path


def load_init_checkpoint(path: Path, source: str) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (tensors memory-mapped when the file allows it, so reading the header
    costs no copy of the weights); ValueError naming ``source`` and what is allowed when it is not a bitlaw
    checkpoint."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # anything torch cannot read is not a checkpoint, whatever the reason
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"init_from={source!r}: {path} is not a bitlaw checkpoint (torch cannot read it: "
                         f"{reason}); {INIT_FROM_ALLOWED}") from None
    info = ckpt.get("bitlaw") if isinstance(ckpt, dict) else None
    if not (isinstance(info, dict) and {"model", "recipe"} <= set(info) and isinstance(ckpt.get("state_dict"), dict)):
        raise ValueError(f"init_from={source!r}: {path} is not a bitlaw checkpoint (no 'bitlaw' entry with 'model' "
                         f"and 'recipe', or no 'state_dict'); {INIT_FROM_ALLOWED}")
    return ckpt


def read_init_checkpoint(source: str) -> InitCheckpoint:
    """Check what ``init_from`` names (:func:`resolve_init_from`, :func:`load_init_checkpoint`) and return its
    architecture and recipe; FileNotFoundError or ValueError naming the path and what is allowed."""
    path = resolve_init_from(source)
    ckpt = load_init_checkpoint(path, source)
    try:
        model = LlamaConfig.from_dict(dict(ckpt["bitlaw"]["model"])).to_dict()
        recipe = Recipe.from_dict(dict(ckpt["bitlaw"]["recipe"]))
    except (ValueError, TypeError) as err:
        raise ValueError(f"init_from={source!r}: {path} records a model or recipe bitlaw cannot build "
                         f"({err})") from None
    shapes = {key: value.shape for key, value in ckpt["state_dict"].items() if isinstance(value, torch.Tensor)}
    return InitCheckpoint(path, model, recipe, shapes)


def init_weights(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the (already checked) checkpoint at ``path``, memory-mapped where possible."""
    return load_init_checkpoint(path, str(path))["state_dict"]
