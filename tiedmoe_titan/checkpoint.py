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
* Reruns and extensions: ``finished_run`` says a run whose latest checkpoint is at or
  past ``training.steps`` is done (the trainer exits 0); ``plan_resume`` picks the
  checkpoint to continue from and the step folders to set aside first, since a run
  never writes into an existing one (torchtitan's model-only final save, folders newer
  than an explicit ``load_step``). ``ScheduleState`` records the ``training.steps`` the
  LR schedule followed, so an extension that changes it says so.
* Non-finite steps: ``NonFiniteGuard`` skips an optimizer step whose loss or gradients
  are not finite (all ranks together), up to a limit, then stops the run without
  saving, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.tools.logging import logger

from .compat import replaced_clip_grad_norm
from .data.shard_format import write_json_atomic
from .models.moe import tied_moe_layers
from .tokenizer import tokenizer_identity

STEP = re.compile(r"^step-(\d+)$")
DCP_METADATA = ".metadata"  # written last, atomically: a checkpoint without it is incomplete


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


TOKENIZER_RECORD = "tokenizer_identity.json"  # next to a checkpoint: what it was trained with


def record_tokenizer(checkpoint_dir: str, tokenizer) -> None:
    """Record the tokenizer a checkpoint's model was trained with (``tokenizer_identity``)."""
    write_json_atomic(os.path.join(checkpoint_dir, TOKENIZER_RECORD), tokenizer_identity(tokenizer))


def tokenizer_mismatch(checkpoint_dir: str, tokenizer, key: str = "model.hf_assets_path") -> str | None:
    """One line if ``checkpoint_dir`` records another tokenizer than ``tokenizer``, else None.
    Compared by identity (a hash of its files), not size: vocabularies are padded."""
    path = os.path.join(checkpoint_dir, TOKENIZER_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path} cannot be read ({e}): restore it, or delete it to skip the tokenizer check"
    if not isinstance(recorded, dict):
        return f"{path} is not a tokenizer record (a JSON object): restore it, or delete it to skip the tokenizer check"
    now = tokenizer_identity(tokenizer)
    if recorded.get("sha256") == now["sha256"]:
        return None
    return (
        f"{key} is a {now['kind']} tokenizer of {now['vocab_size']:,} ids (sha256 {now['sha256'][:12]}), but {checkpoint_dir} "
        f"was trained with a {recorded.get('kind')} tokenizer of {recorded.get('vocab_size', 0):,} ids (sha256 "
        f"{str(recorded.get('sha256'))[:12]}): point {key} at that tokenizer (tiedmoe-import copies it next to the checkpoint)"
    )


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
        if (m := STEP.match(name)) and os.path.isfile(os.path.join(folder, name, DCP_METADATA))
    )


def is_model_only(checkpoint_dir: str) -> bool:
    """Whether a complete checkpoint holds the model alone (torchtitan's final save with
    ``checkpoint.last_save_model_only``): no training state to continue from."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    return not any(key.startswith("train_state") for key in metadata)


def finished_run(folder: str, training_steps: int) -> str | None:
    """A line saying the run in ``folder`` is already done, or None."""
    steps = complete_steps(folder)
    if not steps or steps[-1] < training_steps:
        return None
    where = os.path.join(folder, f"step-{steps[-1]}")
    at = "at" if steps[-1] == training_steps else "past"
    return (f"{where} is {at} training.steps = {training_steps}: the run is finished, nothing to train "
            "(raise --training.steps to extend it)")


def set_aside(folder: str, name: str, prefix: str) -> str:
    """Rename ``folder/name`` (``step-N``) to ``folder/prefix-N-<time>``, out of reach of
    torchtitan's loader and retention, which only know ``step-N``; returns the new path."""
    target = os.path.join(folder, f"{prefix}-{name.split('-')[1]}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(os.path.join(folder, name), target)
    return target


def set_aside_incomplete(folder: str) -> list[str]:
    """Rename step folders without DCP metadata (interrupted saves); returns their new paths.
    Call on one rank."""
    moved = []
    if not os.path.isdir(folder):
        return moved
    for name in sorted(os.listdir(folder)):
        if STEP.match(name) and not os.path.isfile(os.path.join(folder, name, DCP_METADATA)):
            moved.append(set_aside(folder, name, "incomplete"))
            latest = complete_steps(folder)
            resume = f"step-{latest[-1]}" if latest else "no complete checkpoint (fresh start)"
            logger.warning(f"Checkpoint {name} is incomplete (a save was interrupted): moved to {moved[-1]}; resuming from {resume}")
    return moved


@dataclass
class ResumePlan:
    """Which complete checkpoint a run continues from, and which step folders must be set
    aside first (name, prefix, why): a run never writes into an existing step folder, since
    a kill during that save would leave the old ``.metadata`` over new shards, a
    checkpoint that looks complete but is not."""

    step: int
    set_aside: list[tuple[str, str, str]]


def plan_resume(folder: str, load_step: int) -> ResumePlan:
    """Read-only, so that every rank computes the same plan; raises CheckpointMismatch
    when the only checkpoints left hold the model alone."""
    steps = complete_steps(folder)
    if load_step > 0:
        later = [s for s in steps if s > load_step]
        why = f"newer than step-{load_step} (checkpoint.load_step), which this run continues from and will save again"
        return ResumePlan(load_step, [(f"step-{s}", "superseded", why) for s in later])
    moves = []
    while steps and is_model_only(os.path.join(folder, f"step-{steps[-1]}")):
        moves.append((f"step-{steps[-1]}", "model-only", "it holds only the model (checkpoint.last_save_model_only)"))
        steps.pop()
    if moves and not steps:
        raise CheckpointMismatch(
            f"{os.path.join(folder, moves[0][0])} holds only the model and there is no full checkpoint to continue from: "
            "start a new run from its weights (--checkpoint.initial_load_path PATH --checkpoint.initial_load_model_only "
            "with another --job.dump_folder)"
        )
    return ResumePlan(steps[-1] if steps else 0, moves)


class ScheduleState(Stateful):
    """The ``training.steps`` the LR schedule followed when a checkpoint was saved. A run
    that continues with another value (a finished run extended) has a different
    schedule from there on, since warmup is clamped to the total and the decay follows
    it, unless ``lr_scheduler.total_steps`` fixes it; that is said in one line."""

    KEY = "schedule"

    def __init__(self, training_steps: int, fixed_total: int | None):
        self.training_steps = training_steps
        self.fixed_total = fixed_total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"training_steps": torch.tensor(self.training_steps)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        saved = int(state_dict["training_steps"])
        if saved != self.training_steps and self.fixed_total is None:
            logger.warning(
                f"training.steps is {self.training_steps}, the checkpoint was trained toward {saved}: the LR schedule "
                f"(warmup clamped to the total, decay to the last step) now follows {self.training_steps} steps, so the LR "
                f"from here on differs from the original run's (--lr_scheduler.total_steps {saved} keeps that schedule)"
            )


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
    """Wraps ``optimizers.step``: a step is taken only if the losses seen since the last
    step and all gradients are finite on every rank; otherwise gradients and the step's
    expert token counts are dropped and the step skipped (the LR schedule still
    advances). After ``max_skipped`` skipped steps the next one raises
    ``NonFiniteTraining``.

    It adds no collective and no gradient pass: the decision is the global gradient
    norm that torchtitan's ``clip_grad_norm_`` computes anyway (all ranks, all
    gradients), which is non-finite exactly when some gradient is. A rank whose loss is
    not finite first puts a NaN into one of its own gradients, so the norm carries
    that too. The one cost is reading the norm on the host before the optimizer step.
    ``watching_clip()`` is how the norm is taken (``compat.replaced_clip_grad_norm``):
    torchtitan 0.2.2's ``train_step`` clips right before ``optimizers.step()`` and keeps
    the norm to itself."""

    def __init__(self, optimizers, model_parts, max_skipped: int):
        self.optimizers = optimizers
        self.model_parts = model_parts
        self.max_skipped = max_skipped
        self.skipped = 0
        self._loss_ok: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._step = optimizers.step
        optimizers.step = self.step

    def observe_loss(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def watching_clip(self):
        def keeping_norm(clip):
            def clip_and_keep_norm(parameters, *args, **kwargs):
                parameters = list(parameters)
                self._poison_if_loss_not_finite(parameters)
                self._grad_norm = clip(parameters, *args, **kwargs)
                return self._grad_norm

            return clip_and_keep_norm

        return replaced_clip_grad_norm(keeping_norm)

    def _poison_if_loss_not_finite(self, parameters) -> None:
        if self._loss_ok is None:
            return
        for p in parameters:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            if grad is not None and grad.numel() > 0:
                grad.view(-1)[:1].add_(torch.where(self._loss_ok, 0.0, float("nan")))
                break
        self._loss_ok = None

    def step(self, *args, **kwargs) -> None:
        norm, self._grad_norm = self._grad_norm, None
        if norm is None or torch.isfinite(norm).item():
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
        # The expert-bias update (an optimizer pre-hook) did not run: its counts start afresh.
        for model in self.model_parts:
            for layer in tied_moe_layers(model):
                layer.tokens_per_expert.zero_()
