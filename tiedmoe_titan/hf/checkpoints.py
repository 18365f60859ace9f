"""Project checkpoints on disk.

* What ``tiedmoe-train`` writes, read by ``tiedmoe-export``: a DCP step folder
  ``<dump_folder>/<checkpoint.folder>/step-N`` (complete once ``.metadata`` exists)
  and, in the dump folder above it, ``recipe.resolved.toml``, which names the model.
* What ``tiedmoe-import`` writes: a model-only DCP checkpoint, a flavor file of the
  model's shape and a recipe that trains it (see ``write_import``); tiedmoe-export reads
  it as it stands too.

Both run in one process without a process group (DCP's single-process mode).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from ..checkpoint import CheckpointMismatch, check_compatible, complete_steps
from ..config import parse_recipe, to_toml
from ..preflight import model_args_of
from ..models.qwen3 import TiedQwen3ModelArgs
from ..spec import SPEC_PREFIX
from ..tying import TieConfig, TieLayout
from .errors import HFInteropError
from .flavor_file import write_flavor_file
from .state_dict import HF_ARCHITECTURES

RESOLVED_RECIPE = "recipe.resolved.toml"
RECIPE_SEARCH_DEPTH = 4  # folders above a step folder searched for the resolved recipe
IMPORT_MODEL, IMPORT_FLAVOR, IMPORT_RECIPE, IMPORT_TOKENIZER = "model", "flavor.json", "recipe.toml", "tokenizer"


@dataclass
class ProjectModel:
    """A project model as a recipe describes it."""

    family: str
    args: TiedQwen3ModelArgs
    model_cls: type

    @property
    def layout(self) -> TieLayout:
        return self.args.tie_layout()

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict on the meta device (names and shapes, no memory)."""
        with torch.device("meta"):
            return self.model_cls(self.args).state_dict()


@contextlib.contextmanager
def single_process():
    """DCP without a process group reads / writes as one process, which is what we
    want here; it says so in a warning on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


def checkpoint_at(path: str) -> str | None:
    """The complete DCP checkpoint ``path`` is: itself (a step folder, or an import's
    ``model/``) or the latest complete step of it (a checkpoint folder); None: neither."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    steps = complete_steps(path)
    return os.path.join(path, f"step-{steps[-1]}") if steps else None


def find_step(path: str) -> str:
    """The complete DCP checkpoint at ``path``: a step folder, the latest complete step of a
    checkpoint folder, or either of these as the one checkpoint in ``path`` (a run's dump
    folder holds ``checkpoint/``, tiedmoe-import's OUTDIR ``model/``)."""
    found = checkpoint_at(path)
    if found:
        return found
    inside = sorted(os.listdir(path)) if os.path.isdir(path) else []
    found_inside = [c for c in (checkpoint_at(os.path.join(path, name)) for name in inside) if c]
    if len(found_inside) > 1:
        raise HFInteropError(f"{path} holds {len(found_inside)} checkpoints ({', '.join(found_inside)}): pass the one to use")
    if found_inside:
        return found_inside[0]
    raise HFInteropError(
        f"{path} is not a complete DCP checkpoint (no .metadata), a folder of step-N checkpoints, nor a folder holding one: "
        "pass a step-N folder, a run's checkpoint folder or tiedmoe-import's OUTDIR"
    )


def find_recipe(step_dir: str) -> str:
    """The recipe of the checkpoint at ``step_dir``, from the nearest folder above it that has
    one: the ``recipe.resolved.toml`` tiedmoe-train wrote in its dump folder, or the
    ``recipe.toml`` tiedmoe-import wrote next to its ``model/`` (looked for only there:
    elsewhere that name may be any recipe)."""
    folder = os.path.dirname(os.path.abspath(step_dir))
    candidates = [os.path.join(folder, RESOLVED_RECIPE), os.path.join(folder, IMPORT_RECIPE)]
    for _ in range(RECIPE_SEARCH_DEPTH - 1):
        folder = os.path.dirname(folder)
        candidates.append(os.path.join(folder, RESOLVED_RECIPE))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise HFInteropError(
        f"no {RESOLVED_RECIPE} in the folders above {step_dir} nor an import's {IMPORT_RECIPE} next to it: "
        "pass --recipe with the recipe it was trained with"
    )


def read_model_state(step_dir: str, model: ProjectModel, recipe: str) -> dict[str, torch.Tensor]:
    """The model tensors of a (full or model-only) DCP checkpoint, as saved (dtype included)."""
    expected = model.meta_state_dict()
    try:
        check_compatible(step_dir, expected)
    except CheckpointMismatch as e:
        raise HFInteropError(f"{e} (recipe {recipe})") from None
    metadata = FileSystemReader(step_dir).read_metadata().state_dict_metadata
    state = {key: torch.empty(metadata[key].size, dtype=metadata[key].properties.dtype) for key in expected}
    with single_process():
        dcp.load(state, checkpoint_id=step_dir)
    return state


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
