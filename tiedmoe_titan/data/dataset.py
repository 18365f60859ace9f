"""Local-files text data for torchtitan.

``training.dataset_path`` (or ``validation.dataset_path``) lists file globs,
separated by commas.  Supported files:

* ``.txt``     - one document per blank-line-separated block;
* ``.jsonl``   - one document per line, in the line's ``"text"`` field;
* ``.parquet`` - one document per row of the ``text`` column.

Plain globs (``"corpus/*.jsonl,notes/*.txt"``) make one source.  For a weighted
mixture, start each source with ``NAME=WEIGHT:``; a glob without the prefix
belongs to the source before it::

    web=0.7:/data/web/*.jsonl,/data/web2/*.jsonl,code=0.3:/data/code/*.parquet

NAME is a word (letters, digits, ``_ . -``), WEIGHT a positive number; weights
are relative (``web=7:...,code=3:...`` is the same mixture).

Each data-parallel rank keeps every ``dp_world_size``-th document of each source
(in file order), tokenizes it as ``[bos] + tokens + [eos]`` and concatenates the
source's documents into one token stream.  A source's samples are consecutive
``seq_len + 1`` windows of its stream, yielded as ``({"input": x[:-1]}, x[1:])``
exactly like torchtitan's ``HuggingFaceTextDataset``.  In ``infinite`` mode each
source's stream is circular (what torchtitan's carried-over token buffer does on
re-loop), so a small source re-loops on its own while the others go on.

Sources take turns in a fixed interleaving (:func:`pick_source`): after any
``n`` samples a source of weight ``w`` has served ``round(w * n)`` samples, give
or take one.  The interleaving depends only on how many samples each source has
served, so the checkpoint state is each source's position, and a resumed run
sees exactly the batches of an uninterrupted one.  A finite pass (validation)
ends when the interleaving asks for a sample from a source that has none left.

The module also builds the bundled corpus (``python -m tiedmoe_titan.data
build-corpus``) from the docstrings of the Python standard library.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import pickle
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from .tokenizer import ASSETS_DIR

if TYPE_CHECKING:  # importing validate pulls in pipelining; only needed for typing
    from torchtitan.components.validate import BaseValidator

DEFAULT_CORPUS_DIR = os.path.join(ASSETS_DIR, "corpus")
DEFAULT_TRAIN_PATH = os.path.join(DEFAULT_CORPUS_DIR, "train.jsonl")
DEFAULT_VALID_PATH = os.path.join(DEFAULT_CORPUS_DIR, "valid.jsonl")

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SUFFIXES_TEXT = ".txt, .jsonl or .parquet"
PROGRESS_EVERY_DOCS = 100_000  # a log line this often within one big file
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: big files stream, never load whole

# ``NAME=WEIGHT:GLOB``.  Name and weight may not hold a path separator, so a
# plain glob such as ``/data/year=2024/*.parquet`` is never read as a prefix.
_WEIGHTED_ENTRY = re.compile(r"([^=:/\\]*)=([^:/\\]*):(.*)", re.DOTALL)
_SOURCE_NAME = re.compile(r"[A-Za-z_][\w.-]*")


# --------------------------------------------------------------------------- #
# Parsing dataset_path into weighted sources
# --------------------------------------------------------------------------- #


@dataclass
class DataSource:
    """One source of a ``dataset_path``; the dataset fills in the token fields."""

    name: str
    weight: Fraction  # normalised: the weights of all sources sum to 1
    files: list[str]
    doc_indices: list[int] = field(default_factory=list)  # this rank's documents
    tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))


def parse_dataset_sources(dataset_path: str | None, config_key: str) -> list[DataSource]:
    """Split a ``dataset_path`` into sources with weights and files (syntax: module docstring).

    Plain globs give one source called ``data`` of weight 1.  Every error is a
    single line that names ``config_key`` so the user knows which setting to fix.
    """
    if dataset_path is None or not str(dataset_path).strip():
        raise ValueError(
            f"{config_key} is not set: give comma-separated {_SUFFIXES_TEXT} file globs, "
            f"e.g. {_default_for(config_key)}, or weighted sources NAME=WEIGHT:GLOB,..."
        )
    groups: list[tuple[str | None, Fraction, list[str]]] = []  # (name, weight, globs)
    for entry in (e.strip() for e in str(dataset_path).split(",")):
        if not entry:
            continue
        match = _WEIGHTED_ENTRY.fullmatch(entry)
        if match is None:  # a bare glob continues the source before it
            if groups:
                groups[-1][2].append(entry)
            else:
                groups.append((None, Fraction(1), [entry]))
            continue
        name, weight, pattern = (g.strip() for g in match.groups())
        if groups and groups[0][0] is None:
            raise ValueError(
                f"{config_key}: '{groups[0][2][0]}' has no NAME=WEIGHT: prefix but '{entry}' "
                "has one; when weights are given, the first glob needs one too"
            )
        _check_name(name, entry, groups, config_key)
        if not pattern:
            raise ValueError(f"{config_key}: source '{name}' has no glob after '{name}={weight}:'")
        groups.append((name, _parse_weight(name, weight, config_key), [pattern]))
    if not groups:
        raise ValueError(f"{config_key}='{dataset_path}' contains no globs")
    total = sum(weight for _, weight, _ in groups)
    return [
        DataSource(name or "data", weight / total, _expand_globs(globs, config_key))
        for name, weight, globs in groups
    ]


def _check_name(name: str, entry: str, groups: list, config_key: str) -> None:
    if not _SOURCE_NAME.fullmatch(name):
        raise ValueError(
            f"{config_key}: '{entry}' needs a source name (letters, digits, _ . -) before '='"
        )
    if any(name == other for other, _, _ in groups):
        raise ValueError(f"{config_key}: source name '{name}' is used twice")


def _parse_weight(name: str, weight: str, config_key: str) -> Fraction:
    # Exact fractions: "0.7" is 7/10, so the interleaving has no rounding drift.
    try:
        value = Fraction(weight)
    except (ValueError, ZeroDivisionError):
        value = Fraction(0)
    if value <= 0:
        raise ValueError(
            f"{config_key}: source '{name}' has weight '{weight}'; write NAME=WEIGHT:GLOB with "
            "WEIGHT a positive number, e.g. web=0.7:/data/web/*.jsonl"
        )
    return value


def _expand_globs(patterns: list[str], config_key: str) -> list[str]:
    """Files of a source's globs: globs in the given order, matches of one glob
    sorted (so the order does not depend on the file system), each file once."""
    files: dict[str, None] = {}  # an ordered set
    for pattern in patterns:
        matches = sorted(
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
        if not matches:
            hint = " (a weighted source is written NAME=WEIGHT:GLOB)" if "=" in pattern else ""
            raise FileNotFoundError(f"{config_key}: glob '{pattern}' matched no files{hint}")
        for path in matches:
            if not path.endswith(SUPPORTED_SUFFIXES):
                raise ValueError(
                    f"{config_key}: '{path}' (from glob '{pattern}') is not a {_SUFFIXES_TEXT} file"
                )
            files[path] = None
    return list(files)


def resolve_dataset_files(dataset_path: str | None, config_key: str) -> list[str]:
    """All files of all sources of a ``dataset_path`` in order, each once.

    Checks the whole setting (weights included), so it is also the up-front
    validation of a run's config.
    """
    sources = parse_dataset_sources(dataset_path, config_key)
    return list(dict.fromkeys(path for source in sources for path in source.files))


def _default_for(config_key: str) -> str:
    """The bundled corpus file matching a config key, for error messages."""
    return DEFAULT_VALID_PATH if config_key.startswith("validation") else DEFAULT_TRAIN_PATH


# --------------------------------------------------------------------------- #
# Reading documents
# --------------------------------------------------------------------------- #


def iter_documents(path: str) -> Iterator[str]:
    """Yield the non-empty documents of one supported file in order."""
    if path.endswith(".jsonl"):
        yield from _iter_jsonl_documents(path)
    elif path.endswith(".txt"):
        yield from _iter_txt_documents(path)
    elif path.endswith(".parquet"):
        yield from _iter_parquet_documents(path)
    else:
        raise ValueError(f"'{path}' is not a {_SUFFIXES_TEXT} file")


def _iter_txt_documents(path: str) -> Iterator[str]:
    """Blank-line-separated blocks; lines are streamed so big files stay cheap."""
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _iter_jsonl_documents(path: str) -> Iterator[str]:
    """The ``"text"`` field of each line; blank lines and empty texts are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})"
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: 'text' is not a string")
            if text.strip():
                yield text


def _iter_parquet_documents(path: str) -> Iterator[str]:
    """The ``text`` column, row by row; null and empty texts are skipped.

    Only that column is read, a batch of rows at a time within each row group,
    so a file much bigger than memory streams through.
    """
    import pyarrow.parquet as pq  # comes with `datasets`; only parquet users need it

    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise ValueError(f"{path}: no 'text' column (it has: {', '.join(columns)})")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{path}: the 'text' column holds {type(text).__name__}, not strings")
            if text.strip():
                yield text


# --------------------------------------------------------------------------- #
# The mixture schedule
# --------------------------------------------------------------------------- #


def pick_source(weights: Sequence[Fraction], counts: Sequence[int]) -> int:
    """Which source serves the next sample, given how many each has served.

    Tijdeman's "chairman assignment" rule: with ``S`` sources, a source may go
    only if it is behind its share by at least ``1 / (2S - 2)``, and of those
    the one whose next turn falls due first goes (ties: the earlier source).
    After every ``n`` samples each source has served within ``1 - 1/(2S-2)`` of
    ``n * w``, i.e. ``round(n * w)`` plus or minus one, for any weights; smooth
    weighted round robin only guarantees that for a few sources.  ``weights``
    must sum to 1; exact fractions make the choice identical on every machine.
    """
    if len(weights) == 1:
        return 0
    n = sum(counts) + 1
    slack = Fraction(1, 2 * len(weights) - 2)
    eligible = [s for s, w in enumerate(weights) if n * w - counts[s] >= slack]
    return min(eligible, key=lambda s: ((counts[s] + 1 - slack) / weights[s], s))


# --------------------------------------------------------------------------- #
# The dataset
# --------------------------------------------------------------------------- #


class LocalTextDataset(IterableDataset, Stateful):
    """Packed, rank-sharded, resumable, weighted mixture of local text files.

    Args:
        dataset_path: file globs, optionally weighted (see module docstring).
        tokenizer: any torchtitan ``BaseTokenizer`` whose ``encode`` accepts
            ``add_bos``/``add_eos``.
        seq_len: tokens per sample; each sample reads ``seq_len + 1`` tokens.
        dp_rank, dp_world_size: this rank keeps documents ``i`` (numbered within
            each source) with ``i % dp_world_size == dp_rank``.
        infinite: re-loop over the data forever instead of stopping.
        restart_each_pass: start from sample 0 on every ``iter()`` (validation
            wants the same batches at every evaluation).
        config_key: the config field named in error messages.
    """

    def __init__(
        self,
        dataset_path: str | None,
        tokenizer: BaseTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = False,
        restart_each_pass: bool = False,
        config_key: str = "training.dataset_path",
    ) -> None:
        if tokenizer is None:
            raise ValueError("LocalTextDataset needs a tokenizer: the TrainSpec must set build_tokenizer_fn")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_world_size {dp_world_size}")
        self.config_key = config_key
        self.sources = parse_dataset_sources(dataset_path, config_key)
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self.restart_each_pass = restart_each_pass
        for source in self.sources:
            self._load(source, tokenizer)
        # The iteration state.  positions[s] is the next sample of source s; the
        # schedule counts from origin (all zeros unless the weights changed on
        # resume).  None: not started yet (see _start).
        self._weights = [source.weight for source in self.sources]
        self._positions: list[int] | None = None
        self._origin = [0] * len(self.sources)
        self._logged_epoch = [0] * len(self.sources)

    @property
    def files(self) -> list[str]:
        """All files of all sources, each once."""
        return list(dict.fromkeys(path for source in self.sources for path in source.files))

    def samples_in(self, source: DataSource) -> int:
        """Whole samples in one pass over a source's stream on this rank."""
        return len(source.tokens) // (self.seq_len + 1)

    def _where(self, source: DataSource) -> str:
        """How messages name a source: the config key, plus the name in a mixture."""
        return self.config_key if len(self.sources) == 1 else f"{self.config_key} source '{source.name}'"

    def _load(self, source: DataSource, tokenizer: BaseTokenizer) -> None:
        """Read a source's files and tokenize this rank's documents into its stream.

        Every rank reads every file (to number documents identically) but only
        tokenizes its own share, which is the expensive part.  One log line per
        file shows progress on big inputs, one per source sums it up.
        """
        where, chunks, n_docs = self._where(source), [], 0
        for path in source.files:
            file_docs, kept, file_tokens = 0, 0, 0
            for text in iter_documents(path):
                if n_docs % self.dp_world_size == self.dp_rank:
                    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
                    chunks.append(torch.tensor(ids, dtype=torch.int32))
                    source.doc_indices.append(n_docs)
                    kept += 1
                    file_tokens += len(ids)
                n_docs += 1
                file_docs += 1
                if file_docs % PROGRESS_EVERY_DOCS == 0:
                    logger.info(f"{where}: {path}: {file_docs} documents read ...")
            logger.info(
                f"{where}: {path}: {file_docs} documents, dp rank "
                f"{self.dp_rank}/{self.dp_world_size} keeps {kept} ({file_tokens} tokens)"
            )
        if n_docs == 0:
            raise ValueError(f"{where}: files {source.files} contain no documents")
        if not chunks:
            raise ValueError(
                f"{where}: {n_docs} documents are too few for "
                f"dp_world_size {self.dp_world_size} (rank {self.dp_rank} gets none)"
            )
        source.tokens = torch.cat(chunks)
        logger.info(
            f"{self.config_key}: source '{source.name}' weight {float(source.weight):.4g}: "
            f"{len(source.files)} files, {n_docs} documents; dp rank {self.dp_rank} has "
            f"{len(source.doc_indices)} documents, {len(source.tokens)} tokens"
        )
        if self.samples_in(source) == 0:
            logger.warning(
                f"{where}: rank {self.dp_rank} has only {len(source.tokens)} tokens, "
                f"fewer than one sample of {self.seq_len + 1}"
                + ("; samples will wrap around" if self.infinite else "; it yields nothing")
            )

    def sample(self, source: DataSource, j: int) -> torch.Tensor:
        """The ``seq_len + 1`` tokens of a source's sample ``j`` (int64).

        Past the end of the stream it wraps to the start, exactly like the token
        buffer that torchtitan carries over when it re-loops a dataset.
        """
        width, n = self.seq_len + 1, len(source.tokens)
        start = (j * width) % n
        if start + width <= n:
            x = source.tokens[start : start + width]
        else:
            x = source.tokens[(torch.arange(width) + start) % n]
        return x.long()

    def _advance(self) -> int | None:
        """Schedule the next sample of the mixture and step past it.

        Returns its source index, or None (leaving the state alone) when the
        pass is finite and that source has no sample left.
        """
        assert self._positions is not None
        counts = [p - o for p, o in zip(self._positions, self._origin)]
        s = pick_source(self._weights, counts)
        if not self.infinite and self._positions[s] >= self.samples_in(self.sources[s]):
            return None
        self._positions[s] += 1
        return s

    def _start(self) -> None:
        """A fresh pass.  With DataLoader workers each holds a copy of this
        dataset and worker w takes samples w, w + num_workers, ... of the one
        schedule, so it first steps over the samples of the workers before it."""
        self._positions = [0] * len(self.sources)
        self._origin = [0] * len(self.sources)
        worker = get_worker_info()
        for _ in range(worker.id if worker is not None else 0):
            self._advance()

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        worker = get_worker_info()
        stride = worker.num_workers if worker is not None else 1
        if self.restart_each_pass or self._positions is None:
            self._start()
        while (s := self._advance()) is not None:
            j = self._positions[s] - 1
            # Step over the other workers' samples before yielding: a
            # state_dict() taken after this sample must resume at the next one.
            for _ in range(stride - 1):
                if self._advance() is None:
                    break
            self._log_reloop(s, j)
            x = self.sample(self.sources[s], j)
            yield {"input": x[:-1]}, x[1:]
        # Expected at the end of every validation pass; a warning for training.
        log = logger.info if self.restart_each_pass else logger.warning
        log(f"{self.config_key}: dp rank {self.dp_rank} has run out of data")

    def _log_reloop(self, s: int, j: int) -> None:
        """Log once per epoch of a source when an infinite iteration wraps it around."""
        source = self.sources[s]
        epoch = (j + 1) * (self.seq_len + 1) // max(len(source.tokens), 1)
        if epoch > self._logged_epoch[s]:
            self._logged_epoch[s] = epoch
            logger.info(f"{self._where(source)}: dp rank {self.dp_rank} re-looping (epoch {epoch})")

    def state_dict(self) -> dict[str, Any]:
        """Each source's position (and schedule origin), plus fingerprints of the data."""
        if self._positions is None:
            self._start()
        return {
            "seq_len": self.seq_len,
            "sources": {
                source.name: {
                    "position": position,
                    "origin": origin,
                    "weight": str(source.weight),
                    "num_tokens": len(source.tokens),
                }
                for source, position, origin in zip(self.sources, self._positions, self._origin)
            },
        }

    def rescale_state(self, state_dict: dict[str, Any], saved_ranks: int, ranks: int) -> dict[str, Any]:
        """A state saved by one of ``saved_ranks`` ranks, moved to this run's ``ranks``
        at the same global sample count of each source (rounded)."""
        sources = {
            name: {**value, "num_tokens": None,
                   "position": round(value["position"] * saved_ranks / ranks),
                   "origin": round(value.get("origin", 0) * saved_ranks / ranks)}
            for name, value in state_dict["sources"].items()
        }
        moved = ", ".join(f"'{name}' {state_dict['sources'][name]['position']} -> {v['position']}" for name, v in sources.items())
        logger.warning(
            f"{self.config_key}: data position saved by {saved_ranks} data-parallel ranks, resumed by {ranks} at the "
            f"same global sample count (samples per rank: {moved}); documents near the boundary may repeat or be skipped"
        )
        return {**state_dict, "sources": sources}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume each source at its saved position; warn if the data changed.

        If the sources or weights changed, each source still resumes where it
        stopped and the new interleaving starts from there (with DataLoader
        workers, only approximately).  A checkpoint from before mixtures (one
        ``sample_idx``) resumes the first source.
        """
        saved = state_dict.get("sources") or {
            self.sources[0].name: {"position": state_dict["sample_idx"], "weight": "1",
                                   "num_tokens": state_dict.get("num_tokens")}
        }
        positions = [int(saved.get(s.name, {}).get("position", 0)) for s in self.sources]
        before = {name: v["weight"] for name, v in saved.items()}
        now = {s.name: str(s.weight) for s in self.sources}
        if before == now:
            self._origin = [int(saved[s.name].get("origin", 0)) for s in self.sources]
        else:
            self._origin = list(positions)
            logger.warning(
                f"{self.config_key}: checkpointed source weights {before} differ from {now}; "
                "each source resumes at its position, the interleaving starts afresh"
            )
        self._positions = positions
        for source in self.sources:
            old = saved.get(source.name, {}).get("num_tokens")
            if old is not None and (old, state_dict.get("seq_len", self.seq_len)) != (
                len(source.tokens), self.seq_len
            ):
                logger.warning(
                    f"{self._where(source)}: checkpointed data had {old} tokens / seq_len "
                    f"{state_dict.get('seq_len')}, now {len(source.tokens)} / {self.seq_len}; "
                    "resuming by sample index, batches will differ"
                )


# --------------------------------------------------------------------------- #
# Dataloader / validator builders (TrainSpec entry points)
# --------------------------------------------------------------------------- #


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
            "validation dataloader differently; update tiedmoe_titan.data.build_local_validator"
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


# --------------------------------------------------------------------------- #
# Building the bundled corpus from Python standard library docstrings
# --------------------------------------------------------------------------- #

# Tests and vendored third-party code are not standard-library prose.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_modules(root: str) -> Iterator[str]:
    """Relative paths of the stdlib's .py files, in a sorted, stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, name), root)


def module_docstrings(source: str) -> str:
    """All docstrings of a module in source order, separated by blank lines."""
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append(doc)
        for child in ast.iter_child_nodes(node):  # field order == source order
            visit(child)

    visit(ast.parse(source))
    return "\n\n".join(parts)


def build_stdlib_corpus(
    output_dir: str,
    valid_every: int = 20,
    min_chars: int = 200,
    max_bytes: int = 2_000_000,
) -> dict[str, int]:
    """Write ``train.jsonl``/``valid.jsonl``: one document per stdlib module.

    A module goes to validation when ``crc32(path) % valid_every == 0``, so the
    split is stable when modules are added or removed.  Documents that would push
    the total past ``max_bytes`` are dropped (in sorted order) to bound the
    asset size.
    Returns document and byte counts.
    """
    root = sysconfig.get_paths()["stdlib"]
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    size = {"train": 0, "valid": 0}
    scanned = 0
    for rel in _stdlib_modules(root):
        scanned += 1
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = module_docstrings(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError) as e:
            print(f"  skip {rel}: {type(e).__name__}", file=sys.stderr)
            continue
        if len(text) < min_chars:
            continue
        line = json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n"
        split = "valid" if zlib.crc32(rel.encode()) % valid_every == 0 else "train"
        n = len(line.encode("utf-8"))
        if size["train"] + size["valid"] + n > max_bytes:
            continue
        splits[split].append(line)
        size[split] += n
    os.makedirs(output_dir, exist_ok=True)
    for split, lines in splits.items():
        path = os.path.join(output_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        print(f"wrote {path}: {len(lines)} documents, {size[split]} bytes")
    print(f"scanned {scanned} modules under {root} (Python {sys.version.split()[0]})")
    return {"train_docs": len(splits["train"]), "valid_docs": len(splits["valid"]),
            "train_bytes": size["train"], "valid_bytes": size["valid"]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tiedmoe_titan.data build-corpus [--output-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m tiedmoe_titan.data")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-corpus", help="extract stdlib docstrings to jsonl")
    build.add_argument("--output-dir", default=DEFAULT_CORPUS_DIR)
    build.add_argument("--valid-every", type=int, default=20)
    build.add_argument("--min-chars", type=int, default=200)
    build.add_argument("--max-bytes", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    build_stdlib_corpus(args.output_dir, args.valid_every, args.min_chars, args.max_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
