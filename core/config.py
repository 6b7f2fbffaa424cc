"""Where bitlaw's configurations live and how a preset is read: the root of ``conf/`` and its YAML files.

``conf/`` ships as package data (``bitlaw.conf``), so :data:`CONF_DIR` is the same folder in a checkout, an editable
install and a wheel. Hydra's entry points (``bitlaw-train``, ``bitlaw-prepare``, ``bitlaw-compress``, ``bitlaw-info``)
compose from it; the presets of a group (``conf/quant/*.yaml``) are also read directly, without Hydra, by
:func:`read_preset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def preset_names(group: str) -> list[str]:
    """The names of the presets of ``group`` (``conf/<group>/*.yaml``), sorted; empty for an unknown group."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def read_preset(group: str, name: str) -> dict[str, Any]:
    """The mapping in ``conf/<group>/<name>.yaml``, or in the YAML file ``name`` itself when it ends in ``.yaml`` or
    ``.yml``. ValueError naming the preset and the group's presets when there is no such file, or when the file does
    not hold a mapping."""
    # PyYAML (a dependency of omegaconf) is imported here, so importing this module costs nothing.
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{group} preset {name!r} not found; allowed: {', '.join(preset_names(group))} (or a path "
                         "to a .yaml file)")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{group} preset {name!r} ({path}) holds a {type(data).__name__}, not a mapping of fields")
    return data
