"""What defines a run: the settings a resumed or skipped run must share with the checkpoint or record it continues.

Recorded in every checkpoint (``checkpoint["bitlaw"]["settings"]``) and run record (``run.json`` → ``settings``);
``bitlaw-train`` compares them before resuming or skipping and refuses a mismatch, naming each differing setting
with both values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..kernels.recipe import TensorSpec

# What defines a run's result (docs/training.md §4). Everything else may change between attempts of one run:
# logging, progress, paths, checkpoint and validation cadence, device count and gradient accumulation (the same
# global batch split differently gives the same math up to float summation order), the kernel backend (the same
# math), compile, resume.
SETTINGS_DOC = ("model (every field, with the tokenizer's vocabulary), quant (the recipe), data (the hash of the "
                "prepared data set: corpus, tokenizer, split), optim.*, seed, seq_len, global_batch, steps, "
                "val_batches, trainer.precision")
WAYS_OUT = ("run with the original settings, pick another run directory (hydra.run.dir=...), or resume=never to "
            "train this directory again from scratch")


def run_settings(model: dict[str, Any], recipe: dict[str, Any], data_hash: str, optim: dict[str, Any], seed: int,
                 seq_len: int, global_batch: int, steps: int, val_batches: int, precision: str) -> dict[str, Any]:
    """The settings that define a run's result (see :data:`SETTINGS_DOC`), as a flat dict of dotted keys."""
    nested = {"model": model, "quant": recipe, "data": {"config_hash": data_hash}, "optim": optim, "seed": seed,
              "seq_len": seq_len, "global_batch": global_batch, "steps": steps, "val_batches": val_batches,
              "trainer": {"precision": precision}}
    return flatten(nested)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists and tuples become lists (as JSON would store them)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def with_spec_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every tensor-spec field a role (``quant.weight``, ``quant.input``) does not record set to
    its default: a run recorded before a field existed (e.g. ``sparsity``) ran with what the default means."""
    filled = dict(settings)
    for role in ("weight", "input"):
        prefix = f"quant.{role}."
        if any(key.startswith(prefix) for key in settings):
            for spec_field in dataclasses.fields(TensorSpec):
                filled.setdefault(prefix + spec_field.name, spec_field.default)
    return filled


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: recorded → current`` for every setting whose values differ (a key missing on one side included;
    tensor-spec fields missing from a recipe count as their defaults, :func:`with_spec_defaults`)."""
    recorded, current = with_spec_defaults(recorded), with_spec_defaults(current)
    missing = object()
    return [f"{key}: {recorded.get(key, missing)!r} → {current.get(key, missing)!r}".replace(repr(missing), "unset")
            for key in sorted(set(recorded) | set(current)) if recorded.get(key, missing) != current.get(key, missing)]


def refuse_changed(what: str, recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise ValueError naming each setting in which ``what`` (a run record or checkpoint) differs from this run."""
    if recorded is None:
        raise ValueError(f"{what} records no run settings (written by an older bitlaw); {WAYS_OUT}")
    changed = differences(recorded, current)
    if changed:
        raise ValueError(f"{what} was written with other settings than this run ({'; '.join(changed)}); "
                         f"{WAYS_OUT}")


