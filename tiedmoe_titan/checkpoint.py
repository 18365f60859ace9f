"""Checkpoints a user can trust, on top of torchtitan's DCP checkpoint manager.

* Completeness: a DCP checkpoint is complete once its ``.metadata`` exists (DCP writes
  it last, atomically, after every rank's shards). A ``step-N`` folder without it is
  what a crash or kill during a save leaves behind: at start-up it is reported and
  moved aside (renamed ``incomplete-N-<time>``), so neither torchtitan's loader nor its
  retention (which counts every ``step-N`` folder) mistakes it for a checkpoint, and
  retention can never delete the last complete checkpoint in its favour.
* Compatibility: before loading, the checkpoint's tensor shapes are compared with the
  model's, and a difference is reported in one line in terms of banks and layers
  (``bank of layers.2 has 16 experts in the checkpoint, 8 in the recipe``) instead of a
  tensor-shape traceback from deep inside DCP.
* RNG states: each rank's generators are saved (``RngState``) and restored when the
  resuming run has the same number of ranks (a resharded run has other ranks, so it
  keeps its own). Nothing in the models draws random numbers after initialisation
  today; this keeps resumes exact for anything that will (dropout, noisy routing).
* Non-finite steps: ``NonFiniteGuard`` skips an optimizer step whose loss or gradients
  are not finite (all ranks together), up to a limit, then stops the run without
  saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.tools.logging import logger

STEP = re.compile(r"^step-(\d+)$")


@dataclass
class NanGuardConfig:
    """The ``[nan_guard]`` section of a recipe."""

    max_skipped_steps: int = 0
    """Steps with a non-finite loss or gradient to skip before stopping (0: stop at the first)."""


class RngState(Stateful):
    """This rank's RNG states, under a per-rank key (``rng.rank_<r>.cpu``, ``...accelerator``)."""

    KEY = "rng"

    def __init__(self, rank: int):
        self.rank = rank

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["accelerator"] = torch.cuda.get_rng_state()
        return {f"rank_{self.rank}": states}

    def load_state_dict(self, state_dict: dict[str, dict[str, torch.Tensor]]) -> None:
        states = state_dict[f"rank_{self.rank}"]
        torch.set_rng_state(states["cpu"])
        if "accelerator" in states:
            torch.cuda.set_rng_state(states["accelerator"])


def saved_ranks(checkpoint_dir: str, prefix: str) -> int:
    """How many ranks saved a per-rank state under ``prefix`` (``dataloader.dp_rank_``,
    ``rng.rank_``) in a DCP checkpoint (0: none)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    return len({key[len(prefix):].split(".")[0] for key in metadata if key.startswith(prefix)})


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from does not fit the recipe's model; one line."""


class NonFiniteTraining(RuntimeError):
    """Too many steps with a non-finite loss or gradient."""


def complete_steps(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        int(m.group(1))
        for name in os.listdir(folder)
        if (m := STEP.match(name)) and os.path.isfile(os.path.join(folder, name, ".metadata"))
    )


def set_aside_incomplete(folder: str) -> list[str]:
    """Rename step folders without DCP metadata (interrupted saves); returns their new paths.
    Call on one rank."""
    moved = []
    if not os.path.isdir(folder):
        return moved
    for name in sorted(os.listdir(folder)):
        m = STEP.match(name)
        if m and not os.path.isfile(os.path.join(folder, name, ".metadata")):
            target = os.path.join(folder, f"incomplete-{m.group(1)}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(os.path.join(folder, name), target)
            moved.append(target)
            latest = complete_steps(folder)
            resume = f"step-{latest[-1]}" if latest else "no complete checkpoint (fresh start)"
            logger.warning(f"Checkpoint {name} is incomplete (a save was interrupted): moved to {target}; resuming from {resume}")
    return moved


def _describe(key: str) -> str:
    """A state-dict key in the words of the tie layout."""
    m = re.match(r"layers\.(\d+)\.moe\.experts\.(w\d)$", key)
    return f"the bank of layers.{m.group(1)} ({m.group(2)})" if m else key


def check_compatible(checkpoint_dir: str, model_state: dict[str, torch.Tensor]) -> None:
    """Compare a DCP checkpoint's model tensor shapes with the run about to load it
    (DCP reshards the same shapes to any parallel layout)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    stored = {key: tuple(md.size) for key, md in metadata.items() if isinstance(md, TensorStorageMetadata)}
    where = os.path.basename(checkpoint_dir.rstrip("/"))
    # Banks first: a different layout shows there, and routers then differ as a consequence.
    for key, tensor in sorted(model_state.items(), key=lambda kv: ".moe.experts." not in kv[0]):
        expected = tuple(tensor.shape)
        if key not in stored:
            if ".moe.experts." in key:
                raise CheckpointMismatch(
                    f"{where} has no {key}: layers.{key.split('.')[1]} owns a bank in the recipe but not in the "
                    "checkpoint, so their tie layouts differ ([tying] group_size / untied_first / untied_last)"
                )
            raise CheckpointMismatch(f"{where} has no {key}: it was saved from a different model")
        if stored[key] != expected:
            if ".moe.experts." in key:
                raise CheckpointMismatch(
                    f"{_describe(key)} has {stored[key][0]} experts in {where}, {expected[0]} in the recipe "
                    f"(shapes {list(stored[key])} vs {list(expected)}): check [tying] bank_expansion / narrow_control and the flavor"
                )
            raise CheckpointMismatch(f"{key} has shape {list(stored[key])} in {where}, {list(expected)} in the recipe: a different model shape")
    model_keys = set(model_state)
    extra = sorted(k for k in stored if k.startswith("layers.") and k not in model_keys and ".moe.experts." in k)
    if extra:
        raise CheckpointMismatch(
            f"{where} holds {extra[0]}, which the recipe's model does not have: "
            "the checkpoint's tie layout has more banks than the recipe's ([tying] differs)"
        )


class NonFiniteGuard:
    """Wraps ``optimizers.step``: a step is taken only if the losses seen since the
    last step and all gradients are finite on every rank; otherwise gradients are
    dropped and the step skipped (the LR schedule still advances). After
    ``max_skipped`` skipped steps the next one raises ``NonFiniteTraining``."""

    def __init__(self, optimizers, model_parts, max_skipped: int):
        self.optimizers = optimizers
        self.model_parts = model_parts
        self.max_skipped = max_skipped
        self.skipped = 0
        self._loss_ok: torch.Tensor | None = None
        self._step = optimizers.step
        optimizers.step = self.step

    def observe_loss(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def _finite_everywhere(self) -> bool:
        grads = [p.grad for m in self.model_parts for p in m.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        bad = torch.zeros((), device=local[0].device if local else "cpu")
        if local:
            norms = torch._foreach_norm(local)
            bad = (~torch.isfinite(torch.stack(norms))).any().float()
        if self._loss_ok is not None:
            bad = torch.maximum(bad, (~self._loss_ok).float().to(bad.device))
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._loss_ok = None
        return bad.item() == 0

    def step(self, *args, **kwargs) -> None:
        if self._finite_everywhere():
            self._step(*args, **kwargs)
            return
        self.skipped += 1
        if self.skipped > self.max_skipped:
            raise NonFiniteTraining(
                f"non-finite loss or gradient in {self.skipped} step(s), more than nan_guard.max_skipped_steps = "
                f"{self.max_skipped}: stopped without saving; the latest checkpoint is the last good state"
            )
        logger.warning(f"Non-finite loss or gradient: step skipped ({self.skipped} of at most {self.max_skipped})")
        self.optimizers.zero_grad()
