"""Local-files text data for torchtitan.

One file per job:

* ``sources.py``  - ``dataset_path`` -> weighted sources of files (the syntax);
* ``readers.py``  - the documents of one ``.txt`` / ``.jsonl`` / ``.parquet`` file;
* ``dataset.py``  - the packed, rank-sharded, resumable mixture and its schedule;
* ``loaders.py``  - torchtitan's loader and validator over it (TrainSpec entry points);
* ``shard_format.py`` - the token-shard folder (arrays + metadata.json), written safely;
* ``tokenize.py`` - text -> token shards with worker processes, resumable, splittable;
* ``sidecar.py``  - metadata.json for OLMo-core / Dolma token files made elsewhere;
* ``cli.py``      - ``tiedmoe-data``.

The last three use the tokenizers, which read files through this package, so they
are not imported here (``docs/data.md``).

The names below are the package's public surface; import them from here.
"""

from ..assets import DEFAULT_CORPUS_DIR, DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH
from .dataset import PROGRESS_EVERY_DOCS, LocalTextDataset, pick_source
from .loaders import (
    LocalTextDataloader,
    build_local_text_dataloader,
    build_local_validation_dataloader,
    build_local_validator,
)
from .readers import PARQUET_BATCH_ROWS, iter_documents
from .sources import SUPPORTED_SUFFIXES, DataSource, parse_dataset_sources, resolve_dataset_files

__all__ = [
    "DEFAULT_CORPUS_DIR", "DEFAULT_TRAIN_PATH", "DEFAULT_VALID_PATH", "PARQUET_BATCH_ROWS",
    "PROGRESS_EVERY_DOCS", "SUPPORTED_SUFFIXES", "DataSource", "LocalTextDataloader",
    "LocalTextDataset", "build_local_text_dataloader", "build_local_validation_dataloader",
    "build_local_validator", "iter_documents", "parse_dataset_sources", "pick_source",
    "resolve_dataset_files",
]
