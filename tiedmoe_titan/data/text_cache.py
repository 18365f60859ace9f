"""Text inputs through the one data path: tokenized once into a cache of token shards.

A ``dataset_path`` may name text files (the bundled corpus, small corpora).  They are
tokenized with the run's tokenizer by the same code as ``tiedmoe-data tokenize``
(so the shards are the ones that command would write), into a folder of the cache,
and read from there like any shard folder.  A restart finds the folder and
tokenizes nothing.

Where: ``$TIEDMOE_DATA_CACHE`` if set, else ``$XDG_CACHE_HOME/tiedmoe_titan/text-shards``
(``~/.cache/...``).  The bundled corpus sits in site-packages, which may be
read-only, hence a cache of our own rather than a folder next to the text.

Invalidation: the folder's name is a hash of the tokenizer's identity (a hash of
its files) and, for each text file, its absolute path, size and modification time.
Editing a file or changing the tokenizer gives a new folder; old folders are never
read again and may be deleted at any time.

Several processes (the ranks of a node) may ask at once: the first takes a lock
file and tokenizes, the others wait for it and then read the result.  Every file
of the folder is written under a temporary name and renamed, so a killed build
leaves nothing that looks complete, and the next run resumes it.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
from collections.abc import Callable, Sequence

from ..tokenizer import tokenizer_identity
from .shard_format import FORMAT, METADATA, VERSION
from .tokenize import tokenize

CACHE_ENV = "TIEDMOE_DATA_CACHE"


def cache_root() -> str:
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tiedmoe_titan", "text-shards")


def cache_folder(files: Sequence[str], tokenizer) -> str:
    """The cache folder for these text files and this tokenizer (module docstring)."""
    key = {
        "format": [FORMAT, VERSION],
        "tokenizer": tokenizer_identity(tokenizer)["sha256"],
        "files": [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_root(), digest)


def cached_shards(files: Sequence[str], tokenizer, log: Callable[[str], None]) -> str:
    """A shard folder with the tokens of ``files``, tokenized now if not cached yet."""
    folder = cache_folder(files, tokenizer)
    if os.path.isfile(os.path.join(folder, METADATA)):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if not os.path.isfile(os.path.join(folder, METADATA)):
            log(f"tokenizing {len(files)} text file(s) once into the data cache {folder} ({CACHE_ENV} moves it)")
            workers = min(len(files), len(os.sched_getaffinity(0)))
            tokenize([glob.escape(f) for f in files], tokenizer.model_path, folder, workers=workers, log=log)
    return folder
