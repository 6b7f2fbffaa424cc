"""One loader for everything bitlaw can serve: training checkpoints, run directories, native exports and Hugging Face
exports.

:func:`load_model` looks at what it is given and returns a :class:`LoadedModel` whose ``model`` has the
:class:`~bitlaw.models.llama.LlamaModel` call contract, whatever it was loaded from. bitlaw's own exports are
checked against the sha256 sums of their manifest before any tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitlaw.kernels.recipe import Recipe
from bitlaw.models.convert import convert
from bitlaw.models.llama import LlamaConfig, LlamaModel

RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"
_RUN_FILES = ("run.json", "config.yaml")
SOURCES = ("a *.ckpt file, a run directory (checkpoints/last.ckpt), a native export directory or a Hugging Face "
           "export directory")


@dataclass
class LoadedModel:
    """A model ready for inference, whatever it was loaded from.

    model: eval mode; ``forward(input_ids [B, T] int64, targets=None)`` → logits ``[B, T, V]`` or
        ``(logits, loss)``; a :class:`LlamaModel` for ``checkpoint`` and ``native``.
    tokenizer_path: the tokenizer file recorded with the model (None: none recorded); it may not exist.
    source: the file or directory actually loaded (a run directory's ``checkpoints/last.ckpt``).
    verified: every file was checked against the sha256 sums of a bitlaw export manifest; False for training
        checkpoints (they carry none) and for Hugging Face directories that bitlaw did not write.
    """

    model: nn.Module
    config: LlamaConfig
    recipe: Recipe
    tokenizer_path: Path | None
    kind: str  # "checkpoint" | "native" | "hf"
    source: Path
    verified: bool


def resolve_source(source: str | Path) -> Path:
    """``source`` as the path to load: a run directory (one holding ``checkpoints/last.ckpt`` and a ``run.json``
    or ``config.yaml``) means its last checkpoint; anything else is returned as it is. FileNotFoundError naming
    the path when it does not exist, or when a run directory has no last checkpoint."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source {str(path)!r} does not exist (allowed: {SOURCES})")
    if path.is_dir() and any((path / name).is_file() for name in _RUN_FILES):
        checkpoint = path / RUN_CHECKPOINT
        if not checkpoint.is_file():
            raise FileNotFoundError(f"run directory {str(path)!r} has no {RUN_CHECKPOINT} (the run saved no "
                                    "checkpoint yet?): pass a checkpoint file")
        return checkpoint
    return path


def describe_source(given: str | Path, resolved: Path) -> str | None:
    """The line a command prints when ``resolved`` is not what the user named (a run directory's checkpoint)."""
    if Path(given) == resolved:
        return None
    return f"using {resolved}, the last checkpoint of run directory {given}"


def check_device(device: str, what: str = "--device") -> torch.device:
    """``device`` as a torch.device that exists on this machine; ValueError naming it and what is allowed."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {device!r} is not a device name (allowed: cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{what} {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{what} {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{what} {device!r}: device type {parsed.type!r} is not supported (allowed: cpu, cuda, "
                         "cuda:N, mps)")
    return parsed


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedModel:
    """A training checkpoint (``*.ckpt`` written by ``bitlaw-train``) as a quantized :class:`LlamaModel`."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "bitlaw" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a bitlaw-train checkpoint (no 'bitlaw' and 'state_dict' entries)")
    info = ckpt["bitlaw"]
    config, recipe = LlamaConfig.from_dict(info["model"]), Recipe.from_dict(info["recipe"])
    model = LlamaModel(config)
    if recipe.quantized:
        convert(model, recipe)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    tokenizer = Path(info["tokenizer"]) if info.get("tokenizer") else None
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "checkpoint", path, False)


def load_model(source: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a training checkpoint (``*.ckpt``), a run directory's last checkpoint, a native export or a Hugging
    Face export directory; bitlaw's exports are verified against their manifest first (ValueError naming a
    modified or truncated file). ``LoadedModel.source`` says what was loaded."""
    from bitlaw.deploy import hf, native  # here: each pulls in its own format's dependencies
    from bitlaw.deploy.manifest import HF_FORMAT, MANIFEST_FILE, read_manifest

    path = resolve_source(source)
    if path.is_file():
        return load_checkpoint(path, device)
    if (path / MANIFEST_FILE).is_file():
        if read_manifest(path).get("format") == HF_FORMAT:
            return hf.load_hf(path, device)
        return native.load_native(path, device)
    if (path / "config.json").is_file():
        return hf.load_hf(path, device)
    raise FileNotFoundError(f"{path}: not a checkpoint file, a run directory ({RUN_CHECKPOINT}), a bitlaw export "
                            f"({MANIFEST_FILE}) or a Hugging Face export (config.json)")


def source_notes(given: str | Path, loaded: LoadedModel) -> list[str]:
    """What a command tells the user about what it loaded: the checkpoint a run directory stands for, and that a
    Hugging Face directory bitlaw did not write was loaded without verification."""
    notes = [describe_source(given, loaded.source)]
    if loaded.kind == "hf" and not loaded.verified:
        notes.append(f"{loaded.source} has no bitlaw.json (not written by bitlaw-export): its files were not verified")
    return [note for note in notes if note]


def tokenizer_file(loaded: LoadedModel, override: str | Path | None = None) -> Path:
    """The tokenizer file to use with ``loaded``: ``override`` if given, else the one recorded with the model;
    FileNotFoundError saying which is missing and how to give one."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {str(path)!r}: no such file")
        return path
    if loaded.tokenizer_path is None:
        why = "the checkpoint records none" if loaded.kind == "checkpoint" else "the export has none"
        raise FileNotFoundError(f"{loaded.source} has no tokenizer ({why}): pass --tokenizer PATH/tokenizer.json")
    if not loaded.tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer {str(loaded.tokenizer_path)!r} recorded for {loaded.source} does not exist "
                                "(moved or deleted data set?): pass --tokenizer PATH/tokenizer.json")
    return loaded.tokenizer_path
