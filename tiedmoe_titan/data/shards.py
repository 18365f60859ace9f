"""Reading token-shard folders (``shard_format.py``) as one token stream.

Opening a folder reads its ``metadata.json`` and stats its files; no token is read.
Every check that can fail is made here, before a run starts, as one line naming the
path and the fix: a folder without metadata, a metadata file that is not ours or
not valid JSON, a shard that is missing, unreadable, or whose size does not match
the metadata (truncated, or written with another dtype), a folder without tokens,
and a tokenizer other than the run's (compared by identity, not size: vocabularies
are padded).

Tokens are read with positional reads (``os.pread``) into the sample's own buffer,
not through ``np.memmap``: a mapped shard counts every page the kernel maps around
a read (64 KiB per 8 KiB sample) as the process's resident memory, which then grows
with every sample to gigabytes, and its read-ahead pulls megabytes per random sample
(``docs/benchmarks.md``, "Data at scale").  With ``random_access`` (shuffled reading)
the files are also advised as random, which turns read-ahead off.  Start-up and
memory stay flat at any corpus size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from .shard_format import DTYPES, FORMAT, METADATA


def is_shard_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


class TokenShards:
    """The tokens of one or more shard folders, in order, as one stream.

    Args:
        folders: shard folders (each with its ``metadata.json``).
        where: the config key or option named in error messages.
    """

    def __init__(self, folders: Sequence[str], where: str) -> None:
        if not folders:
            raise ValueError(f"{where}: no token-shard folder given")
        self.where = where
        self.folders = list(folders)
        self.files: list[tuple[str, np.dtype, int, int]] = []  # (path, dtype, byte offset, tokens)
        self.tokenizer: dict | None = None
        for folder in self.folders:
            meta = _read_metadata(folder, where)
            if self.tokenizer is None:
                self.tokenizer = meta["tokenizer"]
            elif meta["tokenizer"].get("sha256") != self.tokenizer.get("sha256"):
                raise ValueError(
                    f"{where}: {folder} was made with another tokenizer than {self.folders[0]}; "
                    "one source reads one tokenizer's shards: tokenize them again with the same tokenizer"
                )
            dtype = DTYPES[meta["dtype"]]
            for shard in meta["shards"]:
                path = os.path.join(folder, shard["file"])
                offset, tokens = int(shard.get("offset", 0)), int(shard["tokens"])
                _check_shard(path, dtype, offset, tokens, where)
                if tokens:
                    self.files.append((path, dtype, offset, tokens))
        if not self.files:
            raise ValueError(f"{where}: {', '.join(self.folders)} holds no tokens; tokenize a non-empty corpus")
        self.starts = np.cumsum([0] + [f[3] for f in self.files], dtype=np.int64)
        self.num_tokens = int(self.starts[-1])
        self.random_access = False  # set before the first read: advise the files as random
        self._fds: list[int | None] = [None] * len(self.files)

    def check_tokenizer(self, identity: dict, key: str = "model.hf_assets_path") -> None:
        """Refuse shards made with another tokenizer than ``identity`` (``tokenizer_identity``)."""
        made = self.tokenizer or {}
        if made.get("sha256") != identity["sha256"]:
            raise ValueError(
                f"{self.where}: {self.folders[0]} was tokenized with a {made.get('kind', '?')} tokenizer of "
                f"{made.get('vocab_size', '?')} ids (sha256 {str(made.get('sha256'))[:12]}), {key} is a "
                f"{identity['kind']} tokenizer of {identity['vocab_size']} ids (sha256 {identity['sha256'][:12]}): "
                f"point {key} at the tokenizer the shards were made with, or tokenize them again"
            )

    def _fd(self, i: int) -> int:
        fd = self._fds[i]
        if fd is None:
            fd = self._fds[i] = os.open(self.files[i][0], os.O_RDONLY)
            if self.random_access:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``start`` to ``start + length`` of the stream (int64), across shard ends."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens {start}..{start + length} outside a stream of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            path, dtype, offset, tokens = self.files[i]
            first = start + done - int(self.starts[i])
            take = min(length - done, tokens - first)
            data = os.pread(self._fd(i), take * dtype.itemsize, offset + first * dtype.itemsize)
            if len(data) != take * dtype.itemsize:
                raise OSError(f"{path}: read {len(data)} of {take * dtype.itemsize} bytes; the shard shrank while training")
            out[done : done + take] = np.frombuffer(data, dtype=dtype)
            done += take
            i += 1
        return out

    def close(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # half-built, or at interpreter exit
            pass

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy: they open their own files.
        return {**self.__dict__, "_fds": [None] * len(self.files)}


def _read_metadata(folder: str, where: str) -> dict:
    path = os.path.join(folder, METADATA)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"{where}: {folder} has no {METADATA}: make the folder with `tiedmoe-data tokenize`, or describe "
            "existing token files with `tiedmoe-data describe`"
        ) from None
    except OSError as e:
        raise ValueError(f"{where}: {path} cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: {path} is not valid JSON ({e}); write it again with `tiedmoe-data finalize`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {path} is not a tiedmoe token-shard metadata file (no \"format\": \"{FORMAT}\")")
    if meta.get("dtype") not in DTYPES or meta.get("byteorder", "little") != "little":
        raise ValueError(f"{where}: {path} has dtype {meta.get('dtype')!r}; shards are little-endian uint16 or uint32")
    if not isinstance(meta.get("shards"), list) or not isinstance(meta.get("tokenizer"), dict):
        raise ValueError(f"{where}: {path} lists no shards or no tokenizer; write it again with `tiedmoe-data finalize`")
    return meta


def _check_shard(path: str, dtype: np.dtype, offset: int, tokens: int, where: str) -> None:
    """The file is there, readable, and exactly as long as the metadata says."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ValueError(f"{where}: shard {path} is missing; restore it, or tokenize the corpus again") from None
    except OSError as e:
        raise ValueError(f"{where}: shard {path} cannot be read ({e.strerror or e}); fix its permissions") from None
    expected = offset + tokens * dtype.itemsize
    if size != expected:
        raise ValueError(
            f"{where}: shard {path} has {size} bytes, its metadata records {tokens} {dtype.name} tokens "
            f"({expected} bytes): it is truncated or has another dtype; tokenize it again"
        )
