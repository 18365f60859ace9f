"""Tests for tiedmoe_titan.tokenizer (bundled model, builder) and `tiedmoe-data train-tokenizer`."""

import json
import os
import pickle
import shutil

import pytest
from torchtitan.config import JobConfig

from tiedmoe_titan.tokenizer import (
    BOS_ID,
    DEFAULT_TOKENIZER_PATH,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SentencePieceTokenizer,
    build_sentencepiece_tokenizer,
)
from tiedmoe_titan.data.cli import main


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)


def _job_config(hf_assets_path):
    cfg = JobConfig()
    cfg.model.hf_assets_path = hf_assets_path
    return cfg


def test_bundled_model_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 2048 == tok.vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert not os.path.basename(DEFAULT_TOKENIZER_PATH).endswith("tokenizer.model")


@pytest.mark.parametrize(
    "text",
    [
        "Return a shallow copy of the list.",
        "  indented\n\tcode:\n\n    x = f(1, 2)  ",
        "Unicode via byte fallback: \u2603 \u65e5\u672c\u8a9e \U0001F600 caf\u00e9",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback: nothing is unknown
    assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_bos_eos_flags(tok):
    body = tok.encode("hello world", add_bos=False, add_eos=False)
    assert BOS_ID not in body and EOS_ID not in body
    assert tok.encode("hello world") == [BOS_ID] + body + [EOS_ID]
    assert tok.encode("hello world", add_eos=False) == [BOS_ID] + body
    assert tok.encode("hello world", add_bos=False) == body + [EOS_ID]


def test_decode_accepts_tensor_and_pickles(tok):
    import torch

    ids = tok.encode("pickle me")
    assert tok.decode(torch.tensor(ids)) == "pickle me"
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers may pickle it
    assert clone.encode("pickle me") == ids


def test_builder_accepts_file_and_single_model_directory(tmp_path):
    assert build_sentencepiece_tokenizer(_job_config(DEFAULT_TOKENIZER_PATH)).get_vocab_size() == 2048
    shutil.copy(DEFAULT_TOKENIZER_PATH, tmp_path / "sp.model")
    (tmp_path / "config.json").write_text("{}")  # other HF assets may live alongside
    assert build_sentencepiece_tokenizer(_job_config(str(tmp_path))).eos_id == EOS_ID


@pytest.mark.parametrize("case", ["missing", "unset", "empty_dir", "two_models", "not_model"])
def test_builder_errors_name_the_setting(tmp_path, case):
    path = {
        "missing": str(tmp_path / "nope.model"),
        "unset": "",
        "empty_dir": str(tmp_path),
        "two_models": str(tmp_path),
        "not_model": str(tmp_path / "vocab.txt"),
    }[case]
    if case == "two_models":
        shutil.copy(DEFAULT_TOKENIZER_PATH, tmp_path / "a.model")
        shutil.copy(DEFAULT_TOKENIZER_PATH, tmp_path / "b.model")
    if case == "not_model":
        (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        build_sentencepiece_tokenizer(_job_config(path))
    msg = str(err.value)
    assert "model.hf_assets_path" in msg and "\n" not in msg


def test_cli_trains_a_working_model(tmp_path, capsys):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[i:] + words[:i]) + f" number {i}." for i in range(len(words))]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "b.txt").write_text("\n\n".join(docs) + "\n")
    out = tmp_path / "out" / "tiny.model"
    rc = main(["train-tokenizer", "--input", str(tmp_path / "*.jsonl"), "--input", str(tmp_path / "*.txt"),
               "--vocab-size", "300", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "12 documents" in printed and "[3/3] wrote" in printed
    tok = SentencePieceTokenizer(str(out))
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode(docs[3] + " \u2603")) == docs[3] + " \u2603"


def test_cli_rejects_bad_output_and_missing_input(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n")
    bad_out = main(["train-tokenizer", "--input", str(tmp_path / "a.txt"), "--vocab-size", "300",
                    "--output", str(tmp_path / "tokenizer.model")])
    missing = main(["train-tokenizer", "--input", str(tmp_path / "*.jsonl"), "--vocab-size", "300",
                    "--output", str(tmp_path / "x.model")])
    err = capsys.readouterr().err
    assert bad_out == 2 and missing == 2
    assert "tokenizer.model" in err and "matched no files" in err


# ------------------------------------------------------------------ Hugging Face folders

from tiny_bpe import EOS, make_hf_tokenizer  # noqa: E402

from tiedmoe_titan.tokenizer import HFTokenizer, load_tokenizer, tokenizer_identity  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_hf_folder_loads_with_its_eos_and_no_bos(hf_dir):
    tok = build_sentencepiece_tokenizer(_job_config(hf_dir))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok.tokenizer.token_to_id(EOS) and tok.bos_id is None
    body = tok.encode("alpha beta", add_bos=False, add_eos=False)
    assert tok.encode("alpha beta") == body + [tok.eos_id]  # no bos, as OLMoE / Qwen3
    assert tok.decode(tok.encode("alpha beta \u2603")) == "alpha beta \u2603"
    assert pickle.loads(pickle.dumps(tok)).encode("gamma") == tok.encode("gamma")


def test_hf_bos_policy_matches_sentencepiece(tmp_path, tok):
    with_bos = load_tokenizer(make_hf_tokenizer(tmp_path / "b", bos="<s>"))
    body = with_bos.encode("alpha", add_bos=False, add_eos=False)
    assert with_bos.encode("alpha") == [with_bos.bos_id] + body + [with_bos.eos_id]
    assert tok.encode("alpha")[0] == BOS_ID  # the bundled model keeps its bos
    same = load_tokenizer(make_hf_tokenizer(tmp_path / "s", bos=EOS))  # bos == eos: no bos
    assert same.bos_id is None and same.encode("alpha")[-1] == same.eos_id


def test_tokenizer_without_eos_is_refused_in_one_line(tmp_path):
    folder = make_hf_tokenizer(tmp_path / "noeos", eos=None)
    with pytest.raises(ValueError) as err:
        load_tokenizer(folder)
    msg = str(err.value)
    assert "model.hf_assets_path" in msg and "eos_token" in msg and "\n" not in msg


def test_identity_tells_tokenizers_apart(tmp_path, hf_dir, tok):
    a = tokenizer_identity(load_tokenizer(hf_dir))
    other = tokenizer_identity(load_tokenizer(make_hf_tokenizer(tmp_path / "o", extra_specials=("<x>",))))
    assert a["kind"] == "huggingface" and a["vocab_size"] == 320 and a["eos_id"] is not None
    assert a["sha256"] != other["sha256"]
    assert tokenizer_identity(tok)["kind"] == "sentencepiece"
    assert tokenizer_identity(tok) == tokenizer_identity(load_tokenizer(DEFAULT_TOKENIZER_PATH))
