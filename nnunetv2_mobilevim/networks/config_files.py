"""Network configurations as data: ``network_configs/*.json`` read into each network's frozen dataclass.

Every network's ``config.py`` defines its dataclass (fields and checks) and its shipped variants; this
module reads the files the same way for all of them: unknown keys, missing keys, invalid JSON and
invalid values are refused with a message that names the file (and the key), so a typo never falls
back to a default silently.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Dict, Type, TypeVar, Union

C = TypeVar("C")


def config_dir() -> Path:
    """The folder that holds the shipped ``network_configs/*.json`` files."""
    try:  # installed wheel or editable install: network_configs is mapped into the package
        path = Path(str(resources.files("nnunetv2_mobilevim.network_configs")))
        if any(path.glob("*.json")):
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "network_configs"  # source checkout


def from_dict(cls: Type[C], data: dict, source: str = "<dict>") -> C:
    """``cls(**data)`` after checking the keys against the dataclass' fields (those without a default
    are required); a ValueError of the dataclass' own checks is prefixed with ``source``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown configuration keys {unknown}; known keys: {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{source}: missing configuration keys {missing}")
    try:
        return cls(**data)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def load(cls: Type[C], variant: Union[str, Path, C], shipped: Dict[str, str], network: str) -> C:
    """A shipped variant by name (``shipped``: name -> file in ``network_configs/``), a path to a JSON
    file with the same keys, or an already built ``cls`` (returned as it is)."""
    if isinstance(variant, cls):
        return variant
    key = str(variant)
    if key.lower() in shipped:
        path = config_dir() / shipped[key.lower()]
    else:
        path = Path(key).expanduser()
        if not path.is_file():
            example = config_dir() / next(iter(shipped.values()))
            raise ValueError(f"unknown {network} variant {key!r}: use one of {sorted(shipped)} "
                             f"or the path of a JSON file like {example}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return cls.from_dict(data, source=str(path))
