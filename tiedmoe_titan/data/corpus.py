"""From a ``dataset_path`` to opened sources, and the data checks made before a run.

Text files of a source go through the cache (``text_cache.py``) and shard folders
are opened as they are, so training always reads token shards.  Everything that can
be wrong with the data is found here, before anything is written: files, shards,
tokenizer identity, and a corpus too small for one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torchtitan.tools.logging import logger

from ..tokenizer import tokenizer_identity
from .dataset import ShardDataset, ShardSource
from .shards import TokenShards
from .sources import parse_dataset_sources
from .text_cache import cached_shards


@dataclass
class DataConfig:
    """``[data]``: the order in which training reads its samples (validation is never shuffled)."""

    shuffle: bool = True
    """Read the training samples in a seeded random order, a new one every epoch
    (False: in the order of the files, e.g. for curriculum data)."""
    seed: int = 0
    """Chooses the order; independent of debug.seed, so a new model seed sees the same data."""


def open_sources(dataset_path: str | None, tokenizer, config_key: str, log: Callable[[str], None] = logger.info) -> list[ShardSource]:
    """The sources of ``dataset_path`` as token streams, checked against ``tokenizer``."""
    identity = tokenizer_identity(tokenizer)
    opened = []
    for source in parse_dataset_sources(dataset_path, config_key):
        where = config_key if source.name == "data" else f"{config_key} source '{source.name}'"
        texts, shard_folders = source.text_files, set(source.shard_folders)
        folders: list[str] = []
        for path in source.files:  # the text files' cache takes the place of the first one
            if path in shard_folders:
                folders.append(path)
            elif path == texts[0]:
                folders.append(cached_shards(texts, tokenizer, log))
        shards = TokenShards(folders, where)
        shards.check_tokenizer(identity)
        opened.append(ShardSource(source.name, source.weight, shards))
    return opened


def check_data(job_config, tokenizer, dp_world_size: int) -> None:
    """Open the training (and validation) data as the loaders will, and refuse data
    that cannot make one batch. Raises a one-line ValueError."""
    training = job_config.training
    global_batch = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * dp_world_size
    _check_batch(training, "training", global_batch, tokenizer)
    if job_config.validation.enable:
        _check_batch(job_config.validation, "validation", job_config.validation.local_batch_size * dp_world_size, tokenizer)


def _check_batch(section, name: str, batch: int, tokenizer) -> None:
    key = f"{name}.dataset_path"
    # Building the dataset refuses a source shorter than one sample.
    dataset = ShardDataset(open_sources(section.dataset_path, tokenizer, key), section.seq_len, section.local_batch_size, config_key=key)
    if sum(dataset.samples) < batch:
        raise ValueError(
            f"{key}: {sum(dataset.samples)} samples of {section.seq_len + 1} tokens, fewer than one {name} batch of "
            f"{batch} samples; add data, or lower {name}.local_batch_size"
            + (", training.global_batch_size" if name == "training" else "") + f" or {name}.seq_len"
        )
