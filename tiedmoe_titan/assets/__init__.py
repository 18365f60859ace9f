"""Where the bundled corpus and tokenizer live (README.md here says how they were made).

A module of its own so that the data and tokenizer code both find the assets
without importing each other.
"""

import os
from pathlib import Path

ASSETS_DIR = str(Path(__file__).resolve().parent)
DEFAULT_CORPUS_DIR = os.path.join(ASSETS_DIR, "corpus")
DEFAULT_TRAIN_PATH = os.path.join(DEFAULT_CORPUS_DIR, "train.jsonl")
DEFAULT_VALID_PATH = os.path.join(DEFAULT_CORPUS_DIR, "valid.jsonl")
DEFAULT_TOKENIZER_PATH = os.path.join(ASSETS_DIR, "tokenizer", "debug_sp2048.model")
