"""Saved checkpoints read outside training (tiedmoe-eval, tiedmoe-export).

* What ``tiedmoe-train`` writes: a DCP step folder ``<dump_folder>/<checkpoint.folder>/step-N``
  (complete once ``.metadata`` exists) and, in the dump folder above it,
  ``recipe.resolved.toml``, which names the model.
* What ``tiedmoe-import`` writes: ``OUTDIR/model`` (a model-only DCP checkpoint) and
  ``OUTDIR/recipe.toml`` next to it.

``find_step`` and ``find_recipe`` locate both; ``read_model_state`` reads the model
tensors in one process without a process group (DCP's single-process mode).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from .checkpoint import DCP_METADATA, CheckpointMismatch, check_compatible, complete_steps
from .tying import TieLayout

RESOLVED_RECIPE = "recipe.resolved.toml"
RECIPE_SEARCH_DEPTH = 4  # folders above a step folder searched for the resolved recipe
IMPORT_MODEL, IMPORT_FLAVOR, IMPORT_RECIPE, IMPORT_TOKENIZER = "model", "flavor.json", "recipe.toml", "tokenizer"


class SavedCheckpointError(ValueError):
    """A checkpoint folder that cannot be found, matched or read; one line."""


@dataclass
class ProjectModel:
    """A project model as a recipe describes it."""

    family: str
    args: object  # the family's model args
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


def checkpoint_at(path: str) -> str | None:
    """The complete DCP checkpoint ``path`` is: itself (a step folder, or an import's
    ``model/``) or the latest complete step of it (a checkpoint folder); None: neither."""
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
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
        raise SavedCheckpointError(f"{path} holds {len(found_inside)} checkpoints ({', '.join(found_inside)}): pass the one to use")
    if found_inside:
        return found_inside[0]
    raise SavedCheckpointError(
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
    raise SavedCheckpointError(
        f"no {RESOLVED_RECIPE} in the folders above {step_dir} nor an import's {IMPORT_RECIPE} next to it: "
        "pass --recipe with the recipe it was trained with"
    )


def read_model_state(step_dir: str, model: ProjectModel, recipe: str) -> dict[str, torch.Tensor]:
    """The model tensors of a (full or model-only) DCP checkpoint, as saved (dtype included)."""
    expected = model.meta_state_dict()
    try:
        check_compatible(step_dir, expected)
    except CheckpointMismatch as e:
        raise SavedCheckpointError(f"{e} (recipe {recipe})") from None
    metadata = FileSystemReader(step_dir).read_metadata().state_dict_metadata
    state = {key: torch.empty(metadata[key].size, dtype=metadata[key].properties.dtype) for key in expected}
    with single_process():
        dcp.load(state, checkpoint_id=step_dir)
    return state
