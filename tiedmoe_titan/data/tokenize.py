"""Offline tokenization of text files into a folder of token shards (``tiedmoe-data tokenize``).

Why not at training start: tokenizing is ~1 s per million tokens per core, so a
billion-token corpus would cost every (re)start hours.  Done once here, training
reads the result (``shard_format.py``, ``shards.py``).

How the work is cut, so that the bytes never depend on how it was run:

* Input files are numbered in the order of the globs (each glob's matches
  sorted).  File ``i``'s documents, in order, fill shards ``i-0000``, ``i-0001``,
  ... of ``docs_per_shard`` documents each.  A shard is therefore a function of
  one file and the tokenizer: any number of worker processes (one per file at a
  time) and any split across SLURM array tasks write the same shards.
* Workers are processes, one tokenizer thread each (``RAYON_NUM_THREADS=1`` for
  Hugging Face, ``num_threads=1`` for SentencePiece): the GIL and the libraries'
  own thread pools would otherwise fight over the cores.
* Resume: a shard is written under a temporary name, fsynced, then renamed, so
  a shard that exists is complete.  A file whose record (``done/NNNNNN.json``)
  exists is skipped; a file with some shards starts after them (its documents
  up to there are read, not tokenized).  Leftover temporary files are removed.
* ``--task-index I --num-tasks N`` makes this process do only its part of the
  files (split by size, deterministically); each task records its files, and
  ``tiedmoe-data finalize`` writes ``metadata.json`` once all are done.  With one
  task (the default) the metadata is written at the end of the run.

``plan.json`` records the inputs (paths and sizes), the tokenizer and the shard
size: a rerun or another task with anything else is refused, so a folder never
mixes two tokenizations.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..tokenizer import load_tokenizer, tokenizer_identity
from .readers import COMPRESSED_SUFFIXES, DocumentReader, text_stream
from .shard_format import (
    DTYPES,
    FORMAT,
    METADATA,
    SHARD_SUFFIX,
    TMP_PREFIX,
    dtype_for_vocab,
    metadata,
    publish,
    read_json,
    write_json_atomic,
)
from .sources import SUPPORTED_SUFFIXES, resolve_dataset_files

TOKENIZE_SUFFIXES = SUPPORTED_SUFFIXES + COMPRESSED_SUFFIXES
DEFAULT_DOCS_PER_SHARD = 100_000
BATCH_DOCS = 256  # documents per encode call: amortises the call, bounds memory
PROGRESS_EVERY_S = 2.0
PLAN = "plan.json"
DONE_DIR = "done"


def shard_name(file_index: int, part: int) -> str:
    return f"{file_index:06d}-{part:04d}{SHARD_SUFFIX}"


def _record_path(output_dir: str, file_index: int) -> str:
    return os.path.join(output_dir, DONE_DIR, f"{file_index:06d}.json")


def single_thread_tokenizers() -> None:
    """One thread per tokenizer; must run before a Hugging Face tokenizer first encodes."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


# --------------------------------------------------------------------------- #
# Checks before anything is written
# --------------------------------------------------------------------------- #


def check_inputs(inputs: Sequence[str], tokenizer_path: str) -> tuple[list[str], Any]:
    """The input files and the tokenizer, or a one-line ValueError naming the path and the fix."""
    files = resolve_dataset_files(",".join(inputs), "--input", TOKENIZE_SUFFIXES)
    for path in files:
        _check_readable(path)
    return files, load_tokenizer(tokenizer_path, "--tokenizer")


def _check_readable(path: str) -> None:
    """Open (and for .gz/.zst start decompressing) each input before anything is written."""
    try:
        with open(path, "rb") as raw:
            empty = not raw.read(1)
            raw.seek(0)
            if not empty and path.endswith(COMPRESSED_SUFFIXES):
                text_stream(path, raw).read(1)
    except OSError as e:
        raise ValueError(f"--input: '{path}' cannot be read ({e.strerror or e}); fix the file or leave it out") from None
    except Exception as e:  # zstandard.ZstdError, UnicodeDecodeError and the like
        raise ValueError(f"--input: '{path}' cannot be decoded ({type(e).__name__}: {e}); fix the file or leave it out") from None
    if empty:
        raise ValueError(f"--input: '{path}' is empty; leave it out of the inputs")


def make_plan(files: list[str], tokenizer: Any, docs_per_shard: int) -> dict:
    """What the folder is a tokenization of; runs and tasks into one folder must agree."""
    identity = tokenizer_identity(tokenizer)
    return {
        "format": FORMAT,
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in files],
        "tokenizer": identity,
        "dtype": dtype_for_vocab(identity["vocab_size"]),
        "docs_per_shard": docs_per_shard,
    }


def _start_folder(output_dir: str, plan: dict) -> None:
    """Create the folder with its plan, or check that the one there is the same."""
    path = os.path.join(output_dir, PLAN)
    if os.path.exists(path):
        old = read_json(path)
        if old != plan:
            what = [key for key in plan if old.get(key) != plan[key]]
            raise ValueError(
                f"--output-dir '{output_dir}' holds a tokenization with other {', '.join(what)}; "
                "use a new --output-dir (or delete that one)"
            )
        return
    os.makedirs(os.path.join(output_dir, DONE_DIR), exist_ok=True)
    write_json_atomic(path, plan)


def assign_files(sizes: Sequence[int], num_tasks: int) -> list[list[int]]:
    """Files per task: biggest first to the least loaded task (ties: lower index),
    so tasks get similar bytes and the split depends only on the file list."""
    loads, tasks = [0] * num_tasks, [[] for _ in range(num_tasks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        t = min(range(num_tasks), key=lambda t: (loads[t], t))
        tasks[t].append(i)
        loads[t] += sizes[i]
    return [sorted(t) for t in tasks]


# --------------------------------------------------------------------------- #
# Workers
# --------------------------------------------------------------------------- #

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, progress: Any) -> None:
    # A forked worker inherits its parent's handlers (a trainer's preemption handler):
    # the pool ends its workers with SIGTERM, and a stop belongs to the parent.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_thread_tokenizers()
    _worker["tokenizer"] = load_tokenizer(tokenizer_path, "--tokenizer")
    _worker["progress"] = progress


def tokenize_file(index: int, path: str, output_dir: str, docs_per_shard: int, dtype: str) -> dict:
    """Write file ``index``'s shards (those not there yet) and its record; returns the record."""
    tokenizer, progress = _worker["tokenizer"], _worker["progress"]
    np_dtype = DTYPES[dtype]
    reader = DocumentReader(path)
    docs = iter(reader)
    shards: list[dict] = []
    sent = {"docs": 0, "tokens": 0, "position": 0}
    last = time.monotonic()

    def report(docs_now: int, tokens_now: int, force: bool = False) -> None:
        nonlocal last
        if progress is None or not (force or time.monotonic() - last >= PROGRESS_EVERY_S / 2):
            return
        now = {"docs": docs_now, "tokens": tokens_now, "position": reader.position}
        progress.put((index, {k: now[k] - sent[k] for k in now}))
        sent.update(now)
        last = time.monotonic()

    total_docs = total_tokens = 0
    for part in itertools.count():
        name = shard_name(index, part)
        final = os.path.join(output_dir, name)
        if os.path.exists(final):  # finished by an earlier run: step over its documents
            n = sum(1 for _ in itertools.islice(docs, docs_per_shard))
            shards.append({"file": name, "tokens": os.path.getsize(final) // np_dtype.itemsize, "documents": n, "source": path})
            total_docs += n
            continue
        first = list(itertools.islice(docs, min(BATCH_DOCS, docs_per_shard)))
        if not first:
            break
        tmp = os.path.join(output_dir, f"{TMP_PREFIX}{name}.{os.getpid()}")
        n_docs = n_tokens = 0
        with open(tmp, "wb") as f:
            batch = first
            while batch:
                ids = tokenizer.encode_documents(batch)
                array = np.fromiter(itertools.chain.from_iterable(ids), dtype=np_dtype)
                f.write(array.tobytes())
                n_docs += len(batch)
                n_tokens += len(array)
                report(total_docs + n_docs, total_tokens + n_tokens)
                batch = list(itertools.islice(docs, min(BATCH_DOCS, docs_per_shard - n_docs)))
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, final)
        shards.append({"file": name, "tokens": n_tokens, "documents": n_docs, "source": path})
        total_docs += n_docs
        total_tokens += n_tokens
        if n_docs < docs_per_shard:
            break
    report(total_docs, total_tokens, force=True)
    record = {"index": index, "source": path, "shards": shards}
    write_json_atomic(_record_path(output_dir, index), record)
    return record


def _run_one(args: tuple) -> dict:
    return tokenize_file(*args)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def tokenize(
    inputs: Sequence[str],
    tokenizer_path: str,
    output_dir: str,
    workers: int | None = None,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    task_index: int = 0,
    num_tasks: int = 1,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict | None:
    """Tokenize this task's files into ``output_dir``; the folder's metadata when
    there is one task (else None: ``finalize`` writes it once every task is done)."""
    if docs_per_shard < 1:
        raise ValueError(f"--docs-per-shard must be >= 1, got {docs_per_shard}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} is outside --num-tasks {num_tasks} (it counts from 0)")
    single_thread_tokenizers()
    files, tokenizer = check_inputs(inputs, tokenizer_path)
    plan = make_plan(files, tokenizer, docs_per_shard)
    _start_folder(output_dir, plan)
    mine = assign_files([f["bytes"] for f in plan["inputs"]], num_tasks)[task_index]
    _remove_leftovers(output_dir, mine)
    todo = [i for i in mine if not os.path.exists(_record_path(output_dir, i))]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo) or 1))
    log(
        f"tokenize: {len(files)} files ({sum(f['bytes'] for f in plan['inputs']) / 1e6:.1f} MB), task {task_index}/{num_tasks} "
        f"has {len(mine)}, {len(mine) - len(todo)} already done; {workers} workers; {plan['tokenizer']['kind']} "
        f"tokenizer, vocab {plan['tokenizer']['vocab_size']} -> {plan['dtype']} -> {output_dir}"
    )
    if todo:
        _run_pool(todo, files, tokenizer_path, output_dir, docs_per_shard, plan, workers, log)
    if num_tasks == 1:
        return finalize(output_dir, log)
    log(f"tokenize: task {task_index} done; run `tiedmoe-data finalize {output_dir}` once every task is")
    return None


def _remove_leftovers(output_dir: str, mine: list[int]) -> None:
    """Temporary files of this task's files from an interrupted run (other tasks' may be live)."""
    prefixes = tuple(f"{TMP_PREFIX}{i:06d}-" for i in mine)
    for name in os.listdir(output_dir):
        if name.startswith(prefixes):
            os.remove(os.path.join(output_dir, name))


def _run_pool(todo, files, tokenizer_path, output_dir, docs_per_shard, plan, workers, log) -> None:
    ctx = multiprocessing.get_context("fork")  # workers inherit the imports: starting is instant
    progress = ctx.Queue()
    sizes = {i: plan["inputs"][i]["bytes"] for i in todo}
    total_bytes = sum(sizes.values())
    done = {"docs": 0, "tokens": 0}
    position = dict.fromkeys(todo, 0)
    order = sorted(todo, key=lambda i: (-sizes[i], i))  # big files first: no straggler at the end
    start = last = time.monotonic()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, progress)) as pool:
        results = [pool.apply_async(_run_one, ((i, files[i], output_dir, docs_per_shard, plan["dtype"]),)) for i in order]
        finished = 0
        while finished < len(results):
            try:
                index, delta = progress.get(timeout=0.2)
                done["docs"] += delta["docs"]
                done["tokens"] += delta["tokens"]
                position[index] += delta["position"]
            except queue.Empty:
                pass
            for r in results:
                if r.ready():
                    r.get()  # re-raises a worker's error here
            finished = sum(r.ready() for r in results)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or finished == len(results):
                read = sum(min(position[i], sizes[i]) for i in todo)
                rate = read / max(now - start, 1e-9)
                eta = (total_bytes - read) / rate if rate > 0 else float("inf")
                log(
                    f"tokenize: {finished}/{len(results)} files, {done['docs']:,} documents, {done['tokens']:,} tokens, "
                    f"{rate / 1e6:.2f} MB/s, ETA {_fmt_time(eta) if eta != float('inf') else '?'}"
                )
                last = now


def finalize(output_dir: str, log: Callable[[str], None] = print) -> dict:
    """Write ``metadata.json`` from the plan and every file's record, after checking
    that every input is done and every shard has its recorded size."""
    plan_path = os.path.join(output_dir, PLAN)
    if not os.path.isfile(plan_path):
        raise ValueError(f"'{output_dir}' has no {PLAN}: it is not a `tiedmoe-data tokenize` output folder")
    plan = read_json(plan_path)
    inputs = plan["inputs"]
    missing = [i for i in range(len(inputs)) if not os.path.isfile(_record_path(output_dir, i))]
    if missing:
        raise ValueError(
            f"{output_dir}: {len(missing)} of {len(inputs)} input files are not tokenized yet (first: "
            f"{inputs[missing[0]]['path']}); run the remaining `tiedmoe-data tokenize` tasks, then finalize again"
        )
    itemsize = DTYPES[plan["dtype"]].itemsize
    shards = []
    for i in range(len(inputs)):
        for shard in read_json(_record_path(output_dir, i))["shards"]:
            path = os.path.join(output_dir, shard["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != shard["tokens"] * itemsize:
                raise ValueError(
                    f"{path}: missing or not {shard['tokens']} {plan['dtype']} tokens as recorded; delete it and "
                    f"{_record_path(output_dir, i)}, then rerun `tiedmoe-data tokenize`"
                )
            shards.append({**shard, "source": inputs[i]["path"]})
    meta = metadata(plan["tokenizer"], plan["dtype"], shards, inputs, docs_per_shard=plan["docs_per_shard"])
    write_json_atomic(os.path.join(output_dir, METADATA), meta)
    log(f"finalize: {output_dir}/{METADATA}: {len(shards)} shards, {meta['documents']:,} documents, {meta['tokens']:,} tokens")
    return meta
