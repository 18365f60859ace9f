"""What each recipe key accepts beyond its type, checked before anything starts.

A value of the right type can still be one that torch or torchtitan rejects only
minutes later, with a traceback and after files were written: a ``seq_len`` of 0, a
negative learning rate, a ``log_freq`` of 0 (a division by zero at the first log), a
``keep_latest_k`` of 1. ``DOMAINS`` says, for every key of the sections recipes use
whose type admits such values, what the key accepts. ``config.parse_recipe`` refuses
a value outside it, from the recipe file or the command line, in one line naming the
key, before torchtitan builds its config (whose own few checks are asserts).

Not here: keys every value of whose type works (flags, free text), paths (checked
where they are opened, ``preflight.check_run``), ``[tying]`` (its domain depends on the
model: ``tying.TieLayout`` checks it) and keys that must agree with each other or with
the world size (``preflight.check_run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from torchtitan.components.checkpoint import DATALOADER, LR_SCHEDULER, MODEL, OPTIMIZER, TRAIN_STATE

from .checkpoint import RngState, ScheduleState
from .optim import OPTIMIZER_NAMES


@dataclass(frozen=True)
class Domain:
    accepts: Callable[[Any], bool]
    says: str
    """What the key accepts, as the error says it: "must be {says}"."""
    outside: tuple
    """Values of the right type outside the domain (the tests set each key to them)."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: int) -> Domain:
    return Domain(lambda v: isinstance(v, int) and v >= low, f"an integer >= {low}", (low - 1,))


def at_least_or(low: int, special: int, meaning: str) -> Domain:
    """An integer >= ``low``, or ``special`` (e.g. -1 for "all")."""
    outside = tuple(v for v in (low - 1, special - 1) if v != special)
    return Domain(lambda v: isinstance(v, int) and (v >= low or v == special), f"an integer >= {low}, or {special} ({meaning})", outside)


def above(low: float) -> Domain:
    return Domain(lambda v: _number(v) and v > low, f"a finite number > {low:g}", (float(low), float("nan")))


def not_below(low: float) -> Domain:
    return Domain(lambda v: _number(v) and v >= low, f"a finite number >= {low:g}", (low - 1.0, float("inf")))


def fraction(upper_open: bool = False) -> Domain:
    """A number in [0, 1], or [0, 1) with ``upper_open``."""
    if upper_open:
        return Domain(lambda v: _number(v) and 0 <= v < 1, "in [0, 1)", (1.0, -0.1))
    return Domain(lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]", (1.5, -0.1))


def one_of(*choices: str) -> Domain:
    return Domain(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices), ("nonsense",))


def each_one_of(*choices: str) -> Domain:
    return Domain(
        lambda v: all(item in choices for item in v), "a list of " + ", ".join(repr(c) for c in choices), (["nonsense"],)
    )


def optional(domain: Domain) -> Domain:
    """``domain``, or unset."""
    return Domain(lambda v: v is None or domain.accepts(v), f"{domain.says}, or unset", domain.outside)


NON_EMPTY = Domain(lambda v: bool(v.strip()), "a non-empty name", ("",))
POSITIVE = at_least(1)
COUNT = at_least(0)

# torchtitan's names for selective activation checkpointing: "op", or every N-th layer.
SELECTIVE_AC = Domain(lambda v: v == "op" or (v.isdigit() and int(v) >= 1), "'op' or a whole number >= 1 (every N-th layer)", ("0", "some"))

# What a checkpoint holds, by the names --checkpoint.exclude_from_loading takes.
CHECKPOINT_STATES = (MODEL, OPTIMIZER, LR_SCHEDULER, DATALOADER, TRAIN_STATE, RngState.KEY, ScheduleState.KEY)


def _dataloader(section: str) -> dict[str, Domain]:
    return {f"{section}.dataloader.num_workers": COUNT, f"{section}.dataloader.prefetch_factor": optional(POSITIVE)}


DOMAINS: dict[str, Domain] = {
    "job.dump_folder": NON_EMPTY,
    "optimizer.name": one_of(*OPTIMIZER_NAMES),
    "optimizer.lr": not_below(0),
    "optimizer.beta1": fraction(upper_open=True),
    "optimizer.beta2": fraction(upper_open=True),
    "optimizer.eps": not_below(0),
    "optimizer.weight_decay": not_below(0),
    "optimizer.muon.adamw_lr_ratio": above(0),
    "optimizer.muon.momentum": fraction(upper_open=True),
    "optimizer.muon.ns_steps": at_least(1),
    "optimizer.muon.weight_decay": optional(not_below(0)),
    "lr_scheduler.warmup_steps": COUNT,
    "lr_scheduler.total_steps": optional(POSITIVE),
    "lr_scheduler.decay_ratio": optional(fraction()),
    "lr_scheduler.min_lr_factor": fraction(),
    "training.local_batch_size": POSITIVE,
    "training.global_batch_size": at_least_or(1, -1, "local_batch_size x data-parallel ranks"),
    "training.seq_len": POSITIVE,
    "training.max_norm": above(0),
    "training.steps": POSITIVE,
    "training.gc_freq": POSITIVE,
    **_dataloader("training"),
    "validation.local_batch_size": POSITIVE,
    "validation.seq_len": POSITIVE,
    "validation.freq": POSITIVE,
    "validation.steps": at_least_or(1, -1, "the whole validation set"),
    **_dataloader("validation"),
    "checkpoint.folder": NON_EMPTY,
    "checkpoint.interval": POSITIVE,
    # torchtitan keeps at least 2 (the newest may still be being written); 0 keeps all.
    "checkpoint.keep_latest_k": Domain(lambda v: isinstance(v, int) and (v == 0 or v >= 2), "0 (keep all) or an integer >= 2", (1, -1)),
    "checkpoint.load_step": at_least_or(0, -1, "the latest"),
    "checkpoint.exclude_from_loading": each_one_of(*CHECKPOINT_STATES),
    "metrics.log_freq": POSITIVE,
    "metrics.save_tb_folder": NON_EMPTY,
    "parallelism.data_parallel_replicate_degree": POSITIVE,
    "parallelism.data_parallel_shard_degree": at_least_or(1, -1, "whatever the world size leaves"),
    "parallelism.tensor_parallel_degree": POSITIVE,
    "parallelism.pipeline_parallel_degree": POSITIVE,
    "parallelism.pipeline_parallel_microbatch_size": POSITIVE,
    "parallelism.context_parallel_degree": POSITIVE,
    "parallelism.expert_parallel_degree": POSITIVE,
    "parallelism.expert_tensor_parallel_degree": POSITIVE,
    "parallelism.context_parallel_load_balancer": optional(one_of("headtail", "ptrr")),
    "activation_checkpoint.selective_ac_option": SELECTIVE_AC,
    "activation_checkpoint.memory_budget": fraction(),
    "compile.components": each_one_of("model", "loss"),
    "compile.backend": NON_EMPTY,
    "comm.init_timeout_seconds": POSITIVE,
    "comm.train_timeout_seconds": POSITIVE,
    "debug.seed": optional(COUNT),
    "routing.aux_loss_coeff": not_below(0),
    "routing.z_loss_coeff": not_below(0),
    "routing.expert_bias_rate": not_below(0),
    "nan_guard.max_skipped_steps": COUNT,
    "data.seed": COUNT,
}
