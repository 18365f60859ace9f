"""``tiedmoe-data describe``: the ``metadata.json`` for token files made elsewhere.

OLMo-core and Dolma token files (``.npy`` named, usually headerless) hold the
same arrays as our shards, so a user who has them only needs the sidecar:
dtype, tokenizer and eos, and the tokens and documents of each file.  Documents
are counted as eos tokens, which is how those files separate them.  A real
``.npy`` (with a header) is accepted too; its header offset is recorded.  Each
file is scanned once, which also catches a wrong ``--dtype`` or tokenizer: ids
at or above the vocabulary size.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence

import numpy as np

from ..tokenizer import load_tokenizer, tokenizer_identity
from .shard_format import DTYPES, METADATA, metadata, write_json_atomic

NPY_MAGIC = b"\x93NUMPY"
SCAN_TOKENS = 1 << 24  # tokens per chunk of the scan: bounded memory on any file size


def _open_tokens(path: str, dtype: str) -> tuple[np.ndarray, int]:
    """The file's tokens, memory-mapped, and the byte offset where they start."""
    with open(path, "rb") as f:
        is_npy = f.read(len(NPY_MAGIC)) == NPY_MAGIC
    if is_npy:
        array = np.load(path, mmap_mode="r")
        if array.dtype.newbyteorder("<") != DTYPES[dtype] or array.ndim != 1:
            raise ValueError(f"{path}: a {array.ndim}-d .npy of {array.dtype}, not 1-d {dtype}; pass the --dtype it has")
        return array, int(array.offset)
    size, itemsize = os.path.getsize(path), DTYPES[dtype].itemsize
    if size % itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} tokens: truncated, or pass the right --dtype")
    return np.memmap(path, dtype=DTYPES[dtype], mode="r"), 0


def describe(
    patterns: Sequence[str], tokenizer_path: str, dtype: str, log: Callable[[str], None] = print
) -> dict:
    """Write ``metadata.json`` next to existing token files (all in one folder)."""
    files = sorted({p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p)})
    if not files:
        raise ValueError(f"--input {list(patterns)} matched no files; give the token files' glob")
    folders = {os.path.dirname(os.path.abspath(p)) for p in files}
    if len(folders) != 1:
        raise ValueError(f"--input matched files in {len(folders)} folders; describe one folder at a time")
    folder = folders.pop()
    if os.path.exists(os.path.join(folder, METADATA)):
        raise ValueError(f"{folder} already has {METADATA}; delete it to describe the folder again")
    tokenizer = load_tokenizer(tokenizer_path, "--tokenizer")
    identity = tokenizer_identity(tokenizer)
    shards = []
    for path in files:
        tokens, offset = _open_tokens(path, dtype)
        if len(tokens) == 0:
            raise ValueError(f"{path}: holds no tokens; leave it out of --input")
        docs, top = 0, 0
        for start in range(0, len(tokens), SCAN_TOKENS):
            chunk = np.asarray(tokens[start : start + SCAN_TOKENS])
            docs += int(np.count_nonzero(chunk == identity["eos_id"]))
            top = max(top, int(chunk.max()))
        if top >= identity["vocab_size"]:
            raise ValueError(
                f"{path}: holds token id {top}, the tokenizer has {identity['vocab_size']} ids; "
                "pass the --dtype and --tokenizer the files were made with"
            )
        shards.append({"file": os.path.basename(path), "tokens": len(tokens), "documents": docs, "offset": offset})
    meta = metadata(identity, dtype, shards, [{"path": os.path.join(folder, s["file"]), "bytes": os.path.getsize(os.path.join(folder, s["file"]))} for s in shards])
    write_json_atomic(os.path.join(folder, METADATA), meta)
    log(f"describe: {folder}/{METADATA}: {len(shards)} files, {meta['documents']:,} documents, {meta['tokens']:,} tokens")
    return meta
