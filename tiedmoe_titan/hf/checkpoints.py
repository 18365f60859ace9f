"""What tiedmoe-export and tiedmoe-import need of project checkpoints beyond reading
them (``saved_checkpoints``): the model a recipe names, if it has a Hugging Face
counterpart, and writing an import (a model-only DCP checkpoint, a flavor file of the
model's shape and a recipe that trains it), in one process without a process group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp

from ..config import parse_recipe, to_toml
from ..models.flavor_file import write_flavor_file
from ..models.qwen3 import TiedQwen3ModelArgs
from ..preflight import model_args_of
from ..saved_checkpoints import IMPORT_FLAVOR, IMPORT_MODEL, IMPORT_RECIPE, ProjectModel, single_process
from ..spec import SPEC_PREFIX
from ..tying import TieConfig
from .errors import HFInteropError
from .state_dict import HF_ARCHITECTURES


def model_of_recipe(recipe: str) -> ProjectModel:
    job_config = parse_recipe(recipe)
    spec, args = model_args_of(job_config)
    family = job_config.model.name.removeprefix(SPEC_PREFIX)
    if family not in HF_ARCHITECTURES:
        raise HFInteropError(
            f"{recipe}: model.name = {job_config.model.name!r} has no Hugging Face counterpart: "
            f"export supports {', '.join(SPEC_PREFIX + f for f in HF_ARCHITECTURES)}"
        )
    return ProjectModel(family, args, spec.model_cls)


def write_import(
    outdir: str, family: str, args: TiedQwen3ModelArgs, tying: TieConfig, state: dict[str, torch.Tensor], source: str,
    extends: str | None, tokenizer_dir: str | None = None,
) -> str:
    """Write an imported model so tiedmoe-train can continue pretraining it; returns the recipe.

    ``outdir/model`` is a model-only DCP checkpoint (torchtitan loads it through
    ``checkpoint.initial_load_path`` / ``initial_load_model_only``), ``outdir/flavor.json``
    the model's shape, and ``outdir/recipe.toml`` names both with the tie layout (and the
    copied tokenizer, if any). Its paths are absolute, so a recipe anywhere may ``extends`` it."""
    outdir = os.path.abspath(outdir)
    with single_process():
        dcp.save(state, checkpoint_id=os.path.join(outdir, IMPORT_MODEL))
    write_flavor_file(args, os.path.join(outdir, IMPORT_FLAVOR))
    recipe = {
        "extends": os.path.abspath(extends) if extends else None,
        "model": {"name": SPEC_PREFIX + family, "flavor": os.path.join(outdir, IMPORT_FLAVOR), "hf_assets_path": tokenizer_dir},
        "tying": {"group_size": tying.group_size, "untied_first": tying.untied_first, "untied_last": tying.untied_last},
        "checkpoint": {
            "enable": True,
            "initial_load_path": os.path.join(outdir, IMPORT_MODEL),
            "initial_load_model_only": True,
        },
    }
    path = os.path.join(outdir, IMPORT_RECIPE)
    with open(path, "w") as f:
        f.write(f"# Written by tiedmoe-import from {os.path.abspath(source)}.\n")
        f.write("# Train: tiedmoe-train THIS_FILE (or a recipe with `extends` = this file), with data, tokenizer and optimizer settings.\n\n")
        f.write(to_toml(recipe))
    return path
