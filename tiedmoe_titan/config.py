"""Recipes: torchtitan job configs with the project's sections, inheritance and checks.

torchtitan merges this module's ``JobConfig`` into its own when a recipe names it
(``tiedmoe-train`` and ``tiedmoe-plan`` pass ``--job.custom_config_module`` for you),
so recipes gain these sections, overridable from the command line like any torchtitan
key (``--tying.group_size 4``):

* ``[tying]``: which layers share a bank of routed experts (see ``tiedmoe_titan.tying``);
* ``[routing]``: the router's training objective (aux loss, z-loss, expert bias);
* ``[nan_guard]``: how many non-finite steps to skip before stopping;
* ``[data]``: the order of the training samples (shuffle, seed; ``tiedmoe_titan.data``);
* ``[optimizer.muon]``: Muon's settings, merged into torchtitan's ``[optimizer]``.

A recipe may start with ``extends = "other.toml"`` (a path relative to the recipe):
it then holds only what differs from that recipe; tables merge key by key.

This module loads a recipe and checks what can be checked from the recipe alone, each
mistake as one line naming the key and the fix (``RecipeError``): unreadable files,
unknown keys (with the closest valid one), wrong types, values outside their key's
domain (``domains.py``), command-line parse errors. ``preflight.py`` then checks the
recipe against the run (world size, tie layout, data, tokenizer, checkpoint), and
``to_toml`` / ``write_resolved_recipe`` write a recipe back.
"""

import argparse
import contextlib
import dataclasses
import difflib
import io
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import NanGuardConfig
from .compat import merged_job_config_class, recipe_config_manager
from .data import DataConfig
from .domains import DOMAINS
from .models.family import RoutingConfig
from .muon import OptimizerWithMuon
from .tying import TieConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

CONFIG_MODULE = __name__
EXTENDS = "extends"


@dataclass
class JobConfig:
    tying: TieConfig = field(default_factory=TieConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerWithMuon = field(default_factory=OptimizerWithMuon)  # merged into torchtitan's [optimizer]


class RecipeError(ValueError):
    """A recipe mistake, as one line naming the key and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the project's commands: a command-line mistake is one line
    (``PROG: error: ...``, exit code 2), not a usage block and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- loading ------------------------------------------------------------------------


def load_recipe(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's values with ``extends`` resolved (the child's keys win)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise RecipeError(f"{path}: extends loops back to itself via {' -> '.join(_seen)}")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a folder: name a .toml file") from None
    except OSError as e:
        raise RecipeError(f"recipe {path} cannot be read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    base = values.pop(EXTENDS, None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise RecipeError(f"{path}: extends = {base!r} must be a path string")
    return _merge(load_recipe(os.path.join(os.path.dirname(path), base), (*_seen, path)), values)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_config_class():
    """torchtitan's JobConfig merged with ours, as torchtitan builds it."""
    return merged_job_config_class(JobConfig)


def parse_recipe(recipe: str, overrides: list[str] = ()):
    """A torchtitan job config (with our sections) from a recipe file and CLI overrides.

    Key, type and domain mistakes (``domains.DOMAINS``), in the file or on the command
    line, raise ``RecipeError`` (one line) before torchtitan builds its config, whose
    own checks are asserts; a seed is always set (0 if the recipe has none), so every
    run is reproducible and records its seed."""
    values = load_recipe(recipe)
    config_cls = job_config_class()
    check_values(values, config_cls, where=recipe)
    check_command_line(list(overrides), config_cls)

    manager = recipe_config_manager(values)
    job_config = _quiet_tyro(lambda: manager.parse_args(["--job.custom_config_module", CONFIG_MODULE, *overrides]))
    if job_config.debug.seed is None:
        job_config.debug.seed = 0
    return job_config


def _quiet_tyro(parse):
    """Run tyro's parse; a command line it refuses becomes one RecipeError line instead
    of its framed, many-line message (``--help`` still prints and exits as usual)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse()
    except SystemExit as e:
        if not e.code:
            sys.stderr.write(captured.getvalue())
            raise
        raise RecipeError(f"command line: {_first_paragraph(captured.getvalue())}") from None


def _first_paragraph(framed: str) -> str:
    """The text of a tyro error frame up to its first rule, as one line."""
    words = []
    for line in framed.splitlines()[1:]:
        text = line.strip().strip("│").strip()
        if text.startswith(("─", "╰")):
            break
        words.append(text)
    return " ".join(w for w in words if w) or "cannot be parsed (see --help)"


# ---- key and type checks ----------------------------------------------------------


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _unknown(key: str, valid: list[str], where: str, section: str) -> RecipeError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f": did you mean {close[0]!r}?" if close else f": valid keys are {', '.join(sorted(valid))}"
    return RecipeError(f"{where}: unknown key {section}{key.split('.')[-1]!r}{hint}")


def check_values(values: dict, cls, where: str, prefix: str = "") -> None:
    """Every key of ``values`` names a field of ``cls``, has its type and is in its domain."""
    fields = _fields(cls)
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            section = f"[{prefix[:-1]}] " if prefix else ""
            raise _unknown(name, list(fields), where, section)
        hint = fields[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {name} must be a table [{name}], not {value!r}")
            check_values(value, hint, where, f"{name}.")
        elif not _type_ok(value, hint):
            raise RecipeError(f"{where}: {name} = {value!r} must be {_type_name(hint)}")
        elif name in DOMAINS and not DOMAINS[name].accepts(value):
            raise RecipeError(f"{where}: {name} = {value!r}: must be {DOMAINS[name].says}")


def check_command_line(overrides: list[str], cls) -> None:
    """Command-line ``--section.key [value ...]`` names exist and their values parse as
    the key's type, each mistake one line naming the key (tyro's own messages are
    framed boxes; ``_quiet_tyro`` catches what this misses)."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        i += 1
        if not arg.startswith("--") or arg in ("--help", "-h"):
            continue
        name, inline = (arg[2:].split("=", 1) + [None])[:2]
        values = [inline] if inline is not None else []
        while inline is None and i < len(overrides) and not overrides[i].startswith("--"):
            values.append(overrides[i])
            i += 1
        hint = _override_hint(name, cls)
        if hint is not None:
            _check_override_values(arg if inline is None else f"--{name}", name.replace("-", "_"), values, hint)


def _override_hint(name: str, cls) -> Any:
    """The type hint of ``--name`` (None for a table, whose own keys follow)."""
    path = name.replace("-", "_").split(".")
    current = cls
    for i, part in enumerate(path):
        fields = _fields(current)
        if i == len(path) - 1 and part.startswith("no_") and part[3:] in fields and _is_flag(fields[part[3:]]):
            part = part[3:]
        if part not in fields:
            section = f"[{'.'.join(path[:i])}] " if i else ""
            raise _unknown(".".join(path[: i + 1]), list(fields), "command line", section)
        current = fields[part]
        if not dataclasses.is_dataclass(current):
            return current if i == len(path) - 1 else None
    return None


def _is_flag(hint: Any) -> bool:
    return hint is bool or (typing.get_origin(hint) in (typing.Union, types.UnionType) and bool in typing.get_args(hint))


def _check_override_values(arg: str, key: str, values: list[str], hint: Any) -> None:
    where = f"command line: {arg}"
    if _is_flag(hint):
        if values:
            flag = arg.split(".")[-1].removeprefix("no-").removeprefix("no_")
            section = arg[: -len(arg.split(".")[-1])]
            raise RecipeError(
                f"{where} {' '.join(values)}: a switch takes no value: write {section}{flag} or {section}no-{flag}"
            )
        return
    if hint != list[str] and typing.get_origin(hint) in (list, tuple):
        return
    if len(values) != 1:
        form = "one comma-separated value (a,b,c)" if hint == list[str] else "one value"
        raise RecipeError(f"{where}: takes {form}, got {len(values)}" + (f" ({' '.join(values)})" if values else ""))
    try:
        value = _from_text(values[0], hint)
    except ValueError:
        raise RecipeError(f"{where} {values[0]}: must be {_type_name(hint)}") from None
    if key in DOMAINS and not DOMAINS[key].accepts(value):
        raise RecipeError(f"command line: {key} = {value!r}: must be {DOMAINS[key].says}")


def _from_text(text: str, hint: Any) -> Any:
    """A command-line value as tyro will read it (ValueError if it cannot)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _from_text(text, option)
            except ValueError:
                pass
        raise ValueError(text)
    if hint is type(None):
        if text != "None":
            raise ValueError(text)
        return None
    if origin is typing.Literal:
        if text not in (str(a) for a in args):
            raise ValueError(text)
        return text
    if hint in (int, float):
        return hint(text)
    if hint == list[str]:
        return text.split(",")
    return text


# ---- checks before a run starts -----------------------------------------------------


# ---- the resolved recipe ------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(values: dict, prefix: str = "") -> str:
    """TOML text of nested dicts of scalars and lists (None values are left out)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None and not isinstance(v, dict)]
    text = (f"[{prefix}]\n" if prefix and scalars else "") + "".join(line + "\n" for line in scalars)
    for key, value in values.items():
        if isinstance(value, dict):
            text += ("\n" if text else "") + to_toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def write_resolved_recipe(job_config, folder: str) -> str:
    """Save the recipe as it will run (every key, defaults included) beside the outputs;
    written to a temporary name first so a crash never leaves half a file."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "recipe.resolved.toml")
    header = "# The recipe as tiedmoe-train ran it: every setting, defaults included.\n\n"
    with open(path + ".tmp", "w") as f:
        f.write(header + to_toml(dataclasses.asdict(job_config)))
    os.replace(path + ".tmp", path)
    return path
