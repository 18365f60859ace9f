"""Recipes: torchtitan job configs with the project's sections, inheritance and checks.

torchtitan merges this module's ``JobConfig`` into its own when a recipe names it
(``tiedmoe-train`` and ``tiedmoe-plan`` pass ``--job.custom_config_module`` for you),
so recipes gain two sections, overridable from the command line like any torchtitan
key (``--tying.group_size 4``):

* ``[tying]``: which layers share a bank of routed experts (see ``tiedmoe_titan.tying``);
* ``[routing]``: the router's training objective (aux loss, z-loss, expert bias);
* ``[nan_guard]``: how many non-finite steps to skip before stopping;
* ``[data]``: the order of the training samples (shuffle, seed; ``tiedmoe_titan.data``).

A recipe may start with ``extends = "other.toml"`` (a path relative to the recipe):
it then holds only what differs from that recipe; tables merge key by key.

Everything a recipe gets wrong is reported before anything starts, as one line naming
the key and the fix (``RecipeError``): unknown keys (with the closest valid one), wrong
types, a tie layout that cannot work, parallel degrees that do not factor the world
size or do not divide the banks, missing data or tokenizer files.
"""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import NanGuardConfig, tokenizer_mismatch
from .data import DataConfig
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
    except tomllib.TOMLDecodeError as e:
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
    from torchtitan.config import ConfigManager
    from torchtitan.config import JobConfig as TitanJobConfig

    return ConfigManager._merge_configs(TitanJobConfig, JobConfig)


def parse_recipe(recipe: str, overrides: list[str] = ()):
    """A torchtitan job config (with our sections) from a recipe file and CLI overrides.

    Key and type mistakes raise ``RecipeError``; a seed is always set (0 if the recipe
    has none), so every run is reproducible and records its seed."""
    from torchtitan.config import ConfigManager

    values = load_recipe(recipe)
    config_cls = job_config_class()
    check_values(values, config_cls, where=recipe)
    check_override_keys(list(overrides), config_cls)

    class RecipeManager(ConfigManager):
        def _maybe_load_toml(self, args):  # the merged recipe, not a single file
            return values

        def _validate_config(self):  # its checks concern HF tokenizer folders; check_run covers ours
            pass

    job_config = RecipeManager().parse_args(["--job.custom_config_module", CONFIG_MODULE, *overrides])
    if job_config.debug.seed is None:
        job_config.debug.seed = 0
    return job_config


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
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def _unknown(key: str, valid: list[str], where: str, section: str) -> RecipeError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f": did you mean {close[0]!r}?" if close else f": valid keys are {', '.join(sorted(valid))}"
    return RecipeError(f"{where}: unknown key {section}{key.split('.')[-1]!r}{hint}")


def check_values(values: dict, cls, where: str, prefix: str = "") -> None:
    """Every key of ``values`` names a field of ``cls`` and has its type."""
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


def check_override_keys(overrides: list[str], cls) -> None:
    """Command-line ``--section.key`` names exist (tyro checks the values)."""
    for arg in overrides:
        if not arg.startswith("--") or arg in ("--help", "-h"):
            continue
        path = arg[2:].split("=", 1)[0].replace("-", "_").split(".")
        current = cls
        for i, part in enumerate(path):
            fields = _fields(current)
            name = part[3:] if i == len(path) - 1 and part.startswith("no_") and part[3:] in fields else part
            if name not in fields:
                section = f"[{'.'.join(path[:i])}] " if i else ""
                raise _unknown(".".join(path[: i + 1]), list(fields), "command line", section)
            current = fields[name]
            if not dataclasses.is_dataclass(current):
                break


# ---- checks before a run starts -----------------------------------------------------


def family_names() -> str:
    from .models import FAMILIES
    from .spec import SPEC_PREFIX

    return ", ".join(SPEC_PREFIX + family for family in FAMILIES)


def model_args_of(job_config):
    """The recipe's model args (a private copy of the flavor, updated from the recipe)."""
    import copy

    from torchtitan.protocols.train_spec import get_train_spec

    from .spec import SPEC_PREFIX
    from .tying import TieConfigError

    name, flavor = job_config.model.name, job_config.model.flavor
    if not name.startswith(SPEC_PREFIX):
        raise RecipeError(f"model.name = {name!r}: tiedmoe-train builds the families {family_names()}")
    try:
        spec = get_train_spec(name)
    except ValueError:
        raise RecipeError(f"model.name = {name!r} is not a registered family: use one of {family_names()}") from None
    if flavor not in spec.model_args:
        raise RecipeError(f"model.flavor = {flavor!r} is not a flavor of {name}: choose one of {', '.join(spec.model_args)}")
    args = copy.deepcopy(spec.model_args[flavor])
    try:
        args.update_from_config(job_config)
    except TieConfigError as e:
        raise RecipeError(str(e)) from None
    return spec, args


def parallel_dims_of(job_config, world_size: int):
    """torchtitan's ParallelDims for the recipe, after checking the degrees factor ``world_size``."""
    from torchtitan.distributed import ParallelDims

    p = job_config.parallelism
    degrees = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "expert_parallel_degree": p.expert_parallel_degree,
        "expert_tensor_parallel_degree": p.expert_tensor_parallel_degree,
    }
    for key, degree in degrees.items():
        if degree < 1:
            raise RecipeError(f"parallelism.{key} = {degree}: must be >= 1")
    others = p.data_parallel_replicate_degree * p.context_parallel_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree
    dp_shard = p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % others:
            raise RecipeError(
                f"world size {world_size} is not a multiple of dp_replicate x cp x tp x pp = {others}: "
                "change the parallelism degrees or the number of processes"
            )
        dp_shard = world_size // others
    elif dp_shard < 1 or dp_shard * others != world_size:
        raise RecipeError(
            f"parallelism degrees dp_shard {dp_shard} x dp_replicate x cp x tp x pp {others} = {dp_shard * others} "
            f"but the world size is {world_size}: set parallelism.data_parallel_shard_degree = -1 or launch "
            f"{max(dp_shard, 1) * others} processes"
        )
    ep, etp = p.expert_parallel_degree, p.expert_tensor_parallel_degree
    if (dp_shard * p.context_parallel_degree * p.tensor_parallel_degree) % (ep * etp):
        raise RecipeError(
            f"parallelism.expert_parallel_degree = {ep} (x etp {etp}) must divide dp_shard x cp x tp = "
            f"{dp_shard * p.context_parallel_degree * p.tensor_parallel_degree}: expert parallelism is carved out of them"
        )
    return ParallelDims(
        dp_shard=dp_shard, dp_replicate=p.data_parallel_replicate_degree, cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree, ep=ep, etp=etp, world_size=world_size,
    )


def check_run(job_config, world_size: int) -> None:
    """Everything that must hold before ``tiedmoe-train`` builds anything."""
    from .data import check_data, resolve_dataset_files
    from .parallelize import UnsupportedParallelism, check_parallelism
    from .tokenizer import load_tokenizer

    spec, args = model_args_of(job_config)
    dims = parallel_dims_of(job_config, world_size)
    try:
        check_parallelism(spec.model_cls, args.tie_layout(), dims, job_config)
    except UnsupportedParallelism as e:
        raise RecipeError(str(e)) from None
    training = job_config.training
    dp = dims.dp_replicate * dims.dp_shard
    if training.global_batch_size > 0 and training.global_batch_size % (training.local_batch_size * dp):
        raise RecipeError(
            f"training.global_batch_size = {training.global_batch_size} is not a multiple of local_batch_size "
            f"{training.local_batch_size} x data-parallel ranks {dp}: gradient accumulation needs a whole number of microbatches"
        )
    try:
        resolve_dataset_files(training.dataset_path, "training.dataset_path")
        if job_config.validation.enable:
            resolve_dataset_files(job_config.validation.dataset_path, "validation.dataset_path")
        tokenizer = load_tokenizer(job_config.model.hf_assets_path)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None
    vocab = tokenizer.get_vocab_size()
    if vocab > args.vocab_size:
        raise RecipeError(
            f"model.hf_assets_path: the tokenizer has {vocab} tokens, more than the {args.vocab_size} of "
            f"{job_config.model.name} / {job_config.model.flavor}: use a matching tokenizer or flavor"
        )
    initial = job_config.checkpoint.initial_load_path
    if initial and (mismatch := tokenizer_mismatch(initial, tokenizer)):
        raise RecipeError(mismatch)
    try:  # opens the data as the loaders will (text inputs: tokenized once into the cache)
        check_data(job_config, tokenizer, dp)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from None


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
