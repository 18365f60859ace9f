"""torchtitan loader and validator builders over token shards (TrainSpec entry points)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from ..compat import build_validator_with_loader
from .corpus import open_sources
from .dataset import DataPosition, ShardDataset

if TYPE_CHECKING:  # importing validate pulls in pipelining; only needed for typing
    from torchtitan.components.validate import BaseValidator

POSITION_KEY = "position"


class ShardDataloader(ParallelAwareDataloader):
    """torchtitan's loader with one global data position instead of one per rank.

    torchtitan 0.2.2 checkpoints each data-parallel rank's loader state
    (``dataloader.dp_rank_N``) and refuses another number of ranks.  Here the state
    is the global position (``dataset.py``): how many draws each source has served.
    It counts what was handed to the trainer, not what workers prefetched, so it is
    exact with any ``num_workers``; it is the same on every rank (checkpointed once),
    and a run resumed on another data-parallel size at the same global batch size
    continues at exactly the next global sample.

    ``track_position=False`` (validation): every pass starts at the first sample.
    """

    def __init__(self, dataset: ShardDataset, dp_rank: int, dp_world_size: int, track_position: bool = True, **kwargs) -> None:
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)
        self.track_position = track_position
        self.position = DataPosition([0] * len(dataset.sources))

    def __iter__(self) -> Iterator[Any]:
        self.dataset.position = self.position.copy() if self.track_position else DataPosition([0] * len(self.dataset.sources))
        for batch in super().__iter__():
            if self.track_position:
                self.dataset.advance(self.position)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {POSITION_KEY: json.dumps(self.dataset.position_state(self.position), sort_keys=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = self.dataset.load_position(json.loads(state_dict[POSITION_KEY]))


def _build_loader(
    section: Any,
    config_key: str,
    tokenizer: BaseTokenizer,
    dp_rank: int,
    dp_world_size: int,
    infinite: bool,
    shuffle: bool,
    seed: int,
    track_position: bool,
) -> ShardDataloader:
    """A loader over ``section.dataset_path`` (``section`` is the recipe's [training]
    or [validation]), wrapped like torchtitan does: its dataloader kwargs + batch size."""
    dataset = ShardDataset(
        open_sources(section.dataset_path, tokenizer, config_key),
        seq_len=section.seq_len,
        local_batch_size=section.local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        shuffle=shuffle,
        seed=seed,
        infinite=infinite,
        config_key=config_key,
    )
    # The loader draws a seed each time it starts iterating (for workers); its own
    # generator keeps that draw off the training RNG, which a resumed run restores.
    kwargs = {**asdict(section.dataloader), "batch_size": section.local_batch_size, "generator": torch.Generator()}
    return ShardDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, track_position=track_position, **kwargs)


def build_local_text_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ShardDataloader:
    """Training loader over ``job_config.training.dataset_path``, in ``[data]``'s order.

    Same signature as torchtitan's ``build_text_dataloader``;
    ``training.dataset`` (a HuggingFace dataset name) is ignored.
    """
    data = job_config.data
    return _build_loader(
        job_config.training, "training.dataset_path", tokenizer, dp_rank, dp_world_size, infinite,
        shuffle=data.shuffle, seed=data.seed, track_position=True,
    )


def build_local_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = False,
) -> ShardDataloader:
    """Validation loader over ``job_config.validation.dataset_path``, in file order.

    Same signature as torchtitan's ``build_text_validation_dataloader``.  Unlike
    torchtitan's, every evaluation restarts at the first sample, so losses at
    different steps are measured on the same batches.
    """
    return _build_loader(
        job_config.validation, "validation.dataset_path", tokenizer, dp_rank, dp_world_size, infinite,
        shuffle=False, seed=0, track_position=False,
    )


def build_local_validator(
    job_config: JobConfig,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    parallel_dims: Any,
    loss_fn: Any,
    validation_context: Any,
    maybe_enable_amp: Any,
    metrics_processor: Any = None,
    pp_schedule: Any = None,
    pp_has_first_stage: bool | None = None,
    pp_has_last_stage: bool | None = None,
) -> "BaseValidator":
    """torchtitan's ``Validator`` reading ``validation.dataset_path`` locally.

    Same signature as ``torchtitan.components.validate.build_validator``, whose
    ``Validator`` builds its loader with ``build_local_validation_dataloader`` here
    (``compat.build_validator_with_loader``) instead of copying the class.
    """
    return build_validator_with_loader(
        build_local_validation_dataloader,
        job_config=job_config,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        tokenizer=tokenizer,
        parallel_dims=parallel_dims,
        loss_fn=loss_fn,
        validation_context=validation_context,
        maybe_enable_amp=maybe_enable_amp,
        metrics_processor=metrics_processor,
        pp_schedule=pp_schedule,
        pp_has_first_stage=pp_has_first_stage,
        pp_has_last_stage=pp_has_last_stage,
    )
