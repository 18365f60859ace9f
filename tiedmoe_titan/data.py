"""Local-files text data for torchtitan.

``training.dataset_path`` (or ``validation.dataset_path``) is a comma-separated
list of file globs.  Supported files:

* ``.txt``   - one document per blank-line-separated block;
* ``.jsonl`` - one document per line, in the line's ``"text"`` field.

Each data-parallel rank keeps every ``dp_world_size``-th document (in file order),
tokenizes it as ``[bos] + tokens + [eos]`` and concatenates everything into one
token stream.  Samples are consecutive ``seq_len + 1`` windows of that stream,
yielded as ``({"input": x[:-1]}, x[1:])`` exactly like torchtitan's
``HuggingFaceTextDataset``.  In ``infinite`` mode the stream is treated as
circular, which is what torchtitan's carried-over token buffer does on re-loop.

Because sample ``k`` is a pure function of ``k``, the checkpoint state is a
single integer, and a resumed run sees exactly the batches of an uninterrupted
one.

The module also builds the bundled corpus (``python -m tiedmoe_titan.data
build-corpus``) from the docstrings of the Python standard library.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

if TYPE_CHECKING:  # importing validate pulls in pipelining; only needed for typing
    from torchtitan.components.validate import BaseValidator

ASSETS_DIR = str(Path(__file__).resolve().parent / "assets")
DEFAULT_CORPUS_DIR = os.path.join(ASSETS_DIR, "corpus")
DEFAULT_TRAIN_PATH = os.path.join(DEFAULT_CORPUS_DIR, "train.jsonl")
DEFAULT_VALID_PATH = os.path.join(DEFAULT_CORPUS_DIR, "valid.jsonl")

SUPPORTED_SUFFIXES = (".txt", ".jsonl")
PROGRESS_EVERY_DOCS = 100_000  # a log line this often within one big file


# --------------------------------------------------------------------------- #
# Finding and reading documents
# --------------------------------------------------------------------------- #


def resolve_dataset_files(dataset_path: str | None, config_key: str) -> list[str]:
    """Expand a comma-separated list of globs into an ordered list of files.

    Globs keep the order given; matches of one glob are sorted so the order does
    not depend on the file system.  A file matched twice is read once.  Every
    error is a single line that names ``config_key`` so the user knows which
    setting to fix.
    """
    if dataset_path is None or not str(dataset_path).strip():
        raise ValueError(
            f"{config_key} is not set: give a comma-separated list of .txt/.jsonl "
            f"file globs, e.g. {_default_for(config_key)}"
        )
    files: list[str] = []
    for pattern in (p.strip() for p in str(dataset_path).split(",")):
        if not pattern:
            continue
        matches = sorted(
            p
            for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p)
        )
        if not matches:
            raise FileNotFoundError(f"{config_key}: glob '{pattern}' matched no files")
        for path in matches:
            if not path.endswith(SUPPORTED_SUFFIXES):
                raise ValueError(
                    f"{config_key}: '{path}' (from glob '{pattern}') is not a "
                    f"{' or '.join(SUPPORTED_SUFFIXES)} file"
                )
            if path not in files:
                files.append(path)
    if not files:
        raise ValueError(f"{config_key}='{dataset_path}' contains no globs")
    return files


def _default_for(config_key: str) -> str:
    """The bundled corpus file matching a config key, for error messages."""
    return DEFAULT_VALID_PATH if config_key.startswith("validation") else DEFAULT_TRAIN_PATH


def iter_documents(path: str) -> Iterator[str]:
    """Yield the non-empty documents of one ``.txt`` or ``.jsonl`` file in order."""
    if path.endswith(".jsonl"):
        yield from _iter_jsonl_documents(path)
    elif path.endswith(".txt"):
        yield from _iter_txt_documents(path)
    else:
        raise ValueError(f"'{path}' is not a {' or '.join(SUPPORTED_SUFFIXES)} file")


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


# --------------------------------------------------------------------------- #
# The dataset
# --------------------------------------------------------------------------- #


class LocalTextDataset(IterableDataset, Stateful):
    """Packed, rank-sharded, resumable token stream over local text files.

    Args:
        dataset_path: comma-separated file globs (see module docstring).
        tokenizer: any torchtitan ``BaseTokenizer`` whose ``encode`` accepts
            ``add_bos``/``add_eos``.
        seq_len: tokens per sample; each sample reads ``seq_len + 1`` tokens.
        dp_rank, dp_world_size: this rank keeps documents ``i`` with
            ``i % dp_world_size == dp_rank``.
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
        self.files = resolve_dataset_files(dataset_path, config_key)
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self.restart_each_pass = restart_each_pass
        self.doc_indices, self._tokens = self._load_rank_share(tokenizer)
        self._next_sample: int | None = None  # None: not started (see _first_sample)
        self._logged_epoch = 0
        if self.samples_per_epoch == 0:
            logger.warning(
                f"{config_key}: rank {dp_rank} has only {len(self._tokens)} tokens, "
                f"fewer than one sample of {seq_len + 1}"
                + ("; samples will wrap around" if infinite else "; it yields nothing")
            )

    def _load_rank_share(self, tokenizer: BaseTokenizer) -> tuple[list[int], torch.Tensor]:
        """Read all files, tokenize this rank's documents, return (indices, stream).

        Every rank reads every file (to number documents identically) but only
        tokenizes its own share, which is the expensive part.  One log line per
        file shows progress on big inputs.
        """
        doc_indices: list[int] = []
        chunks: list[torch.Tensor] = []
        n_docs = 0
        for path in self.files:
            file_docs, kept, file_tokens = 0, 0, 0
            for text in iter_documents(path):
                if n_docs % self.dp_world_size == self.dp_rank:
                    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
                    chunks.append(torch.tensor(ids, dtype=torch.int32))
                    doc_indices.append(n_docs)
                    kept += 1
                    file_tokens += len(ids)
                n_docs += 1
                file_docs += 1
                if file_docs % PROGRESS_EVERY_DOCS == 0:
                    logger.info(f"{self.config_key}: {path}: {file_docs} documents read ...")
            logger.info(
                f"{self.config_key}: {path}: {file_docs} documents, dp rank "
                f"{self.dp_rank}/{self.dp_world_size} keeps {kept} ({file_tokens} tokens)"
            )
        if n_docs == 0:
            raise ValueError(f"{self.config_key}: files {self.files} contain no documents")
        if not chunks:
            raise ValueError(
                f"{self.config_key}: {n_docs} documents are too few for "
                f"dp_world_size {self.dp_world_size} (rank {self.dp_rank} gets none)"
            )
        tokens = torch.cat(chunks)
        logger.info(
            f"{self.config_key}: dp rank {self.dp_rank} has {len(doc_indices)} of "
            f"{n_docs} documents, {len(tokens)} tokens from {len(self.files)} files"
        )
        return doc_indices, tokens

    @property
    def num_tokens(self) -> int:
        """Length of this rank's token stream (one epoch)."""
        return len(self._tokens)

    @property
    def samples_per_epoch(self) -> int:
        """Whole samples in one pass; the non-infinite iteration yields this many."""
        return self.num_tokens // (self.seq_len + 1)

    def sample(self, k: int) -> torch.Tensor:
        """The ``seq_len + 1`` tokens of sample ``k`` (int64).

        Past the end of the stream it wraps to the start, exactly like the token
        buffer that torchtitan carries over when it re-loops a dataset.
        """
        width, n = self.seq_len + 1, self.num_tokens
        start = (k * width) % n
        if start + width <= n:
            x = self._tokens[start : start + width]
        else:
            x = self._tokens[(torch.arange(width) + start) % n]
        return x.long()

    def _first_sample(self) -> int:
        """Where a fresh iteration starts: this worker's id (workers stride)."""
        worker = get_worker_info()
        return worker.id if worker is not None else 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # With DataLoader workers each worker holds a copy of this dataset, so
        # worker w takes samples w, w + num_workers, ... to avoid duplicates.
        worker = get_worker_info()
        stride = worker.num_workers if worker is not None else 1
        if self.restart_each_pass or self._next_sample is None:
            self._next_sample = self._first_sample()
        while self.infinite or self._next_sample < self.samples_per_epoch:
            k = self._next_sample
            # Advance before yielding: a state_dict() taken after this sample
            # has been consumed must resume at the next one.
            self._next_sample = k + stride
            self._log_reloop(k)
            x = self.sample(k)
            yield {"input": x[:-1]}, x[1:]
        # Expected at the end of every validation pass; a warning for training.
        log = logger.info if self.restart_each_pass else logger.warning
        log(f"{self.config_key}: dp rank {self.dp_rank} has run out of data")

    def _log_reloop(self, k: int) -> None:
        """Log once per epoch when an infinite iteration wraps around."""
        epoch = (k + 1) * (self.seq_len + 1) // max(self.num_tokens, 1)
        if epoch > self._logged_epoch:
            self._logged_epoch = epoch
            logger.info(f"{self.config_key}: dp rank {self.dp_rank} re-looping (epoch {epoch})")

    def state_dict(self) -> dict[str, Any]:
        """Position as the next sample index, plus a fingerprint of the stream."""
        next_sample = self._next_sample
        if next_sample is None:
            next_sample = self._first_sample()
        return {
            "sample_idx": next_sample,
            "num_tokens": self.num_tokens,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved sample; warn if the data no longer matches."""
        if (state_dict.get("num_tokens"), state_dict.get("seq_len")) != (
            self.num_tokens,
            self.seq_len,
        ):
            logger.warning(
                f"{self.config_key}: checkpointed data had {state_dict.get('num_tokens')} "
                f"tokens / seq_len {state_dict.get('seq_len')}, now {self.num_tokens} / "
                f"{self.seq_len}; resuming by sample index, batches will differ"
            )
        self._next_sample = int(state_dict["sample_idx"])


# --------------------------------------------------------------------------- #
# Dataloader / validator builders (TrainSpec entry points)
# --------------------------------------------------------------------------- #


def _build_loader(
    dataset: LocalTextDataset,
    batch_size: int,
    dataloader_config: Any,
) -> ParallelAwareDataloader:
    """Wrap a dataset like torchtitan does: config dataloader kwargs + batch size."""
    kwargs = {**asdict(dataloader_config), "batch_size": batch_size}
    return ParallelAwareDataloader(
        dataset, dp_rank=dataset.dp_rank, dp_world_size=dataset.dp_world_size, **kwargs
    )


def build_local_text_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """Training loader over ``job_config.training.dataset_path``.

    Same signature as torchtitan's ``build_text_dataloader``;
    ``training.dataset`` (a HuggingFace dataset name) is ignored.
    """
    cfg = job_config.training
    dataset = LocalTextDataset(
        cfg.dataset_path,
        tokenizer,
        seq_len=cfg.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        config_key="training.dataset_path",
    )
    return _build_loader(dataset, cfg.local_batch_size, cfg.dataloader)


def build_local_validation_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config: JobConfig,
    infinite: bool = False,
) -> ParallelAwareDataloader:
    """Validation loader over ``job_config.validation.dataset_path``.

    Same signature as torchtitan's ``build_text_validation_dataloader``.  Unlike
    torchtitan's, every evaluation restarts at the first sample, so losses at
    different steps are measured on the same batches.
    """
    cfg = job_config.validation
    dataset = LocalTextDataset(
        cfg.dataset_path,
        tokenizer,
        seq_len=cfg.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        restart_each_pass=True,
        config_key="validation.dataset_path",
    )
    return _build_loader(dataset, cfg.local_batch_size, cfg.dataloader)


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
