"""Data at scale: offline tokenization throughput, and the shard loader at 2B tokens.

    python benchmarks/data_scale.py [--part tokenize|shards|text|loader|all] [--json] [--keep]
    python benchmarks/data_scale.py --part tokenize [--mb 24] [--files 8] [--tokenizer PATH] [--repeats 2]
    python benchmarks/data_scale.py --part loader [--shards-dir DIR] [--tokens 2e9] [--seq-len 4096]
        [--batch 8] [--batches 200] [--text-mb 100] [--text-files 1] [--step-seconds 0.4]

``--part tokenize`` (part 1): writes a synthetic corpus (``--files`` .jsonl files, ``--mb``
MB of text in all, words drawn from the bundled corpus with a fixed seed), tokenizes it
with ``tiedmoe-data tokenize`` (``tiedmoe_titan.data.tokenize.tokenize``) once with 1
worker and once with 2, one tokenizer thread each, and reports tokens/s and the ratio
(the issue asks >= 1.7x on 2 cores). Each setting runs ``--repeats`` times and the best
is kept, since a shared machine slows runs at random; the load average before and after
is printed so that a low ratio can be read against it. Both runs must write the same
bytes (checked).

``--part shards`` (part 2): writes ``--tokens`` (2B: 4 GB) and ``--small-tokens`` (10M)
tokens of synthetic uint16 shards (random ids of the bundled tokenizer's vocabulary,
fixed seed, ``--shard-tokens`` per file, recorded as made by the bundled tokenizer) under
``--shards-dir``, or reuses them if they are already there with the right sizes. Each
measurement runs in a fresh process that imports everything, loads the tokenizer and
records its resident memory (the baseline) before it builds the training loader with
``build_local_text_dataloader`` (``--seq-len`` 4096, ``--batch`` 8, default
``[data]`` and ``dataloader`` settings: shuffled, no workers); it reports the build
time, RSS above the baseline after the build and after reading ``--warmup`` +
``--batches`` batches (anonymous and file-backed pages apart: the loader reads shards
with ``os.pread`` and maps none, so file-backed RSS above the baseline stays at the few
MiB of library code the first batches page in; a growing one would mean shard pages
mapped into the process) and after
``--long-batches`` more, and the batch throughput of the timed batches. The
page cache is emptied of the shard files (``posix_fadvise(DONTNEED)``, checked with
``fincore``) for the cold runs and filled (one sequential read) for the warm ones. The
same is measured at the shape of ``--recipe`` (debug_cpu: seq_len 128, batch 8) and
compared with what its training step consumes: global batch / ``--step-seconds``
(issue targets: build <= 2 s, RSS <= 100 MB above the baseline).

``--part text`` (part 3): today's path for text inputs, on ``--text-mb`` MB of synthetic
jsonl: the first start tokenizes them into the text cache (``TIEDMOE_DATA_CACHE``, a
temporary folder) while building the loader, a second start finds the cache.

``--part loader`` is shards + text; ``all`` (the default) is every part. ``--json``
prints one JSON object with one key per part. Temporary folders, and shard folders this
run wrote, are removed at the end unless ``--keep``; shard folders found already there
are left as they were.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from tiedmoe_titan.assets import DEFAULT_TOKENIZER_PATH, DEFAULT_TRAIN_PATH
from tiedmoe_titan.data import iter_documents
from tiedmoe_titan.data.tokenize import tokenize

MIB = 1 << 20
RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "debug_cpu.toml")


def log(message: str) -> None:
    print(f"[data_scale] {message}", file=sys.stderr, flush=True)


# ---- part 1: tokenization throughput ------------------------------------------------


def synthetic_corpus(folder: str, total_mb: float, files: int, seed: int = 0) -> int:
    """``files`` .jsonl files of documents of 50-2000 words from the bundled corpus's vocabulary."""
    words = " ".join(iter_documents(DEFAULT_TRAIN_PATH)).split()
    rng = random.Random(seed)
    per_file = int(total_mb * 1e6 / files)
    total = 0
    for f in range(files):
        size = 0
        with open(os.path.join(folder, f"part-{f:03d}.jsonl"), "w", encoding="utf-8") as out:
            while size < per_file:
                line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 2000)))}) + "\n"
                out.write(line)
                size += len(line.encode())
        total += size
    return total


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(corpus: str, tokenizer: str, out: str, workers: int) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (all processes) and the metadata of one tokenization."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    meta = tokenize([os.path.join(corpus, "*.jsonl")], tokenizer, out, workers=workers, log=lambda m: None)
    return time.perf_counter() - start, _cpu_seconds() - cpu, meta


def tokenize_part(args) -> tuple[dict, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        os.makedirs(corpus)
        nbytes = synthetic_corpus(corpus, args.mb, args.files)
        load_before = os.getloadavg()
        results, cpu, metas = {}, {}, {}
        for _ in range(args.repeats):  # alternate, so a burst of load hits both settings alike
            for workers in (1, 2):
                seconds, cpu_s, metas[workers] = run(corpus, args.tokenizer, os.path.join(tmp, f"out{workers}"), workers)
                if seconds < results.get(workers, float("inf")):
                    results[workers], cpu[workers] = seconds, cpu_s
        load_after = os.getloadavg()
        same = metas[1] == metas[2] and all(
            open(os.path.join(tmp, "out1", s["file"]), "rb").read() == open(os.path.join(tmp, "out2", s["file"]), "rb").read()
            for s in metas[1]["shards"]
        )
    tokens = metas[1]["tokens"]
    report = {
        "corpus_mb": round(nbytes / 1e6, 1), "files": args.files, "tokens": tokens,
        "tokenizer": metas[1]["tokenizer"]["kind"], "cpus": os.cpu_count(),
        "tokens_per_s_1_worker": round(tokens / results[1]), "tokens_per_s_2_workers": round(tokens / results[2]),
        "seconds_1_worker": round(results[1], 2), "seconds_2_workers": round(results[2], 2),
        "speedup_2_vs_1": round(results[1] / results[2], 2), "same_bytes": same,
        # CPU seconds / wall seconds: the cores the run actually got (2 = both, uncontended)
        "cores_used_1_worker": round(cpu[1] / results[1], 2), "cores_used_2_workers": round(cpu[2] / results[2], 2),
        "cpu_seconds_1_worker": round(cpu[1], 2), "cpu_seconds_2_workers": round(cpu[2], 2),
        "loadavg_1min_before": round(load_before[0], 2), "loadavg_1min_after": round(load_after[0], 2),
    }
    return report, same


# ---- the probe: one loader measurement in a fresh process ---------------------------


def _memory() -> dict:
    """Resident memory of this process from /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _above(now: dict, base: dict) -> dict:
    """MiB above the baseline: total, anonymous, file-backed (libraries; shards are read, not mapped)."""
    return {
        "rss": round((now["VmRSS"] - base["VmRSS"]) / MIB, 1),
        "anon": round((now["RssAnon"] - base["RssAnon"]) / MIB, 1),
        "file": round((now["RssFile"] - base["RssFile"]) / MIB, 1),
    }


def probe(spec: dict) -> dict:
    """Build the training loader on ``spec``'s data and read batches from it.

    Runs in a process of its own (``--probe``), so that the baseline is a process that
    has imported everything and loaded the tokenizer, and nothing else."""
    import torch  # noqa: F401  (imported before the baseline, as in a trainer)

    from tiedmoe_titan.config import job_config_class
    from tiedmoe_titan.data import build_local_text_dataloader
    from tiedmoe_titan.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer"])
    job_config = job_config_class()()
    job_config.model.hf_assets_path = spec["tokenizer"]
    job_config.training.dataset_path = spec["dataset_path"]
    job_config.training.seq_len = spec["seq_len"]
    job_config.training.local_batch_size = spec["batch"]
    gc.collect()
    try:  # reset VmHWM, so that it is the peak from here on
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _memory()

    start = time.perf_counter()
    loader = build_local_text_dataloader(1, 0, tokenizer, job_config)
    build_s = time.perf_counter() - start
    built = _memory()

    start = time.perf_counter()
    batches = iter(loader)
    first, labels = next(batches)
    first_batch_s = time.perf_counter() - start
    assert tuple(first["input"].shape) == (spec["batch"], spec["seq_len"]) and labels.shape == first["input"].shape
    for _ in range(spec["warmup"] - 1):
        next(batches)
    start = time.perf_counter()
    for _ in range(spec["batches"]):
        next(batches)
    read_s = time.perf_counter() - start
    after = _memory()
    for _ in range(spec["long_batches"]):  # how resident memory grows on a longer read
        next(batches)
    longer = _memory()
    samples = spec["batches"] * spec["batch"]
    return {
        "tokens": sum(s.shards.num_tokens for s in loader.dataset.sources),
        "samples_in_epoch": sum(loader.dataset.samples),
        "build_s": round(build_s, 4),
        "baseline_rss_mib": round(base["VmRSS"] / MIB, 1),
        "after_build_mib": _above(built, base),
        "peak_during_build_mib": round((built["VmHWM"] - base["VmRSS"]) / MIB, 1),
        "first_batch_s": round(first_batch_s, 4),
        "batches_read": spec["warmup"] + spec["batches"],
        "after_batches_mib": _above(after, base),
        "batches_read_longer": spec["warmup"] + spec["batches"] + spec["long_batches"],
        "after_longer_mib": _above(longer, base),
        "timed_batches": spec["batches"],
        "samples_per_s": round(samples / read_s, 1),
        "tokens_per_s": round(samples * spec["seq_len"] / read_s),
        "ms_per_batch": round(1000 * read_s / spec["batches"], 3),
    }


def run_probe(spec: dict, env: dict | None = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(spec)]
    done = subprocess.run(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the probe {spec} failed (exit {done.returncode}); its messages are above")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- synthetic shards and the page cache --------------------------------------------


def _identity() -> dict:
    from tiedmoe_titan.tokenizer import load_tokenizer, tokenizer_identity

    return tokenizer_identity(load_tokenizer(DEFAULT_TOKENIZER_PATH))


def _shards_ready(folder: str, tokens: int, identity: dict) -> list[str] | None:
    """The shard files of ``folder`` if it holds ``tokens`` tokens of this tokenizer, sizes right."""
    from tiedmoe_titan.data.shard_format import METADATA, read_json

    try:
        meta = read_json(os.path.join(folder, METADATA))
        files = [os.path.join(folder, s["file"]) for s in meta["shards"]]
        ok = (
            meta["tokenizer"]["sha256"] == identity["sha256"] and meta["tokens"] == tokens and meta["dtype"] == "uint16"
            and all(os.path.getsize(f) == 2 * s["tokens"] for f, s in zip(files, meta["shards"]))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if ok else None


def write_shards(folder: str, tokens: int, shard_tokens: int, identity: dict) -> tuple[list[str], bool]:
    """Shard files of ``tokens`` random uint16 ids (seed 0) in ``folder``, and whether
    they were written now (False: found there already)."""
    from tiedmoe_titan.data.shard_format import METADATA, metadata, write_json_atomic

    files = _shards_ready(folder, tokens, identity)
    if files is not None:
        log(f"reusing {tokens:,} tokens of shards in {folder}")
        return files, False
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    shards, files, done, start = [], [], 0, time.perf_counter()
    total_gb = 2 * tokens / 1e9
    while done < tokens:
        n = min(shard_tokens, tokens - done)
        name = f"{len(shards):06d}-0000.bin"
        path, tmp = os.path.join(folder, name), os.path.join(folder, f".tmp-{name}")
        with open(tmp, "wb") as f:
            rng.integers(0, identity["vocab_size"], size=n, dtype=np.uint16).astype("<u2", copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())  # clean pages, so that the cold runs can evict them
        os.replace(tmp, path)
        shards.append({"file": name, "tokens": n, "documents": 1, "source": "synthetic"})
        files.append(path)
        done += n
        elapsed = time.perf_counter() - start
        if len(shards) % 4 == 0 or done == tokens:
            rate = 2 * done / 1e6 / elapsed
            log(f"writing shards: {len(shards)} files, {2 * done / 1e9:.2f}/{total_gb:.2f} GB, {rate:.0f} MB/s, "
                f"ETA {(2 * (tokens - done) / 1e6) / rate:.0f} s")
    write_json_atomic(os.path.join(folder, METADATA), metadata(identity, "uint16", shards, []))
    return files, True


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages: they were fsynced)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[str]) -> float:
    """Read the files once, sequentially, into the page cache; returns MB/s."""
    buffer, total, start = bytearray(16 * MIB), 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / 1e6 / (time.perf_counter() - start)


def cached_fraction(files: list[str]) -> float | None:
    """The fraction of the files' bytes in the page cache (``fincore``), None without it."""
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    resident = size = 0
    for line in done.stdout.split("\n"):
        if line.strip():
            res, sz = line.split()
            resident, size = resident + int(res), size + int(sz)
    return round(resident / size, 4) if size else None


def _recipe_shape(recipe: str) -> dict:
    from tiedmoe_titan.config import load_recipe

    training = load_recipe(recipe).get("training", {})
    local = int(training.get("local_batch_size", 8))
    global_batch = int(training.get("global_batch_size", -1))
    return {"seq_len": int(training.get("seq_len", 2048)), "local_batch": local,
            "global_batch": global_batch if global_batch > 0 else local}


def shards_part(args) -> tuple[dict, list[str]]:
    """Part 2; returns the report and the folders it wrote (for the cleanup)."""
    identity = _identity()
    root = args.shards_dir
    os.makedirs(root, exist_ok=True)
    written, report = [], {
        "cpus": os.cpu_count(), "loadavg_1min_before": round(os.getloadavg()[0], 2),
        "seq_len": args.seq_len, "batch": args.batch, "warmup_batches": args.warmup, "timed_batches": args.batches,
        "targets": {"build_s": 2.0, "rss_above_baseline_mb": 100},
    }
    recipe = _recipe_shape(args.recipe)
    base = {"tokenizer": DEFAULT_TOKENIZER_PATH, "warmup": args.warmup, "batches": args.batches,
            "long_batches": args.long_batches}
    for label, tokens in (("large", int(args.tokens)), ("small", int(args.small_tokens))):
        folder = os.path.join(root, f"{tokens // 1_000_000}M")
        start = time.perf_counter()
        files, new = write_shards(folder, tokens, args.shard_tokens, identity)
        if new:
            written.append(folder)
        entry = report[label] = {
            "folder": folder, "tokens": tokens, "gb_on_disk": round(2 * tokens / 1e9, 2), "files": len(files),
            "written_now": new, "write_s": round(time.perf_counter() - start, 1) if new else None,
        }
        shapes = [("train", args.seq_len, args.batch)]
        if label == "large":
            shapes.append(("recipe", recipe["seq_len"], recipe["local_batch"]))
        for shape, seq_len, batch in shapes:
            spec = {**base, "dataset_path": folder, "seq_len": seq_len, "batch": batch}
            for cache in ("cold", "warm"):
                if cache == "cold":
                    evict(files)
                else:
                    entry.setdefault("warm_read_mb_per_s", round(warm(files)))
                resident = cached_fraction(files)
                log(f"{label} ({tokens:,} tokens), seq_len {seq_len} x batch {batch}, page cache {cache} "
                    f"({'?' if resident is None else f'{100 * resident:.0f}%'} of the shards cached)")
                result = run_probe(spec)
                result["shards_cached_before"] = resident
                entry[f"{shape}_{cache}"] = result
                log(f"  build {result['build_s']:.3f} s, {result['samples_per_s']:,.0f} samples/s, RSS above baseline "
                    f"{result['after_build_mib']['rss']} MiB after build, {result['after_batches_mib']['rss']} MiB "
                    f"after {result['batches_read']} batches, {result['after_longer_mib']} MiB after "
                    f"{result['batches_read_longer']}")
    step = args.step_seconds
    large = report["large"]
    report["recipe"] = {
        "recipe": os.path.relpath(os.path.abspath(args.recipe)), **recipe, "step_seconds": step,
        "samples_per_s_needed": round(recipe["global_batch"] / step, 1),
        "tokens_per_s_needed": round(recipe["global_batch"] * recipe["seq_len"] / step),
        "samples_per_s_cold": large["recipe_cold"]["samples_per_s"],
        "samples_per_s_warm": large["recipe_warm"]["samples_per_s"],
        "headroom_cold": round(large["recipe_cold"]["samples_per_s"] * step / recipe["global_batch"]),
        "headroom_warm": round(large["recipe_warm"]["samples_per_s"] * step / recipe["global_batch"]),
    }
    report["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    return report, written


# ---- part 3: text inputs through the text cache -------------------------------------


def text_part(args, tmp: str) -> dict:
    corpus, cache = os.path.join(tmp, "text-corpus"), os.path.join(tmp, "text-cache")
    os.makedirs(corpus)
    start = time.perf_counter()
    nbytes = synthetic_corpus(corpus, args.text_mb, args.text_files)
    log(f"wrote {nbytes / 1e6:.0f} MB of jsonl in {args.text_files} file(s) in {time.perf_counter() - start:.0f} s")
    spec = {"tokenizer": DEFAULT_TOKENIZER_PATH, "dataset_path": os.path.join(corpus, "*.jsonl"),
            "seq_len": args.seq_len, "batch": args.batch, "warmup": args.warmup, "batches": args.batches,
            "long_batches": args.long_batches}
    report = {"corpus_mb": round(nbytes / 1e6, 1), "files": args.text_files,
              "loadavg_1min_before": round(os.getloadavg()[0], 2)}
    for start_kind in ("first_start", "second_start"):
        log(f"text: {start_kind.replace('_', ' ')} ({'empty cache' if start_kind == 'first_start' else 'cache hit'})")
        result = run_probe(spec, env={"TIEDMOE_DATA_CACHE": cache})
        report[start_kind] = result
        log(f"  build {result['build_s']:.2f} s, RSS above baseline {result['after_build_mib']['rss']} MiB "
            f"(peak {result['peak_during_build_mib']} MiB)")
    report["cache_mb"] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs) / 1e6, 1)
    report["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    return report


# ---- main ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tokenize", "shards", "text", "loader", "all"), default="all",
                        help="loader = shards + text")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders and the shards written")
    part1 = parser.add_argument_group("part 1: tokenization")
    part1.add_argument("--mb", type=float, default=24.0)
    part1.add_argument("--files", type=int, default=8)
    part1.add_argument("--tokenizer", default=DEFAULT_TOKENIZER_PATH)
    part1.add_argument("--repeats", type=int, default=2)
    loader = parser.add_argument_group("parts 2 and 3: the loader")
    loader.add_argument("--shards-dir", default=os.path.join(tempfile.gettempdir(), "tiedmoe_data_scale_shards"),
                        help="where the synthetic shards are written, or found from an earlier --keep run")
    loader.add_argument("--tokens", type=float, default=2e9)
    loader.add_argument("--small-tokens", type=float, default=1e7)
    loader.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file (64Mi: 128 MiB)")
    loader.add_argument("--seq-len", type=int, default=4096)
    loader.add_argument("--batch", type=int, default=8)
    loader.add_argument("--warmup", type=int, default=10)
    loader.add_argument("--batches", type=int, default=200)
    loader.add_argument("--long-batches", type=int, default=2000,
                        help="batches read after the timed ones, for RSS on a longer read")
    loader.add_argument("--recipe", default=RECIPE, help="whose step is compared with the loader's throughput")
    loader.add_argument("--step-seconds", type=float, default=0.4,
                        help="that recipe's step time (the fastest seen on 2 cores: the highest demand)")
    loader.add_argument("--text-mb", type=float, default=100.0)
    loader.add_argument("--text-files", type=int, default=1,
                        help="the text cache tokenizes with min(files, cores) workers: 2 uses both of 2 cores")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return

    parts = {"tokenize": ["tokenize"], "shards": ["shards"], "text": ["text"], "loader": ["shards", "text"],
             "all": ["tokenize", "shards", "text"]}[args.part]
    report, ok, written = {}, True, []
    tmp = tempfile.mkdtemp(prefix="tiedmoe_data_scale_")
    try:
        if "tokenize" in parts:
            report["tokenize"], ok = tokenize_part(args)
        if "shards" in parts:
            report["shards"], written = shards_part(args)
        if "text" in parts:
            report["text"] = text_part(args, tmp)
    finally:
        if args.keep:
            log(f"kept {tmp}" + (f" and {', '.join(written)}" if written else ""))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in written:
                shutil.rmtree(folder, ignore_errors=True)
            if written and os.path.isdir(args.shards_dir) and not os.listdir(args.shards_dir):
                os.rmdir(args.shards_dir)
    if args.json:
        print(json.dumps(report))
    else:
        for part, values in report.items():
            print(f"== {part}")
            for key, value in values.items():
                print(f"{key:>24}: {json.dumps(value) if isinstance(value, dict) else value}")
    if not ok:
        sys.exit("the shards of 1 and 2 workers differ")


if __name__ == "__main__":
    main()
