"""The global sample order over token streams: mixture, shuffle, data-parallel split.

Words used here:

* A **sample** is ``seq_len + 1`` consecutive tokens of a source's stream (its
  shard folders, ``shards.py``), yielded as ``({"input": x[:-1]}, x[1:])`` like
  torchtitan's text dataset.  Sample ``j`` starts at token ``j * (seq_len + 1)``; a
  stream of ``T`` tokens holds ``N = T // (seq_len + 1)`` samples (the last few tokens
  are not used).  Samples run across document boundaries: documents are packed.
* The run reads **global samples** ``g = 0, 1, 2, ...``.  The mixture schedule
  (:class:`MixtureSchedule`) says which source serves each; a source's ``k``-th draw
  is its sample ``perm_e(k mod N)`` in epoch ``e = k // N``: a seeded permutation
  (``permutation.py``) that is new every epoch, or ``k mod N`` unshuffled.
* **Micro-batch** ``m`` is global samples ``m*B .. (m+1)*B - 1`` with ``B`` =
  ``local_batch_size x data-parallel ranks``; rank ``r`` takes its ``r``-th slice of
  ``local_batch_size``.  Gradient accumulation takes consecutive micro-batches, so a
  step reads ``global_batch_size`` consecutive global samples however it is split.
* The **position** is how many draws each source has served (their sum: the global
  samples consumed).  It is the same on every rank and does not depend on the number
  of ranks or loader workers: it is the whole checkpointed data state, and a run
  resumed on another data-parallel size continues at the same global sample.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.tools.logging import logger

from .permutation import Permutation
from .shards import TokenShards

POSITION_VERSION = 2  # 1: torchtitan's per-rank loader states (dataloader.dp_rank_N)


class MixtureSchedule:
    """Which source serves the next global sample, given how many each has served.

    Tijdeman's "chairman assignment" rule: with ``S`` sources, a source may go only
    if it is behind its share by at least ``1 / (2S - 2)``, and of those the one whose
    next turn falls due first goes (ties: the earlier source).  After every ``n``
    samples each source has served within ``1 - 1/(2S-2)`` of ``n * w``, i.e.
    ``round(n * w)`` plus or minus one, for any weights.  Weights are exact fractions,
    computed on as integers, so the order is the same on every machine.
    """

    def __init__(self, weights: Sequence[Fraction]) -> None:
        total = math.lcm(*(Fraction(w).denominator for w in weights))
        self.units = [int(Fraction(w) * total) for w in weights]
        if sum(self.units) != total or min(self.units) <= 0:
            raise ValueError(f"mixture weights must be positive and sum to 1, got {list(weights)}")
        self.total = total

    def pick(self, counts: Sequence[int]) -> int:
        if len(self.units) == 1:
            return 0
        k, n = 2 * len(self.units) - 2, sum(counts) + 1
        best, best_key = -1, 0
        for s, (unit, count) in enumerate(zip(self.units, counts)):
            # eligible: n*w - count >= 1/k; due: (count + 1 - 1/k) / w, compared as key/unit
            if k * (n * unit - count * self.total) >= self.total:
                key = k * (count + 1) - 1
                if best < 0 or key * self.units[best] < best_key * unit:
                    best, best_key = s, key
        return best


@dataclass
class ShardSource:
    """One source of a ``dataset_path``, opened."""

    name: str
    weight: Fraction  # normalised: the weights of all sources sum to 1
    shards: TokenShards


@dataclass
class DataPosition:
    """Draws served by each source; ``origin``: the draws when the current weights
    started (not all zero after a resume with other weights)."""

    draws: list[int]
    origin: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.origin = self.origin or [0] * len(self.draws)

    @property
    def consumed(self) -> int:
        return sum(self.draws)

    def copy(self) -> DataPosition:
        return DataPosition(list(self.draws), list(self.origin))


def _epoch_seed(seed: int, source: str, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{source}/{epoch}".encode()).digest()[:8], "little")


class ShardDataset(IterableDataset):
    """This rank's samples of the global order (module docstring), from ``position`` on.

    Args:
        sources: the opened sources of a ``dataset_path``.
        seq_len: tokens per sample; each sample reads ``seq_len + 1``.
        local_batch_size: samples per micro-batch on each rank.
        dp_rank, dp_world_size: this rank's slice of each micro-batch.
        shuffle: a seeded permutation per source and epoch (else file order).
        seed: chooses the permutations.
        infinite: start a new epoch of a source when it runs out; otherwise stop before
            the first micro-batch that would need a sample beyond its first epoch.
        config_key: the config field named in messages.
    """

    def __init__(
        self,
        sources: Sequence[ShardSource],
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        infinite: bool = True,
        config_key: str = "training.dataset_path",
    ) -> None:
        if seq_len < 1 or local_batch_size < 1:
            raise ValueError(f"seq_len and local_batch_size must be >= 1, got {seq_len} and {local_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_world_size {dp_world_size}")
        self.sources = list(sources)
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.shuffle = shuffle
        self.seed = seed
        self.infinite = infinite
        self.config_key = config_key
        for source in self.sources:
            source.shards.random_access = shuffle
        self.schedule = MixtureSchedule([s.weight for s in self.sources])
        self.samples = [s.shards.num_tokens // (seq_len + 1) for s in self.sources]
        for source, n in zip(self.sources, self.samples):
            if n == 0:
                raise ValueError(
                    f"{self._where(source)}: {source.shards.num_tokens} tokens, fewer than one sample of seq_len + 1 = "
                    f"{seq_len + 1}; add data or use a shorter seq_len"
                )
        self.position = DataPosition([0] * len(self.sources))  # where the next iteration starts
        self._permutations: dict[int, tuple[int, Permutation]] = {}

    @property
    def micro_batch(self) -> int:
        """Global samples per micro-batch: local_batch_size x data-parallel ranks."""
        return self.local_batch_size * self.dp_world_size

    def _where(self, source: ShardSource) -> str:
        return self.config_key if len(self.sources) == 1 else f"{self.config_key} source '{source.name}'"

    def draw(self, position: DataPosition, n: int) -> list[tuple[int, int]]:
        """The next ``n`` global samples as (source, draw) pairs; advances ``position``."""
        if len(self.sources) == 1:
            first = position.draws[0]
            position.draws[0] += n
            return [(0, k) for k in range(first, first + n)]
        out = []
        for _ in range(n):
            s = self.schedule.pick([d - o for d, o in zip(position.draws, position.origin)])
            out.append((s, position.draws[s]))
            position.draws[s] += 1
        return out

    def advance(self, position: DataPosition, micro_batches: int = 1) -> None:
        """Step ``position`` over whole micro-batches (what the loader hands out)."""
        if len(self.sources) == 1:
            position.draws[0] += micro_batches * self.micro_batch
        else:
            self.draw(position, micro_batches * self.micro_batch)

    def sample(self, s: int, k: int) -> torch.Tensor:
        """The ``seq_len + 1`` tokens of source ``s``'s ``k``-th draw (int64)."""
        epoch, i = divmod(k, self.samples[s])
        if self.shuffle:
            cached = self._permutations.get(s)
            if cached is None or cached[0] != epoch:
                cached = (epoch, Permutation(self.samples[s], _epoch_seed(self.seed, self.sources[s].name, epoch)))
                self._permutations[s] = cached
            i = int(cached[1](i))
        width = self.seq_len + 1
        return torch.from_numpy(self.sources[s].shards.read(i * width, width))

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # With DataLoader workers each holds a copy of this dataset; worker w makes
        # micro-batches w, w + num_workers, ... (the order in which the loader takes
        # them), stepping over the others' draws to keep the mixture's order.
        worker = get_worker_info()
        w, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        position = self.position.copy()
        first, last = self.dp_rank * self.local_batch_size, (self.dp_rank + 1) * self.local_batch_size
        epochs = [d // n for d, n in zip(position.draws, self.samples)]
        for m in range(1 << 62):
            draws = self.draw(position, self.micro_batch)
            if not self.infinite and any(k >= self.samples[s] for s, k in draws):
                if m % workers == w:
                    logger.info(f"{self.config_key}: end of the data after {m} micro-batches of {self.micro_batch} samples")
                return
            if m % workers != w:
                continue
            for s, k in draws[first:last]:
                if k // self.samples[s] > epochs[s]:
                    epochs[s] = k // self.samples[s]
                    logger.info(f"{self._where(self.sources[s])}: epoch {epochs[s]} starts ({self.samples[s]} samples each)")
                x = self.sample(s, k)
                yield {"input": x[:-1]}, x[1:]

    # ---- the checkpointed position -------------------------------------------------

    def position_state(self, position: DataPosition) -> dict[str, Any]:
        """The position with what it refers to, for the checkpoint (same on every rank)."""
        return {
            "version": POSITION_VERSION,
            "consumed_samples": position.consumed,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "sources": {
                source.name: {
                    "draws": d,
                    "origin": o,
                    "weight": str(source.weight),
                    "samples": n,
                    "tokenizer": (source.shards.tokenizer or {}).get("sha256"),
                }
                for source, d, o, n in zip(self.sources, position.draws, position.origin, self.samples)
            },
        }

    def load_position(self, state: dict[str, Any]) -> DataPosition:
        """The position of a checkpoint, for these sources; says what changed since.

        Each source resumes at its own draw count.  If the sources or weights changed,
        the new interleaving starts from there; other data, seq_len, seed or shuffle
        mean other samples from here on, which is said in one warning line.
        """
        saved = state.get("sources", {})
        draws = [int(saved.get(s.name, {}).get("draws", 0)) for s in self.sources]
        changes = []
        weights_before = {name: v.get("weight") for name, v in saved.items()}
        weights_now = {s.name: str(s.weight) for s in self.sources}
        if weights_before == weights_now:
            origin = [int(saved[s.name].get("origin", 0)) for s in self.sources]
        else:
            origin = list(draws)
            changes.append(f"sources/weights {weights_before} -> {weights_now} (the interleaving starts afresh)")
        for key in ("seq_len", "shuffle", "seed"):
            if state.get(key) != getattr(self, key):
                changes.append(f"{key} {state.get(key)} -> {getattr(self, key)}")
        for source, n in zip(self.sources, self.samples):
            before = saved.get(source.name, {}).get("samples")
            if before is not None and before != n:
                changes.append(f"source '{source.name}' had {before} samples, now {n}")
        if changes:
            logger.warning(
                f"{self.config_key}: the checkpointed data position (global sample {state.get('consumed_samples')}) "
                f"is resumed, but {'; '.join(changes)}: the samples from here on differ from the original run's"
            )
        return DataPosition(draws, origin)
