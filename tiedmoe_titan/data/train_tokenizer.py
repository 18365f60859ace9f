"""``tiedmoe-data train-tokenizer``: a SentencePiece model trained on local text files.

    tiedmoe-data train-tokenizer --input 'data/*.jsonl' --vocab-size 2048 --output my_sp2048.model

Models trained here always use byte fallback (any text encodes, nothing maps to
``<unk>``), identity normalization (decode(encode(x)) == x) and fixed special ids:
unk=0, bos=1, eos=2, pad=3 (``tiedmoe_titan.tokenizer``).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence

import sentencepiece as spm

from ..tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentencePieceTokenizer
from .readers import iter_documents
from .sources import resolve_dataset_files




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
