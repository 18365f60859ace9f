"""torchtitan loader and validator builders over local data (TrainSpec entry points)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from .dataset import LocalTextDataset

if TYPE_CHECKING:  # importing validate pulls in pipelining; only needed for typing
    from torchtitan.components.validate import BaseValidator


class LocalTextDataloader(ParallelAwareDataloader):
    """torchtitan's loader, which can also resume after a data-parallel size change.

    torchtitan 0.2.2 keeps one data position per data-parallel rank and refuses
    another number of ranks. Here every rank draws the same number of samples of each
    source per step, so any rank's position gives the global sample count of each
    source (``position x old ranks``); a resharded resume spreads it over the new
    ranks. Each rank's documents change with the rank count, so this is approximate:
    the data resumes at the same fraction of each source, and a few documents at the
    boundary may be seen twice or not at all. The trainer calls
    :meth:`resume_from_ranks` before the checkpoint is loaded.
    """

    def __init__(self, dataset: LocalTextDataset, dp_rank: int, dp_world_size: int, **kwargs) -> None:
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)
        self._saved_ranks = dp_world_size

    def resume_from_ranks(self, saved_ranks: int) -> None:
        """The checkpoint about to be loaded holds the positions of ``saved_ranks`` ranks."""
        if saved_ranks != self.dp_world_size and self.num_workers > 0:
            raise ValueError(
                f"the checkpoint holds the data positions of {saved_ranks} data-parallel ranks, this run has "
                f"{self.dp_world_size}: a resharded data position needs training.dataloader.num_workers = 0 "
                "(or pass --checkpoint.exclude_from_loading dataloader to restart the data stream)"
            )
        self._saved_ranks = saved_ranks

    def state_dict(self) -> dict[str, Any]:
        if self._saved_ranks == self.dp_world_size:
            return super().state_dict()
        # What to load from a checkpoint of another rank count: rank 0's position.
        return {"dp_rank_0": b"", "world_size": self._saved_ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._saved_ranks == self.dp_world_size:
            super().load_state_dict(state_dict)
            return
        loader_state = pickle.loads(state_dict["dp_rank_0"])
        loader_state["dataset_state"] = self.dataset.rescale_state(
            loader_state["dataset_state"], self._saved_ranks, self.dp_world_size
        )
        StatefulDataLoader.load_state_dict(self, loader_state)
        self._saved_ranks = self.dp_world_size


def _build_loader(
    section: Any,
    config_key: str,
    tokenizer: BaseTokenizer,
    dp_rank: int,
    dp_world_size: int,
    infinite: bool,
    restart_each_pass: bool = False,
) -> LocalTextDataloader:
    """A loader over ``section.dataset_path`` (``section`` is the recipe's [training]
    or [validation]), wrapped like torchtitan does: its dataloader kwargs + batch size."""
    dataset = LocalTextDataset(
        section.dataset_path,
        tokenizer,
        seq_len=section.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        restart_each_pass=restart_each_pass,
        config_key=config_key,
    )
    # The loader draws a seed each time it starts iterating (for workers); its own
    # generator keeps that draw off the training RNG, which a resumed run restores.
    kwargs = {**asdict(section.dataloader), "batch_size": section.local_batch_size, "generator": torch.Generator()}
    return LocalTextDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)


def build_local_text_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> LocalTextDataloader:
    """Training loader over ``job_config.training.dataset_path``.

    Same signature as torchtitan's ``build_text_dataloader``;
    ``training.dataset`` (a HuggingFace dataset name) is ignored.
    """
    return _build_loader(job_config.training, "training.dataset_path", tokenizer, dp_rank, dp_world_size, infinite)


def build_local_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = False,
) -> LocalTextDataloader:
    """Validation loader over ``job_config.validation.dataset_path``.

    Same signature as torchtitan's ``build_text_validation_dataloader``.  Unlike
    torchtitan's, every evaluation restarts at the first sample, so losses at
    different steps are measured on the same batches.
    """
    return _build_loader(
        job_config.validation, "validation.dataset_path", tokenizer, dp_rank, dp_world_size, infinite, restart_each_pass=True
    )


@contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.name``; fail loudly if it does not exist."""
    if not hasattr(module, name):
        raise RuntimeError(
            f"{module.__name__}.{name} not found: this torchtitan version builds its "
            "validation dataloader differently; update tiedmoe_titan.data.loaders.build_local_validator"
        )
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


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

    Same signature as ``torchtitan.components.validate.build_validator``.
    ``Validator.__init__`` builds its loader by calling the module-level name
    ``build_text_validation_dataloader`` (HuggingFace datasets only).  Rather
    than copy the class, we point that one name at our builder for the duration
    of the constructor; the Trainer builds its validator once, from one thread.
    """
    from torchtitan.components import validate as tt_validate

    with _swapped(
        tt_validate, "build_text_validation_dataloader", build_local_validation_dataloader
    ):
        return tt_validate.build_validator(
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
