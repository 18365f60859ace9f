"""``tiedmoe-data``: the data commands (``python -m tiedmoe_titan.data`` is the same).

Every refusal is one line naming the path and the fix, exit code 2 (docs/data.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..assets import DEFAULT_CORPUS_DIR
from ..assets.stdlib_corpus import build_stdlib_corpus
from .shard_format import DTYPES
from .sidecar import describe
from .tokenize import DEFAULT_DOCS_PER_SHARD, finalize, tokenize
from .train_tokenizer import train_sentencepiece

PROG = "tiedmoe-data"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-corpus", help="extract stdlib docstrings to jsonl")
    build.add_argument("--output-dir", default=DEFAULT_CORPUS_DIR)
    build.add_argument("--valid-every", type=int, default=20)
    build.add_argument("--min-chars", type=int, default=200)
    build.add_argument("--max-bytes", type=int, default=2_000_000)

    tok = sub.add_parser("tokenize", help="tokenize text files into a folder of token shards")
    tok.add_argument("--input", action="append", required=True, metavar="GLOB",
                     help=".txt / .jsonl / .jsonl.gz / .jsonl.zst / .parquet glob; repeatable")
    tok.add_argument("--tokenizer", required=True, metavar="PATH",
                     help="SentencePiece .model or Hugging Face tokenizer folder (what model.hf_assets_path takes)")
    tok.add_argument("--output-dir", required=True)
    tok.add_argument("--workers", type=int, default=None, help="worker processes (default: every core)")
    tok.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD)
    tok.add_argument("--task-index", type=int, default=0, help="this task's number, e.g. $SLURM_ARRAY_TASK_ID")
    tok.add_argument("--num-tasks", type=int, default=1, help="tasks sharing the inputs; then run finalize")

    fin = sub.add_parser("finalize", help="write metadata.json once every tokenize task is done")
    fin.add_argument("output_dir")

    desc = sub.add_parser("describe", help="write metadata.json for existing OLMo-core / Dolma token files")
    desc.add_argument("--input", action="append", required=True, metavar="GLOB", help="token files (one folder)")
    desc.add_argument("--tokenizer", required=True, metavar="PATH")
    desc.add_argument("--dtype", required=True, choices=sorted(DTYPES))

    train = sub.add_parser("train-tokenizer", help="train a SentencePiece model on local .txt/.jsonl files")
    train.add_argument("--input", action="append", required=True, metavar="GLOB",
                       help="file glob (.txt: blank-line-separated documents, .jsonl: 'text' field); repeatable")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, metavar="PATH.model")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--num-threads", type=int, default=2)

    args = parser.parse_args(argv)
    try:
        if args.command == "build-corpus":
            build_stdlib_corpus(args.output_dir, args.valid_every, args.min_chars, args.max_bytes)
        elif args.command == "tokenize":
            tokenize(args.input, args.tokenizer, args.output_dir, args.workers, args.docs_per_shard,
                     args.task_index, args.num_tasks)
        elif args.command == "train-tokenizer":
            train_sentencepiece(args.input, args.vocab_size, args.output, args.model_type, args.num_threads)
        elif args.command == "finalize":
            finalize(args.output_dir)
        else:
            describe(args.input, args.tokenizer, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
