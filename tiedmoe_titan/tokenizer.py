"""Tokenizers for torchtitan: a SentencePiece ``.model`` or a Hugging Face folder,
plus an offline SentencePiece trainer.

``model.hf_assets_path`` names either

* a SentencePiece ``.model`` file, or a directory holding exactly one; or
* a Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``),
  loaded by torchtitan's ``HuggingFaceTokenizer``, which reads bos/eos only from
  ``tokenizer_config.json``.  A folder with a ``tokenizer.json`` is always read
  as Hugging Face, even if it also holds a ``.model``.

Document boundaries, the same rule for both kinds: every document ends with the
tokenizer's eos, and starts with its bos only if it has one that is not the eos.
The bundled SentencePiece model has a bos, so its documents stay
``[bos] + tokens + [eos]`` (the documented loss curves are unchanged); OLMoE's and
Qwen3's tokenizers have none (or bos == eos), so theirs are ``tokens + [eos]``, as
they were pretrained.  A tokenizer without an eos is refused: nothing else would
mark where one document ends and the next begins.

Training (offline, on local ``.txt``/``.jsonl`` files)::

    python -m tiedmoe_titan.tokenizer train --input 'data/*.jsonl' \\
        --vocab-size 2048 --output my_sp2048.model

Models trained here always use byte fallback (any text encodes, nothing maps
to ``<unk>``), identity normalization (decode(encode(x)) == x) and fixed
special ids: unk=0, bos=1, eos=2, pad=3.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from collections.abc import Callable, Sequence

import sentencepiece as spm
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer
from torchtitan.config import JobConfig

from .assets import ASSETS_DIR, DEFAULT_TOKENIZER_PATH  # noqa: F401  (public names)
from .data.readers import iter_documents
from .data.sources import resolve_dataset_files

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
HF_FILES = ("tokenizer.json", "tokenizer_config.json")  # what identifies an HF tokenizer


def wrap_document(ids: list[int], bos_id: int | None, eos_id: int, add_bos: bool, add_eos: bool) -> list[int]:
    """The one document-boundary rule (module docstring): ``[bos] + ids + [eos]``,
    without the bos when the tokenizer has none."""
    return ([bos_id] if add_bos and bos_id is not None else []) + ids + ([eos_id] if add_eos else [])


class SentencePieceTokenizer(BaseTokenizer):
    """torchtitan ``BaseTokenizer`` over a SentencePiece ``.model`` file.

    Attributes ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id`` come from the model
    (torchtitan's document masking reads ``eos_id``); ``bos_id`` is None when the
    model has no bos piece.
    """

    def __init__(self, model_path: str) -> None:
        super().__init__()
        self.model_path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        bos = self._sp.bos_id()
        self.bos_id: int | None = bos if bos >= 0 else None
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        if self.eos_id < 0:
            raise ValueError(
                f"{self.model_path}: the sentencepiece model has no eos piece, which separates documents; "
                "retrain it with `tiedmoe-tokenizer train` (eos id 2)"
            )

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, optionally wrapped in bos/eos (:func:`wrap_document`)."""
        return wrap_document(self._sp.encode(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Whole documents (bos/eos by :func:`wrap_document`), on this thread only:
        offline tokenization runs one process per core."""
        return [wrap_document(ids, self.bos_id, self.eos_id, True, True) for ids in self._sp.encode(texts, num_threads=1)]

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


class HFTokenizer(HuggingFaceTokenizer):
    """torchtitan's ``HuggingFaceTokenizer`` (a folder; bos/eos from ``tokenizer_config.json``)
    with this project's document boundaries.

    torchtitan's ``encode`` adds bos/eos by the config's ``add_bos_token`` flags or
    when the tokenizer's own post-processor adds them; here the tokenizer adds no
    special token and :func:`wrap_document` does, as for SentencePiece.  A bos that
    is the eos (GPT-NeoX style, e.g. OLMo) counts as no bos.
    """

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.model_path = str(folder)
        eos = self._get_token_from_config(self.config, "eos_token") if self.config else None
        if self.eos_id is None and eos is not None:
            # torchtitan matches a special token to bos *or* eos, so when both name the same
            # token (GPT-NeoX / OLMo style) only bos_id is set; the eos is that token too.
            self.eos_id, self.eos_token = self.tokenizer.token_to_id(eos), eos
        if self.eos_id is None:
            raise ValueError(
                f"{folder}: tokenizer_config.json names no eos_token found in the vocabulary, and documents are "
                "separated by it; add \"eos_token\": \"<the end-of-text token>\" to tokenizer_config.json"
            )
        if self.bos_id == self.eos_id:
            self.bos_id = None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, optionally wrapped in bos/eos (:func:`wrap_document`)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return wrap_document(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Whole documents (bos/eos by :func:`wrap_document`); one thread when the
        caller set ``RAYON_NUM_THREADS=1`` before the first batch (``tiedmoe-data tokenize`` does)."""
        return [wrap_document(e.ids, self.bos_id, self.eos_id, True, True)
                for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens dropped (as SentencePiece does)."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))


def resolve_tokenizer_file(hf_assets_path: str | None, key: str = "model.hf_assets_path") -> str:
    """What ``model.hf_assets_path`` names: a ``.model`` file, or a Hugging Face folder."""
    hint = (
        f"set --{key} to a sentencepiece .model file (bundled: {DEFAULT_TOKENIZER_PATH}) "
        "or a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json)"
    )
    if not hf_assets_path:
        raise ValueError(f"{key} is not set; {hint}")
    path = os.path.expanduser(str(hf_assets_path))
    if is_hf_folder(path):
        if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            raise ValueError(
                f"{key}='{hf_assets_path}' has tokenizer.json but no tokenizer_config.json, "
                "where bos/eos are read from; copy it from the model's folder"
            )
        return path
    if os.path.isdir(path):
        models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
        if len(models) != 1:
            raise ValueError(
                f"{key}='{hf_assets_path}' is a directory with no tokenizer.json and "
                f"{len(models)} .model files {models}, need exactly one; {hint}"
            )
        return os.path.join(path, models[0])
    if not os.path.isfile(path):
        raise ValueError(f"{key}='{hf_assets_path}' does not exist; {hint}")
    if not path.endswith(".model"):
        raise ValueError(f"{key}='{hf_assets_path}' is not a .model file; {hint}")
    return path


def load_tokenizer(hf_assets_path: str | None, key: str = "model.hf_assets_path") -> SentencePieceTokenizer | HFTokenizer:
    """The tokenizer ``hf_assets_path`` names; every refusal is one line naming ``key``."""
    path = resolve_tokenizer_file(hf_assets_path, key)
    try:
        return HFTokenizer(path) if os.path.isdir(path) else SentencePieceTokenizer(path)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    except Exception as e:  # a corrupt file: sentencepiece / tokenizers say why in their own words
        raise ValueError(f"{key}='{hf_assets_path}' cannot be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); point it at a valid tokenizer") from None


def tokenizer_files(path: str) -> list[str]:
    """The files that make a tokenizer what it is (what its hash covers)."""
    if os.path.isdir(path):
        return [os.path.join(path, name) for name in HF_FILES]
    return [path]


def tokenizer_identity(tokenizer: SentencePieceTokenizer | HFTokenizer) -> dict:
    """What token files record of the tokenizer that made them: kind, vocabulary size,
    special ids, and a sha256 over its files (names and bytes), which tells two
    tokenizers of the same size apart."""
    digest = hashlib.sha256()
    for file in tokenizer_files(tokenizer.model_path):
        digest.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return {
        "kind": "huggingface" if isinstance(tokenizer, HFTokenizer) else "sentencepiece",
        "vocab_size": tokenizer.get_vocab_size(),
        "sha256": digest.hexdigest(),
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
    }


def build_tokenizer(job_config: JobConfig) -> SentencePieceTokenizer | HFTokenizer:
    """TrainSpec ``build_tokenizer_fn``: load ``job_config.model.hf_assets_path``."""
    return load_tokenizer(job_config.model.hf_assets_path)


build_sentencepiece_tokenizer = build_tokenizer  # its name before Hugging Face folders


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
