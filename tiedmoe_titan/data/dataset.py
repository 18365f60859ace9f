"""The packed, rank-sharded, resumable mixture of text sources, and its schedule.

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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from .readers import iter_documents
from .sources import DataSource, parse_dataset_sources

PROGRESS_EVERY_DOCS = 100_000  # a log line this often within one big file


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
