"""The records bitlaw's packages exchange as files: the run record (``run.json``) and the export manifest
(``bitlaw.json``), as typed dataclasses with a schema version.

``bitlaw-train`` writes a :class:`RunRecord` when a run finishes; ``bitlaw-fit``, ``bitlaw-eval``, ``bitlaw-export``
and the benchmarks read it. Every export directory carries an :class:`ExportManifest`; the loaders verify the export
against it before reading a tensor, and ``--force`` replaces exactly the files it lists. Both are read and written
only through these classes, so a field has one name and one type everywhere.

Both read what earlier versions wrote: a ``run.json`` without ``schema_version`` (version 1: the same fields, written
before the record had a version) reads as version 1; unknown fields are kept in ``extra`` and written back as they
were. This module imports nothing of bitlaw: recipes and model configurations are kept as the plain dicts of
``Recipe.to_dict()`` and ``LlamaConfig.to_dict()``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

RUN_RECORD_FILE = "run.json"
MANIFEST_FILE = "bitlaw.json"


def _check_type(where: str, name: str, value: Any, kinds: tuple[type, ...]) -> None:
    """ValueError naming ``where``, the field, its value and the types allowed, unless ``value`` is None or one of
    ``kinds`` (a bool is never taken for a number)."""
    if value is None:
        return
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        allowed = " or ".join(kind.__name__ for kind in kinds)
        raise ValueError(f"{where}: {name}={value!r} is a {type(value).__name__}; allowed: {allowed} (or null)")


_NUMBER = (int, float)


def read_json_object(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file, what is wrong and ``remedy`` when it is not valid
    JSON (truncated, edited) or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): {remedy}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object: {remedy}")
    return value


@dataclass(frozen=True)
class DataSource:
    """The prepared data set a model was trained on: its folder and the hash of the config that prepared it."""

    directory: str
    config_hash: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DataSource | None:
        """None for a missing entry (null, or without ``directory``); ValueError naming ``where`` for a wrong type."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: data={data!r} is not an object with 'directory' and 'config_hash'")
        if not data.get("directory"):
            return None
        _check_type(where, "data.directory", data["directory"], (str,))
        _check_type(where, "data.config_hash", data.get("config_hash"), (str,))
        return cls(data["directory"], data.get("config_hash"))


@dataclass(frozen=True)
class Throughput:
    """Training speed of the attempt that finished a run: tokens/s over all devices, model-FLOPs utilisation (None
    without a known peak), the dense bf16 peak it was measured against (FLOP/s), and where the figures come from."""

    source: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_flops: float | None = None


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """``<run_dir>/run.json``: what a finished training run was and what it measured.

    Required (every reader needs them): ``params_non_embedding`` (N), ``tokens`` (D, training tokens; both ints
    as bitlaw-train writes them, any number in a record written by hand), ``val_loss`` (nats/token on training's
    validation windows, :attr:`val_windows`) and ``recipe`` (a ``Recipe.to_dict()``, or a preset name in records
    written by hand). Everything else is None when unknown. ``backends``: per quantized layer kind (empty for a
    model without quantized layers),
    ``{"backend": "triton" | "reference" | "mixed", "reason": why not Triton or None}``. ``settings``: the run's
    defining settings (flat dotted keys) a resumed or skipped run is compared with. ``init_from``: the checkpoint the
    weights started from. Fields are keyword-only and in the order ``run.json`` lists them.
    """

    VERSION: ClassVar[int] = 2

    schema_version: int = VERSION
    params_non_embedding: int
    params_total: int | None = None
    tokens: int
    steps: int | None = None
    val_loss: float
    val_windows: str | None = None
    recipe: dict[str, Any] | str
    model: dict[str, Any] | None = None
    model_preset: str | None = None
    seq_len: int | None = None
    global_batch: int | None = None
    val_batches: int | None = None
    lr: float | None = None
    seed: int | None = None
    tokens_per_s: float | None = None
    throughput: Throughput | None = None
    backends: dict[str, dict[str, str | None]] | None = None
    unigram_entropy_nats: float | None = None
    data: DataSource | None = None
    device: str | None = None
    world_size: int | None = None
    code_version: str | None = None
    settings: dict[str, Any] | None = None
    init_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know, kept as they were

    REQUIRED: ClassVar[tuple[str, ...]] = ("params_non_embedding", "tokens", "val_loss", "recipe")
    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "params_non_embedding": _NUMBER, "tokens": _NUMBER, "val_loss": _NUMBER, "recipe": (dict, str),
        "params_total": (int,), "steps": (int,), "val_windows": (str,), "model": (dict,), "model_preset": (str,),
        "seq_len": (int,), "global_batch": (int,), "val_batches": (int,), "lr": _NUMBER, "seed": (int,),
        "tokens_per_s": _NUMBER, "backends": (dict,), "unigram_entropy_nats": _NUMBER, "device": (str,),
        "world_size": (int,), "code_version": (str,), "settings": (dict,), "init_from": (str,),
        "schema_version": (int,)}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> RunRecord:
        """The record in the parsed ``run.json`` ``data``; ValueError naming ``source`` and the field when a required
        field is missing, a field has the wrong type, or the record is of a newer schema than this code reads.
        Version 1 (no ``schema_version``) reads as it is: it has the same fields."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a run record is a JSON object with the keys {', '.join(cls.REQUIRED)}")
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise ValueError(f"{source}: run record lacks {', '.join(missing)}; required: {', '.join(cls.REQUIRED)}")
        version = data.get("schema_version", 1)
        _check_type(source, "schema_version", version, (int,))
        if version > cls.VERSION:
            raise ValueError(f"{source}: run record schema_version {version} is newer than this bitlaw reads "
                             f"({cls.VERSION}): upgrade bitlaw")
        for name, kinds in cls._TYPES.items():
            _check_type(source, name, data.get(name), kinds)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {name: data[name] for name in known if name in data}
        values["schema_version"] = version
        throughput = data.get("throughput")
        _check_type(source, "throughput", throughput, (dict,))
        if throughput is not None:
            values["throughput"] = Throughput(str(throughput.get("source", "unknown")), throughput.get("tokens_per_s"),
                                              throughput.get("mfu"), throughput.get("peak_flops"))
        values["data"] = DataSource.from_dict(data.get("data"), source)
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        """The record in ``path`` (a ``run.json`` file, or a run directory holding one). FileNotFoundError when there
        is none; ValueError naming the file and what is wrong when it is not valid JSON (``<file> is not a readable
        run record (…)``) or not a record this version reads (callers add what the user can do)."""
        path = Path(path)
        if path.is_dir():
            path = path / RUN_RECORD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no run record")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a readable run record (not valid JSON: {err})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``run.json`` (the schema version included; unknown fields read earlier kept)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["throughput"] = dataclasses.asdict(self.throughput) if self.throughput is not None else None
        out["data"] = dataclasses.asdict(self.data) if self.data is not None else None
        return {**self.extra, **out}

    def to_json(self) -> str:
        """The text of ``run.json``: indented JSON with a final newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def recipe_name(self) -> str:
        """The recipe's name (the preset name of a hand-written record)."""
        return self.recipe if isinstance(self.recipe, str) else str(self.recipe.get("name", "custom"))


@dataclass(frozen=True)
class FileEntry:
    """One file of an export: its size in bytes and its sha256 (hex)."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class RunSummary:
    """The part of a run record an export carries so it is evaluated like its checkpoint: training's validation
    windows (``seq_len``, ``global_batch``, ``val_batches``), their loss, and the data set. A compressed model
    records only the window length and the data set its report evaluated with."""

    seq_len: int | None = None
    global_batch: int | None = None
    val_batches: int | None = None
    val_loss: float | None = None
    data: DataSource | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RunSummary | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: run={data!r} is not an object")
        for name, kinds in (("seq_len", (int,)), ("global_batch", (int,)), ("val_batches", (int,)),
                            ("val_loss", _NUMBER)):
            _check_type(where, f"run.{name}", data.get(name), kinds)
        return cls(data.get("seq_len"), data.get("global_batch"), data.get("val_batches"), data.get("val_loss"),
                   DataSource.from_dict(data.get("data"), where))

    @classmethod
    def of(cls, record: RunRecord) -> RunSummary:
        """The summary of a run record."""
        return cls(record.seq_len, record.global_batch, record.val_batches, record.val_loss, record.data)

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "global_batch": self.global_batch, "val_batches": self.val_batches,
                "val_loss": self.val_loss, "data": dataclasses.asdict(self.data) if self.data else None}


NATIVE_FORMAT = "bitlaw-native"
HF_FORMAT = "bitlaw-hf"
CT_FORMAT = "bitlaw-compressed-tensors"
EXPORT_FORMATS = {NATIVE_FORMAT: 2, HF_FORMAT: 1, CT_FORMAT: 1}
"""The export formats and the version of each this code writes and reads."""
NATIVE_V1 = 1  # a native manifest that listed its tensor file only (``sha256``); recognised so --force can replace it


@dataclass(frozen=True)
class ExportManifest:
    """``bitlaw.json``, the manifest of every export: what the export holds and every file of it.

    ``format`` (:data:`EXPORT_FORMATS`) and its ``version``; ``model`` (``LlamaConfig.to_dict()``), ``recipe``
    (``Recipe.to_dict()``), ``tokenizer`` (the tokenizer's file name in the export, or None), ``data`` (the prepared
    data set the model was trained on, or None), ``run`` (:class:`RunSummary`, or None), ``files`` (every file of the
    export but the manifest). Format-specific: ``layers`` (native: per stored layer its shape, field bits, scale key
    and whether it is masked), ``storage`` and ``measured`` (compressed-tensors: the storage plan and the measured
    validation losses), ``compressed`` (a ``bitlaw-compress`` output: its stages and source). Fields this version
    does not know are kept in ``extra``.
    """

    format: str
    version: int
    model: dict[str, Any]
    recipe: dict[str, Any]
    files: dict[str, FileEntry]
    tokenizer: str | None = None
    data: DataSource | None = None
    run: RunSummary | None = None
    layers: dict[str, dict[str, Any]] | None = None
    storage: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    compressed: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ExportManifest:
        """The manifest of the parsed ``bitlaw.json`` ``data`` of a format and version this code reads; ValueError
        naming ``where`` and what is wrong otherwise (an unknown format or version, a missing or mistyped field)."""
        fmt, version = data.get("format"), data.get("version")
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"{where}: format {fmt!r} is not an export format this bitlaw reads; allowed: "
                             f"{', '.join(EXPORT_FORMATS)}")
        if version != EXPORT_FORMATS[fmt]:
            older = isinstance(version, int) and version < EXPORT_FORMATS[fmt]
            hint = " (written by an earlier bitlaw: export it again from its checkpoint)" if older else ""
            raise ValueError(f"{where}: format {fmt!r} version {version!r} is not supported; this loader reads "
                             f"{fmt!r} version {EXPORT_FORMATS[fmt]}{hint}")
        files = data.get("files")
        if not isinstance(files, dict):
            raise ValueError(f"{where} has no 'files' object listing the export's files: the export is damaged")
        for name in ("model", "recipe"):
            if not isinstance(data.get(name), dict):
                raise ValueError(f"{where}: {name}={data.get(name)!r} is not an object: the export is damaged")
        entries = {}
        for name, entry in files.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"{where}: the entry of {name!r} in 'files' is not {{'bytes': int, 'sha256': hex}}: "
                                 "the export is damaged")
            entries[name] = FileEntry(entry["bytes"], entry["sha256"])
        _check_type(where, "tokenizer", data.get("tokenizer"), (str,))
        for name in ("layers", "storage", "measured", "compressed"):
            _check_type(where, name, data.get(name), (dict,))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(format=fmt, version=version, model=data["model"], recipe=data["recipe"], files=entries,
                   tokenizer=data.get("tokenizer"), data=DataSource.from_dict(data.get("data"), where),
                   run=RunSummary.from_dict(data.get("run"), where), layers=data.get("layers"),
                   storage=data.get("storage"), measured=data.get("measured"), compressed=data.get("compressed"),
                   extra={key: value for key, value in data.items() if key not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``bitlaw.json``; format-specific fields appear only when set."""
        out: dict[str, Any] = {"format": self.format, "version": self.version, "model": self.model,
                               "recipe": self.recipe, "tokenizer": self.tokenizer,
                               "data": dataclasses.asdict(self.data) if self.data else None,
                               "run": self.run.to_dict() if self.run else None}
        for name in ("layers", "storage", "measured", "compressed"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(self.extra)
        out["files"] = {name: dataclasses.asdict(entry) for name, entry in self.files.items()}
        return out

    def to_json(self) -> str:
        """The text of ``bitlaw.json``: indented JSON with a final newline."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

