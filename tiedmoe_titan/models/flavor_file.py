"""Flavors given as a JSON file of model args.

Model shapes are chosen by flavor names (``[model] flavor = "debug"``). A model whose
shape matches no named flavor, such as an imported Hugging Face checkpoint, is
described by a JSON file of its model args instead, and a recipe names that file:
``[model] flavor = "/abs/path/flavor.json"``. ``FlavorTable`` is a family's table of
named flavors that also answers such paths, so torchtitan's trainer (which looks the
flavor up in the train spec's ``model_args``) and ``preflight.model_args_of`` need no change.

The file holds the model's shape (every field of the family's model args except
``tying`` and ``routing``, which come from the recipe's ``[tying]`` / ``[routing]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

from ..config import RecipeError, check_values
from .family import TiedMoEArgs

FLAVOR_FILE_SUFFIX = ".json"
RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(TiedMoEArgs))


def is_flavor_file(flavor: object) -> bool:
    return isinstance(flavor, str) and flavor.endswith(FLAVOR_FILE_SUFFIX)


def write_flavor_file(args, path: str) -> None:
    shape = {k: v for k, v in dataclasses.asdict(args).items() if k not in RECIPE_FIELDS}
    with open(path, "w") as f:
        json.dump(shape, f, indent=2)
        f.write("\n")


def read_flavor_file(args_cls: type, path: str):
    """The model args of ``path``, an instance of ``args_cls`` with default tying / routing."""
    where = f"model.flavor = {path!r}"
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such flavor file (a flavor is a name or a path to a .json of model args)") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"{where}: not valid JSON: {e}") from None
    return _dataclass_from_dict(args_cls, values, where)


def _dataclass_from_dict(cls: type, values: Any, where: str):
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a JSON object for {cls.__name__}, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init} - RECIPE_FIELDS
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown field {unknown[0]!r} of {cls.__name__}: was it written for another family?")
    check_values(values, cls, where)
    kwargs = {
        key: _dataclass_from_dict(hints[key], value, where) if dataclasses.is_dataclass(hints[key]) else value
        for key, value in values.items()
    }
    return cls(**kwargs)


class FlavorTable(dict):
    """A family's named flavors; a key ending in ``.json`` is read as a flavor file.

    Each lookup of a file returns fresh args (named flavors are shared objects)."""

    def __init__(self, flavors: dict):
        super().__init__(flavors)
        self.args_cls = type(next(iter(flavors.values())))

    def __contains__(self, flavor: object) -> bool:
        return super().__contains__(flavor) or is_flavor_file(flavor)

    def __missing__(self, flavor: str):
        if not is_flavor_file(flavor):
            raise KeyError(flavor)
        return read_flavor_file(self.args_cls, os.path.expanduser(flavor))
