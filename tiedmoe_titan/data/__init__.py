"""Local data for torchtitan: token shards on disk, read in one global order.

One file per job:

* ``sources.py``      - ``dataset_path`` -> weighted sources of text files and shard folders;
* ``readers.py``      - the documents of one ``.txt`` / ``.jsonl`` / ``.parquet`` file;
* ``shard_format.py`` - the token-shard folder (arrays + metadata.json), written safely;
* ``tokenize.py``     - text -> token shards with worker processes, resumable, splittable;
* ``text_cache.py``   - text inputs of a run, tokenized once into a cache of shards;
* ``sidecar.py``      - metadata.json for OLMo-core / Dolma token files made elsewhere;
* ``shards.py``       - shard folders -> one token stream (positional reads), checked;
* ``permutation.py``  - a seeded permutation computed per index, never stored;
* ``dataset.py``      - the global sample order: mixture, shuffle, data-parallel split;
* ``corpus.py``       - ``dataset_path`` -> opened sources, and the checks before a run;
* ``loaders.py``      - torchtitan's loader and validator over them (TrainSpec entry points);
* ``train_tokenizer.py`` - a SentencePiece model trained on local text (``tiedmoe-data train-tokenizer``);
* ``cli.py``          - ``tiedmoe-data``.

The names below are the package's public surface; import them from here.
"""

from ..assets import DEFAULT_CORPUS_DIR, DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH
from .corpus import DataConfig, check_data, open_sources
from .dataset import DataPosition, MixtureSchedule, ShardDataset, ShardSource
from .loaders import (
    ShardDataloader,
    build_local_text_dataloader,
    build_local_validation_dataloader,
    build_local_validator,
)
from .readers import PARQUET_BATCH_ROWS, iter_documents
from .shards import TokenShards
from .sources import SUPPORTED_SUFFIXES, DataSource, parse_dataset_sources, resolve_dataset_files

__all__ = [
    "DEFAULT_CORPUS_DIR", "DEFAULT_TRAIN_PATH", "DEFAULT_VALID_PATH", "PARQUET_BATCH_ROWS",
    "SUPPORTED_SUFFIXES", "DataConfig", "DataPosition", "DataSource", "MixtureSchedule",
    "ShardDataloader", "ShardDataset", "ShardSource", "TokenShards", "build_local_text_dataloader",
    "build_local_validation_dataloader", "build_local_validator", "check_data", "iter_documents",
    "open_sources", "parse_dataset_sources", "resolve_dataset_files",
]
