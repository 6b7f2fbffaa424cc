"""The fields of ``bitlaw-compress``'s config groups and their checks, run before anything is loaded.

Every field of a selected group is checked here, and unknown fields are refused, so that a typo or a value out of
range ends the command with one line naming the field, what was given and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

STAGES = ("shortgpt", "prune", "gptq", "pv")
"""The config groups of the stages, in the order the selected ones run."""


def _number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> tuple[Callable, str]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return check, f"a number in {left}{low:g}, {high:g}{right}"


def _integer(low: int) -> tuple[Callable, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _choice(*values: str) -> tuple[Callable, str]:
    return (lambda v: v in values), f"one of {list(values)}"


def _optional(rule: tuple[Callable, str]) -> tuple[Callable, str]:
    return (lambda v: v is None or rule[0](v)), f"null or {rule[1]}"


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_NM = ((lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[1-9]\d*:[1-9]\d*", v) is not None
                                and int(v.split(":")[0]) < int(v.split(":")[1]))),
       'null or "N:M" with 1 <= N < M (e.g. "2:4")')
_FRACTION = _number(0, 1, high_open=True)
_POSITIVE = _number(0, math.inf, low_open=True, high_open=True)
_NONNEGATIVE = _number(0, math.inf, high_open=True)

FIELDS: dict[str, dict[str, tuple[Callable, str]]] = {
    "shortgpt": {"fraction": _number(0, 1, low_open=True, high_open=True), "blocks": _optional(_integer(1)),
                 "heal_tokens": _integer(0), "heal_lr": _POSITIVE},
    "prune": {"method": _choice("sparsegpt", "magnitude"),
              "sparsity": (_optional(_FRACTION)[0], f"{_FRACTION[1]} (null with nm)"), "nm": _NM,
              "allocation": _choice("uniform", "scheduled", "owl"), "clusters": _integer(1), "spread": _NONNEGATIVE,
              "max_sparsity": _number(0, 1, low_open=True, high_open=True), "owl_lambda": _NONNEGATIVE,
              "owl_threshold": _POSITIVE, "damp": _NONNEGATIVE, "block_size": _integer(1)},
    "gptq": {"format": ((lambda v: isinstance(v, str)), "a bitlaw format name"),
             "scale": _choice("gaussian_rms", "absmax"), "rotation": _choice("hadamard", "none"),
             "block": _integer(2), "damp": _NONNEGATIVE, "block_size": _integer(1), "act_order": _BOOL},
    "pv": {"steps": _integer(1), "mode": _choice("pv", "p", "v"), "tau": _number(0, 1), "lr_v": _POSITIVE,
           "ste": _BOOL, "lr_scale": _NONNEGATIVE, "lr_norm": _NONNEGATIVE, "lr_embed": _NONNEGATIVE,
           "batch_size": _integer(1), "selection_sequences": _integer(1), "select_every": _integer(1)},
}


def check_group(group: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` of the config group ``group`` when every field is known, present and allowed; ValueError naming
    the first that is not (``prune.sparsity=1.0 is not allowed; allowed: a number in [0, 1)``)."""
    fields = FIELDS[group]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"{group}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(set(fields) - set(settings))
    if missing:
        raise ValueError(f"{group}: missing field(s) {missing}")
    for name, (check, allowed) in fields.items():
        if not check(settings[name]):
            raise ValueError(f"{group}.{name}={settings[name]!r} is not allowed; allowed: {allowed}")
    if group == "prune":
        _check_prune(settings)
    return settings


def _check_prune(prune: dict[str, Any]) -> None:
    if prune["nm"] is not None:
        if prune["sparsity"] is not None or prune["allocation"] != "uniform":
            raise ValueError(f"prune.nm={prune['nm']!r} fixes the pattern: set prune.sparsity=null (given "
                             f"{prune['sparsity']!r}) and prune.allocation=uniform (given {prune['allocation']!r})")
    elif prune["sparsity"] is None:
        raise ValueError("prune.sparsity=None is not allowed without prune.nm; allowed: a number in [0, 1)")
    elif prune["allocation"] == "scheduled" and prune["sparsity"] > prune["max_sparsity"]:
        raise ValueError(f"prune.sparsity={prune['sparsity']} is above prune.max_sparsity={prune['max_sparsity']}: "
                         "no scheduled allocation reaches it; allowed: sparsity <= max_sparsity")


def check_stages(selected: dict[str, dict[str, Any] | None]) -> None:
    """Refuse combinations of stages that cannot run together; ``selected`` maps each group to its settings (None:
    not selected)."""
    if not any(selected.values()):
        raise ValueError(f"no stage selected; select at least one of {list(STAGES)} (e.g. prune=sparsegpt, gptq=w4)")
    prune, gptq = selected.get("prune"), selected.get("gptq")
    if prune and gptq and prune["method"] == "magnitude":
        raise ValueError("prune=magnitude cannot be followed by gptq (its grid has no 0 on QuEST's centred grids and "
                         "GPTQ would refill the pruned entries); use prune=sparsegpt, which prunes and quantizes in "
                         "one sweep")
