"""``tiedmoe-data``: the data commands (``python -m tiedmoe_titan.data`` is the same)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..assets import DEFAULT_CORPUS_DIR
from ..assets.stdlib_corpus import build_stdlib_corpus


def main(argv: Sequence[str] | None = None) -> int:
    """``tiedmoe-data build-corpus [--output-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="tiedmoe-data")
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
