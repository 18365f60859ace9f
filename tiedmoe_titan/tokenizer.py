"""SentencePiece tokenizer for torchtitan, plus an offline trainer.

``build_sentencepiece_tokenizer(job_config)`` is the TrainSpec tokenizer
builder: it loads ``job_config.model.hf_assets_path``, either a ``.model`` file
or a directory holding exactly one.

Training (offline, on local ``.txt``/``.jsonl`` files)::

    python -m tiedmoe_titan.tokenizer train --input 'data/*.jsonl' \\
        --vocab-size 2048 --output my_sp2048.model

Models trained here always use byte fallback (any text encodes, nothing maps
to ``<unk>``), identity normalization (decode(encode(x)) == x) and fixed
special ids: unk=0, bos=1, eos=2, pad=3.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
import sentencepiece as spm
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

from .assets import ASSETS_DIR, DEFAULT_TOKENIZER_PATH  # noqa: F401  (public names)
from .data.readers import iter_documents
from .data.sources import resolve_dataset_files

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class SentencePieceTokenizer(BaseTokenizer):
    """torchtitan ``BaseTokenizer`` over a SentencePiece ``.model`` file.

    Attributes ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id`` come from the model
    (torchtitan's document masking reads ``eos_id``).
    """

    def __init__(self, model_path: str) -> None:
        super().__init__()
        self.model_path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{self.model_path}: the sentencepiece model has no bos/eos piece; "
                "retrain it with `python -m tiedmoe_titan.tokenizer train`"
            )

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, optionally wrapped in bos/eos."""
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``; bos/eos/pad are dropped (they are control pieces)."""
        if hasattr(token_ids, "tolist"):  # torch.Tensor / numpy array
            token_ids = token_ids.tolist()
        return self._sp.decode([int(t) for t in token_ids])

    def get_vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.get_vocab_size()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def resolve_tokenizer_file(hf_assets_path: str | None) -> str:
    """The ``.model`` file named by ``model.hf_assets_path`` (file or directory)."""
    hint = f"set --model.hf_assets_path to a sentencepiece .model file (bundled: {DEFAULT_TOKENIZER_PATH})"
    if not hf_assets_path:
        raise ValueError(f"model.hf_assets_path is not set; {hint}")
    path = os.path.expanduser(str(hf_assets_path))
    if os.path.isdir(path):
        models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
        if len(models) != 1:
            raise ValueError(
                f"model.hf_assets_path='{hf_assets_path}' is a directory with "
                f"{len(models)} .model files {models}, need exactly one; {hint}"
            )
        return os.path.join(path, models[0])
    if not os.path.isfile(path):
        raise ValueError(f"model.hf_assets_path='{hf_assets_path}' does not exist; {hint}")
    if not path.endswith(".model"):
        raise ValueError(f"model.hf_assets_path='{hf_assets_path}' is not a .model file; {hint}")
    return path


def build_sentencepiece_tokenizer(job_config: JobConfig) -> SentencePieceTokenizer:
    """TrainSpec ``build_tokenizer_fn``: load ``job_config.model.hf_assets_path``."""
    return SentencePieceTokenizer(resolve_tokenizer_file(job_config.model.hf_assets_path))


# --------------------------------------------------------------------------- #
# Offline training
# --------------------------------------------------------------------------- #


def _collect_lines(inputs: Sequence[str], log: Callable[[str], None]) -> list[str]:
    """Non-blank lines of all documents; sentencepiece trains on lines."""
    files = resolve_dataset_files(",".join(inputs), "--input")
    log(f"[1/3] reading {len(files)} files")
    lines: list[str] = []
    for path in files:
        n_docs, n_lines, n_chars = 0, 0, 0
        for doc in iter_documents(path):
            n_docs += 1
            for line in doc.split("\n"):
                if line.strip():
                    lines.append(line)
                    n_lines += 1
                    n_chars += len(line)
        log(f"  {path}: {n_docs} documents, {n_lines} lines, {n_chars} chars")
    if not lines:
        raise ValueError(f"--input {list(inputs)}: no text found")
    return lines


def train_sentencepiece(
    inputs: Sequence[str],
    vocab_size: int,
    output: str,
    model_type: str = "bpe",
    num_threads: int = 2,
    log: Callable[[str], None] = print,
) -> str:
    """Train a SentencePiece model on local files and write it to ``output``.

    Deterministic for a given input (all lines are used, no sampling).
    Returns the output path.
    """
    if not output.endswith(".model"):
        raise ValueError(f"--output '{output}' must end in .model")
    if output.endswith("tokenizer.model"):
        # torchtitan's ConfigManager rejects hf_assets_path ending in tokenizer.model
        raise ValueError(f"--output '{output}' must not end in 'tokenizer.model' (torchtitan rejects it)")
    lines = _collect_lines(inputs, log)
    log(f"[2/3] training {model_type} vocab {vocab_size} on {len(lines)} lines")
    start = time.time()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        character_coverage=0.9995,
        # identity + keeping whitespace makes decode(encode(x)) == x
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=0,
        num_threads=num_threads,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "wb") as f:
        f.write(model.getvalue())
    tok = SentencePieceTokenizer(output)
    sample = "\n".join(lines[:2000])
    ratio = len(sample) / max(len(tok.encode(sample, add_bos=False, add_eos=False)), 1)
    log(
        f"[3/3] wrote {output} in {time.time() - start:.1f}s: vocab {tok.get_vocab_size()}, "
        f"unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}, "
        f"{ratio:.2f} chars/token on the first {min(len(lines), 2000)} lines"
    )
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: ``python -m tiedmoe_titan.tokenizer train ...``."""
    parser = argparse.ArgumentParser(prog="python -m tiedmoe_titan.tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model on local .txt/.jsonl files")
    train.add_argument("--input", action="append", required=True, metavar="GLOB",
                       help="file glob (.txt: blank-line-separated documents, .jsonl: 'text' field); repeatable")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, metavar="PATH.model")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        train_sentencepiece(args.input, args.vocab_size, args.output, args.model_type, args.num_threads)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
