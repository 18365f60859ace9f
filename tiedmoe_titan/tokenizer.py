"""Tokenizers for torchtitan: a SentencePiece ``.model`` or a Hugging Face folder.

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

A SentencePiece model of our own is trained with ``tiedmoe-data train-tokenizer``
(``tiedmoe_titan/data/train_tokenizer.py``), with fixed special ids: unk=0, bos=1,
eos=2, pad=3.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import sentencepiece as spm
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer
from torchtitan.config import JobConfig

from .assets import ASSETS_DIR, DEFAULT_TOKENIZER_PATH  # noqa: F401  (public names)

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
                "retrain it with `tiedmoe-data train-tokenizer` (eos id 2)"
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
