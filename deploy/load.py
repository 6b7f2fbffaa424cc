"""One loader for everything bitlaw can serve: training checkpoints, run directories, native exports and Hugging Face
exports.

:func:`load_model` looks at what it is given and returns a :class:`LoadedModel` whose ``model`` has the
:class:`~bitlaw.models.llama.LlamaModel` call contract, whatever it was loaded from. bitlaw's own exports are
checked against the sha256 sums of their manifest before any tensor is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.records import RUN_RECORD_FILE, DataSource, RunRecord, RunSummary
from ..kernels.recipe import Recipe
from ..models.convert import convert
from ..models.llama import LlamaConfig, LlamaModel

RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"
RUN_RECORD = RUN_RECORD_FILE
_RUN_FILES = (RUN_RECORD, "config.yaml")
SOURCES = ("a *.ckpt file, a run directory (checkpoints/last.ckpt), or a native, Hugging Face or compressed-tensors "
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
    data: the prepared data set the model was trained on; None when unknown (a checkpoint from an older bitlaw outside
        its run directory, a directory bitlaw did not write).
    """

    model: nn.Module
    config: LlamaConfig
    recipe: Recipe
    tokenizer_path: Path | None
    kind: str  # "checkpoint" | "native" | "hf" | "compressed-tensors"
    source: Path
    verified: bool
    data: DataSource | None = None


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
    if recipe.compressed:
        convert(model, recipe)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    tokenizer = Path(info["tokenizer"]) if info.get("tokenizer") else None
    data = DataSource.from_dict(info.get("data"), f"{path}: the checkpoint's 'bitlaw' entry") or _run_data(path)
    return LoadedModel(model.to(device).eval(), config, recipe, tokenizer, "checkpoint", path, False, data)


def save_checkpoint(loaded: LoadedModel, path: str | Path) -> Path:
    """Write ``loaded`` (a LlamaModel of plain or ``QuantLinear`` layers) as the minimal bitlaw checkpoint that
    :func:`load_checkpoint` and ``bitlaw-train init_from`` read: ``{"bitlaw": {"model", "recipe", "tokenizer",
    "data"}, "state_dict": {"model.<name>": tensor}}`` (no optimizer state, no step). Returns ``path``."""
    path = Path(path)
    state = {f"model.{key}": value.detach().cpu() for key, value in loaded.model.state_dict().items()}
    info = {"model": loaded.config.to_dict(), "recipe": loaded.recipe.to_dict(),
            "tokenizer": str(loaded.tokenizer_path) if loaded.tokenizer_path else None,
            "data": dataclasses.asdict(loaded.data) if loaded.data else None}
    torch.save({"bitlaw": info, "state_dict": state}, path)
    return path


def _run_data(checkpoint: Path) -> DataSource | None:
    """The data set named by the run record beside ``checkpoint``, for checkpoints written before they recorded
    it themselves; None when there is none or it cannot be read."""
    try:
        summary = training_run(checkpoint)
    except ValueError:
        return None
    return summary.data if summary is not None else None


def run_record_path(source: Path) -> Path | None:
    """Where the run record (``run.json``) of a checkpoint's training run is: ``<run_dir>/run.json`` for a
    checkpoint at ``<run_dir>/checkpoints/<name>.ckpt``; None for anything else."""
    if not source.is_file() or source.parent.name != "checkpoints":
        return None
    return source.parent.parent / RUN_RECORD


def training_run(source: Path) -> RunSummary | None:
    """What evaluation needs to know of the training run ``source`` comes from: the summary of a checkpoint's
    ``run.json`` (:func:`run_record_path`), or the one a bitlaw export carries (only ``data`` for an export of a
    checkpoint outside a run directory); None when there is none (loose checkpoints, unfinished runs). ValueError
    naming the file when it is damaged."""
    from .manifest import MANIFEST_FILE, read_manifest

    if source.is_dir():
        if not (source / MANIFEST_FILE).is_file():
            return None
        manifest = read_manifest(source)
        return manifest.run or (RunSummary(data=manifest.data) if manifest.data else None)
    path = run_record_path(source)
    if path is None or not path.is_file():
        return None
    try:
        return RunSummary.of(RunRecord.read(path))
    except ValueError as err:
        raise ValueError(f"{err}: the run record is damaged; train the run again (resume=never) or pass the data "
                         "with --data-dir or --text") from None


def load_model(source: str | Path, device: str = "cpu") -> LoadedModel:
    """Load a training checkpoint (``*.ckpt``), a run directory's last checkpoint, or a native, Hugging Face or
    compressed-tensors export directory; bitlaw's exports are verified against their manifest first (ValueError naming a
    modified or truncated file). ``LoadedModel.source`` says what was loaded."""
    from . import compressed, hf, native  # here: each pulls in its own format's dependencies
    from .manifest import CT_FORMAT, HF_FORMAT, MANIFEST_FILE, export_format

    path = resolve_source(source)
    if path.is_file():
        return load_checkpoint(path, device)
    if (path / MANIFEST_FILE).is_file():
        fmt = export_format(path)
        if fmt == HF_FORMAT:
            return hf.load_hf(path, device)
        if fmt == CT_FORMAT:
            return compressed.load_compressed_tensors(path, device)
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
