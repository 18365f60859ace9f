"""The token-shard format: what a shard folder holds and how it is written safely.

A folder of shards is what OLMo-core and Dolma call token files: raw arrays of
little-endian ``uint16`` token ids (``uint32`` when the vocabulary has more than
65,536 ids), no header, documents one after another, each ending with the
tokenizer's eos (and starting with its bos only if it has one; ``tokenizer.py``).
Next to them, one small ``metadata.json``::

    {"format": "tiedmoe-token-shards", "version": 1, "dtype": "uint16", "byteorder": "little",
     "tokenizer": {"kind", "vocab_size", "sha256", "eos_id", "bos_id"},
     "eos_id": 50279, "bos_policy": "...", "tokens": N, "documents": N,
     "shards": [{"file": "000000-0000.bin", "tokens": N, "documents": N, "source": PATH}, ...],
     "sources": [{"path": PATH, "bytes": N}, ...]}

Files written here appear complete or not at all: each is written under a
temporary name, flushed to disk, then renamed into place (a rename within a
folder is atomic), so a crash never leaves a shard that looks finished.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT = "tiedmoe-token-shards"
VERSION = 1
METADATA = "metadata.json"
SHARD_SUFFIX = ".bin"
TMP_PREFIX = ".tmp-"  # never a shard's name: a leftover from a crash, removed on resume
UINT16_VOCAB = 65_536
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "uint32"


def bos_policy(bos_id: int | None, eos_id: int) -> str:
    """The document-boundary rule in words, as the metadata records it."""
    if bos_id is None:
        return f"each document is its tokens then eos {eos_id}; no bos (the tokenizer has none distinct from eos)"
    return f"each document is bos {bos_id}, its tokens, then eos {eos_id}"


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (the directory entry itself is data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp_path: str, path: str) -> None:
    """Rename a fully written, fsynced temporary file into place, durably."""
    os.replace(tmp_path, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, value: Any) -> None:
    """A JSON file that is either the old one or the whole new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def metadata(tokenizer: dict, dtype: str, shards: list[dict], sources: list[dict], **extra: Any) -> dict:
    """The folder's ``metadata.json`` (module docstring), totals included."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "byteorder": "little",
        "tokenizer": tokenizer,
        "eos_id": tokenizer["eos_id"],
        "bos_policy": bos_policy(tokenizer["bos_id"], tokenizer["eos_id"]),
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        "shards": shards,
        "sources": sources,
        **extra,
    }
