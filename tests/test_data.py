"""Tests for tiedmoe_titan.data: reading text, the text cache, token shards, the
global sample order (shuffle, mixture, data-parallel split), exact resume, refusals."""

import contextlib
import json
import logging
import os
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from tiny_bpe import make_hf_tokenizer
from torchtitan.components.dataloader import ParallelAwareDataloader

from tiedmoe_titan.config import job_config_class
from tiedmoe_titan.data import (
    DEFAULT_CORPUS_DIR,
    DEFAULT_TRAIN_PATH,
    DEFAULT_VALID_PATH,
    MixtureSchedule,
    ShardDataset,
    ShardSource,
    TokenShards,
    build_local_text_dataloader,
    build_local_validation_dataloader,
    build_local_validator,
    check_data,
    iter_documents,
    open_sources,
    resolve_dataset_files,
)
from tiedmoe_titan.data.permutation import Permutation
from tiedmoe_titan.data.shard_format import metadata, write_json_atomic
from tiedmoe_titan.data.text_cache import cache_folder
from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer, load_tokenizer, tokenizer_identity

SEQ_LEN = 16
WIDTH = SEQ_LEN + 1


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)


def _docs(n, start=0):
    """Distinct documents of varying length, some spanning several samples."""
    return [f"Document {i} says: " + " ".join(f"fox{i}x{j}" for j in range(3 + 2 * (i % 5))) for i in range(start, start + n)]


def _stream(tok, docs):
    return [t for d in docs for t in tok.encode(d, add_bos=True, add_eos=True)]


def make_shards(folder, arrays, tok, dtype="uint16"):
    """A shard folder holding ``arrays`` (one shard each), recorded as made by ``tok``."""
    os.makedirs(folder, exist_ok=True)
    shards = []
    for i, array in enumerate(arrays):
        name = f"{i:06d}-0000.bin"
        np.asarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tofile(os.path.join(folder, name))
        shards.append({"file": name, "tokens": len(array), "documents": 1, "source": "test"})
    write_json_atomic(os.path.join(folder, "metadata.json"), metadata(tokenizer_identity(tok), dtype, shards, []))
    return str(folder)


def _job_config(path, batch_size=2, val_path=None, num_workers=0, global_batch=-1):
    cfg = job_config_class()()
    cfg.training.dataset_path = path
    cfg.training.seq_len = SEQ_LEN
    cfg.training.local_batch_size = batch_size
    cfg.training.global_batch_size = global_batch
    cfg.training.dataloader.num_workers = num_workers
    cfg.validation.dataset_path = val_path if val_path is not None else path
    cfg.validation.seq_len = SEQ_LEN
    cfg.validation.local_batch_size = batch_size
    return cfg


def _take(loader, n):
    out, it = [], iter(loader)
    for _ in range(n):
        inputs, labels = next(it)
        out.append(torch.cat([inputs["input"], labels[:, -1:]], dim=1))
    return out


# ------------------------------------------------------------------ reading text


def test_txt_blocks_and_jsonl_lines(tmp_path):
    (tmp_path / "d.txt").write_text("one\nstill one\n\n\n  \ntwo\n\nthree")
    assert list(iter_documents(str(tmp_path / "d.txt"))) == ["one\nstill one", "two", "three"]
    (tmp_path / "d.jsonl").write_text('{"text": "a\\n\\nb"}\n\n{"text": ""}\n{"text": "c", "id": 3}\n')
    assert list(iter_documents(str(tmp_path / "d.jsonl"))) == ["a\n\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def _write_parquet(path, columns, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)


def test_parquet_documents_skip_nulls_and_blanks(tmp_path):
    docs = _docs(7)
    texts = docs[:3] + [None, "", "  "] + docs[3:]
    _write_parquet(tmp_path / "p.parquet", {"id": list(range(len(texts))), "text": texts})
    assert list(iter_documents(str(tmp_path / "p.parquet"))) == docs
    _write_parquet(tmp_path / "bad.parquet", {"body": ["a", "b"], "id": [1, 2]})
    with pytest.raises(ValueError) as err:
        list(iter_documents(str(tmp_path / "bad.parquet")))
    assert str(err.value) == f"{tmp_path}/bad.parquet: no 'text' column (it has: body, id)"


def test_bundled_corpus_is_small_real_and_split():
    sizes = [os.path.getsize(p) for p in (DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH)]
    assert 1_000_000 <= sum(sizes) <= 2_000_000
    assert os.path.dirname(DEFAULT_TRAIN_PATH) == DEFAULT_CORPUS_DIR
    sources = {}
    for path in (DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH):
        with open(path, encoding="utf-8") as f:
            sources[path] = {json.loads(line)["source"] for line in f}
    assert not sources[DEFAULT_TRAIN_PATH] & sources[DEFAULT_VALID_PATH]
    assert len(sources[DEFAULT_VALID_PATH]) >= 10


# ------------------------------------------------------------------ text through the cache


def test_text_is_tokenized_once_into_the_cache_as_packed_documents(tok, tmp_path, monkeypatch):
    """.jsonl, .txt and .parquet of one source become one stream of bos + doc + eos, in
    glob order; a second open reads the cache, and an edit or another tokenizer makes a
    new cache folder."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(9)))
    (tmp_path / "b.txt").write_text("\n\n".join(_docs(4, start=9)) + "\n")
    _write_parquet(tmp_path / "c.parquet", {"text": _docs(3, start=13)})
    path = f"{tmp_path}/*.jsonl,{tmp_path}/*.txt,{tmp_path}/*.parquet"
    logs = []
    (source,) = open_sources(path, tok, "training.dataset_path", log=logs.append)
    assert source.shards.read(0, source.shards.num_tokens).tolist() == _stream(tok, _docs(16))
    assert any("tokenizing 3 text file(s) once into the data cache" in m for m in logs)

    import tiedmoe_titan.data.text_cache as text_cache

    monkeypatch.setattr(text_cache, "tokenize", lambda *a, **k: pytest.fail("tokenized again"))
    again = open_sources(path, tok, "training.dataset_path", log=logs.append)
    assert again[0].shards.folders == source.shards.folders
    monkeypatch.undo()

    files = resolve_dataset_files(path, "training.dataset_path")
    before = cache_folder(files, tok)
    (tmp_path / "b.txt").write_text("\n\n".join(_docs(5, start=9)) + "\n")
    assert cache_folder(files, tok) != before
    hf = load_tokenizer(make_hf_tokenizer(tmp_path / "hf"))
    assert cache_folder(files, hf) != cache_folder(files, tok)


# ------------------------------------------------------------------ the global order


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        for seed in (0, 1):
            assert sorted(Permutation(n, seed)(np.arange(n)).tolist()) == list(range(n))
    a, b = Permutation(1000, 0)(np.arange(1000)), Permutation(1000, 1)(np.arange(1000))
    assert not np.array_equal(a, b) and np.array_equal(a, Permutation(1000, 0)(np.arange(1000)))
    assert (a == np.arange(1000)).sum() < 10  # not the identity, nor close to it
    big = Permutation(10**12, 3)  # a trillion samples: nothing stored, O(1) per index
    assert 0 <= int(big(10**12 - 1)) < 10**12


def _arange_source(tmp_path, tok, n_tokens, name="data", weight=Fraction(1), start=0, parts=3):
    """A source whose token i is ``start + i``, split over ``parts`` shards."""
    tokens = np.arange(start, start + n_tokens)
    folder = make_shards(tmp_path / f"shards-{name}", np.array_split(tokens, parts), tok, dtype="uint32")
    return ShardSource(name, weight, TokenShards([folder], "training.dataset_path"))


def _sample_ids(dataset, n):
    """Which sample (start token // WIDTH) each of the first n yielded samples is."""
    out = []
    for (inputs, labels), _ in zip(dataset, range(n)):
        x = inputs["input"]
        assert torch.equal(x[1:], labels[:-1]) and x.dtype == torch.long
        assert int(x[0]) % WIDTH == 0 and torch.equal(x, torch.arange(int(x[0]), int(x[0]) + SEQ_LEN))
        out.append(int(x[0]) // WIDTH)
    return out


def test_shuffled_epochs_read_every_sample_once_in_a_new_order(tok, tmp_path):
    source = _arange_source(tmp_path, tok, 50 * WIDTH + 5)  # 50 samples, windows cross shard ends
    ds = ShardDataset([source], SEQ_LEN, local_batch_size=1, shuffle=True, seed=0)
    first, second = _sample_ids(ds, 100)[:50], _sample_ids(ds, 100)[50:]
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second and first != list(range(50))
    unshuffled = ShardDataset([source], SEQ_LEN, local_batch_size=1, shuffle=False)
    assert _sample_ids(unshuffled, 60) == list(range(50)) + list(range(10))
    assert _sample_ids(ShardDataset([source], SEQ_LEN, 1, shuffle=True, seed=1), 50) != first


def test_each_rank_takes_its_slice_of_every_micro_batch(tok, tmp_path):
    """dp ranks x local batch reads the same global samples as one rank with the whole
    micro-batch: rank r's i-th batch is slice r of global micro-batch i."""
    source = _arange_source(tmp_path, tok, 40 * WIDTH)
    whole = _sample_ids(ShardDataset([source], SEQ_LEN, local_batch_size=6), 36)
    for r in range(3):
        part = _sample_ids(ShardDataset([source], SEQ_LEN, local_batch_size=2, dp_rank=r, dp_world_size=3), 12)
        assert part == [whole[6 * m + 2 * r + j] for m in range(6) for j in range(2)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_resume_continues_exactly_across_epochs(tok, tmp_path, num_workers, weighted):
    """A loader's state after k batches, loaded into a new loader, gives exactly the
    batches the first would have given next, with loader workers too, past epochs."""
    a = make_shards(tmp_path / "a", [np.arange(23 * WIDTH)], tok)
    b = make_shards(tmp_path / "b", [np.arange(1000, 1000 + 9 * WIDTH)], tok)
    path = f"web=0.7:{a},notes=0.3:{b}" if weighted else f"{a},{b}"
    cfg = _job_config(path, num_workers=num_workers)
    reference_loader = build_local_text_dataloader(2, 1, tok, cfg)
    assert isinstance(reference_loader, ParallelAwareDataloader)
    n_batches = 40  # 160 global samples: several epochs of every source
    reference = _take(reference_loader, n_batches)
    for cut in (3, 17):
        loader = build_local_text_dataloader(2, 1, tok, cfg)
        _take(loader, cut)
        state = loader.state_dict()
        resumed = build_local_text_dataloader(2, 1, tok, cfg)
        resumed.load_state_dict(state)
        assert [torch.equal(x, y) for x, y in zip(reference[cut:], _take(resumed, n_batches - cut))] == [True] * (n_batches - cut)


def test_position_is_global_and_resumes_on_another_data_parallel_size(tok, tmp_path):
    """The state is the same on every rank; 2 ranks x 2 samples resumed as 1 rank x 4
    (or 1 x 2 with 2 micro-batches) read exactly the samples the 2 ranks would have."""
    source = make_shards(tmp_path / "s", [np.arange(64 * WIDTH)], tok, dtype="uint32")
    cfg = _job_config(source, batch_size=2)
    loaders = [build_local_text_dataloader(2, r, tok, cfg) for r in range(2)]
    for loader in loaders:
        _take(loader, 5)
    states = [loader.state_dict() for loader in loaders]
    assert states[0] == states[1] and json.loads(states[0]["position"])["consumed_samples"] == 20
    next_two = [_take(loader, 2) for loader in loaders]  # a new iterator goes on from the position
    fresh = [build_local_text_dataloader(2, r, tok, cfg) for r in range(2)]
    for loader in fresh:
        loader.load_state_dict(states[0])
    resumed = [_take(loader, 2) for loader in fresh]
    expected = [torch.cat([next_two[0][i], next_two[1][i]]) for i in range(2)]
    assert all(torch.equal(e, torch.cat([resumed[0][i], resumed[1][i]])) for i, e in enumerate(expected))

    one = build_local_text_dataloader(1, 0, tok, _job_config(source, batch_size=4))
    one.load_state_dict(states[0])
    assert all(torch.equal(x, e) for x, e in zip(_take(one, 2), expected))
    accumulate = build_local_text_dataloader(1, 0, tok, _job_config(source, batch_size=2))
    accumulate.load_state_dict(states[0])
    assert torch.equal(torch.cat(_take(accumulate, 4)), torch.cat(expected))


# ------------------------------------------------------------------ mixtures


def test_mixture_schedule_stays_within_one_sample_of_the_weights():
    rng = random.Random(0)
    for _ in range(20):
        raw = [Fraction(rng.randint(1, 50)) for _ in range(rng.randint(1, 8))]
        weights = [w / sum(raw) for w in raw]
        schedule, counts = MixtureSchedule(weights), [0] * len(weights)
        for n in range(1, 201):
            counts[schedule.pick(counts)] += 1
            assert all(abs(c - n * w) < 1 for c, w in zip(counts, weights))


def test_mixture_on_shards_realises_the_weights_and_reloops_each_source(tok, tmp_path):
    sources = [
        _arange_source(tmp_path, tok, 30 * WIDTH, "a", Fraction(1, 2), start=0),
        _arange_source(tmp_path, tok, 4 * WIDTH, "b", Fraction(1, 5), start=100_000),
        _arange_source(tmp_path, tok, 20 * WIDTH, "c", Fraction(3, 10), start=200_000),
    ]
    ds = ShardDataset(sources, SEQ_LEN, local_batch_size=1, shuffle=True)
    counts = {"a": [], "b": [], "c": []}
    for n, (inputs, _) in enumerate(ds, start=1):
        first = int(inputs["input"][0])
        name = "abc"[first // 100_000]
        counts[name].append((first % 100_000) // WIDTH)
        for s, w in (("a", 0.5), ("b", 0.2), ("c", 0.3)):
            assert abs(len(counts[s]) - round(w * n)) <= 1, n
        if n == 200:
            break
    assert [len(v) for v in counts.values()] == [100, 40, 60]
    for i in range(10):  # 'b' re-looped 10 times, every epoch a permutation of its 4 samples
        assert sorted(counts["b"][4 * i : 4 * i + 4]) == [0, 1, 2, 3]


def test_changed_weights_resume_each_source_where_it_stopped(tok, tmp_path, caplog):
    a = make_shards(tmp_path / "a", [np.arange(40 * WIDTH)], tok, dtype="uint32")
    b = make_shards(tmp_path / "b", [np.arange(100_000, 100_000 + 40 * WIDTH)], tok, dtype="uint32")
    loader = build_local_text_dataloader(1, 0, tok, _job_config(f"a=0.5:{a},b=0.5:{b}"))
    _take(loader, 5)
    state = loader.state_dict()
    draws = {k: v["draws"] for k, v in json.loads(state["position"])["sources"].items()}
    assert draws == {"a": 5, "b": 5}
    heavier_b = build_local_text_dataloader(1, 0, tok, _job_config(f"a=0.1:{a},b=0.9:{b}"))
    with caplog.at_level(logging.WARNING):
        heavier_b.load_state_dict(state)
    assert any("sources/weights" in m and "interleaving starts afresh" in m for m in caplog.messages)
    assert heavier_b.position.draws == [5, 5]
    ids = [int(x[0]) // 100_000 for x in torch.cat(_take(heavier_b, 10))]
    assert ids.count(1) == 18 and heavier_b.position.draws == [7, 23]  # 18 of the next 20 from b


# ------------------------------------------------------------------ validation


def test_validation_reads_in_order_restarts_each_pass_and_drops_a_partial_batch(tok, tmp_path):
    source = make_shards(tmp_path / "v", [np.arange(11 * WIDTH + 3)], tok, dtype="uint32")
    cfg = _job_config(source, batch_size=2)
    loaders = [build_local_validation_dataloader(2, r, tok, cfg) for r in range(2)]
    passes = [[torch.cat([x["input"], y[:, -1:]], 1) for x, y in loader] for loader in loaders]
    assert [len(p) for p in passes] == [2, 2]  # 11 samples: two micro-batches of 4, on both ranks
    starts = [int(b[i, 0]) // WIDTH for m in range(2) for b in (passes[0][m], passes[1][m]) for i in range(2)]
    assert starts == list(range(8))  # file order, rank 0's slice then rank 1's
    again = [torch.cat([x["input"], y[:, -1:]], 1) for x, y in loaders[0]]
    assert all(torch.equal(a, b) for a, b in zip(passes[0], again))


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)

    def get_attention_masks(self, **kwargs):
        raise TypeError("no flex attention")  # torchtitan's Validator catches TypeError

    def forward(self, tokens):
        return self.out(self.emb(tokens))


class _Metrics:
    ntokens_since_last_log = 0

    def __init__(self):
        self.logged = []

    def log_validation(self, loss, step):
        self.logged.append((step, loss))


def test_validator_reuses_torchtitan_class_with_local_data(tok, monkeypatch):
    from torchtitan.components import validate as tt_validate
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed import ParallelDims
    from torchtitan.tools import utils

    monkeypatch.setattr(utils, "device_type", "cpu")
    cfg = _job_config(DEFAULT_TRAIN_PATH, val_path=DEFAULT_VALID_PATH)
    cfg.validation.steps = 2
    original = tt_validate.build_text_validation_dataloader
    metrics = _Metrics()
    validator = build_local_validator(
        job_config=cfg, dp_world_size=1, dp_rank=0, tokenizer=tok,
        parallel_dims=ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1),
        loss_fn=cross_entropy_loss, validation_context=contextlib.nullcontext,
        maybe_enable_amp=contextlib.nullcontext(), metrics_processor=metrics,
    )
    assert type(validator) is tt_validate.Validator
    assert tt_validate.build_text_validation_dataloader is original  # swap undone
    ds = validator.validation_dataloader.dataset
    assert isinstance(ds, ShardDataset) and not ds.shuffle

    torch.manual_seed(0)
    model = _TinyLM(tok.get_vocab_size())
    validator.validate([model], step=1)
    validator.validate([model], step=2)
    (s1, loss1), (s2, loss2) = metrics.logged
    assert (s1, s2) == (1, 2) and loss1 == pytest.approx(loss2)  # same batches each time
    assert loss1 == pytest.approx(torch.log(torch.tensor(2048.0)).item(), rel=0.1)


# ------------------------------------------------------------------ refusals


def _corrupt(tmp_path, tok, case):
    """A shard folder broken in one way; returns (dataset_path, the message's key piece)."""
    folder = make_shards(tmp_path / "bad", [np.arange(40 * WIDTH), np.arange(40 * WIDTH)], tok)
    shard = os.path.join(folder, "000001-0000.bin")
    if case == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(100)
        return folder, "000001-0000.bin has 100 bytes, its metadata records 680 uint16 tokens"
    if case == "other_dtype":  # written as uint32, recorded as uint16
        np.arange(40 * WIDTH, dtype="<u4").tofile(shard)
        return folder, "it is truncated or has another dtype"
    if case == "missing_shard":
        os.remove(shard)
        return folder, "000001-0000.bin is missing"
    if case == "unreadable_shard":
        os.chmod(shard, 0)
        return folder, "cannot be read"
    if case == "bad_json":
        (tmp_path / "bad" / "metadata.json").write_text("{not json")
        return folder, "metadata.json is not valid JSON"
    if case == "not_ours":
        (tmp_path / "bad" / "metadata.json").write_text('{"shards": []}')
        return folder, "is not a tiedmoe token-shard metadata file"
    if case == "other_tokenizer":
        other = make_shards(tmp_path / "other", [np.arange(40 * WIDTH)], load_tokenizer(make_hf_tokenizer(tmp_path / "hf")))
        return other, "was tokenized with a huggingface tokenizer of"
    if case == "empty_source":
        (tmp_path / "blank.txt").write_text("\n\n  \n")
        return str(tmp_path / "blank.txt"), "holds no tokens"
    if case == "short_source":
        short = make_shards(tmp_path / "short", [np.arange(WIDTH - 1)], tok)
        return f"a=1:{folder},b=1:{short}", "source 'b': 16 tokens, fewer than one sample of seq_len + 1 = 17"
    if case == "smaller_than_a_batch":
        small = make_shards(tmp_path / "small", [np.arange(5 * WIDTH)], tok)
        return small, "5 samples of 17 tokens, fewer than one training batch of 8 samples"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "truncated", "other_dtype", "missing_shard", "unreadable_shard", "bad_json", "not_ours", "other_tokenizer",
    "empty_source", "short_source", "smaller_than_a_batch",
])
def test_bad_data_is_refused_before_a_run_in_one_line(tok, tmp_path, case):
    if case == "unreadable_shard" and os.geteuid() == 0:
        # root reads any file: make the shard a folder, which open() cannot read either
        folder = make_shards(tmp_path / "bad", [np.arange(40 * WIDTH), np.arange(40 * WIDTH)], tok)
        os.remove(os.path.join(folder, "000001-0000.bin"))
        os.mkdir(os.path.join(folder, "000001-0000.bin"))
        path, piece = folder, "cannot be read"
    else:
        path, piece = _corrupt(tmp_path, tok, case)
    cfg = _job_config(path, batch_size=4, global_batch=8)
    cfg.validation.enable = False
    with pytest.raises(ValueError) as err:
        check_data(cfg, tok, dp_world_size=2)
    message = str(err.value)
    assert "\n" not in message and message.startswith("training.dataset_path") and piece in message, message


@pytest.mark.parametrize(
    "value, error, piece",
    [
        (None, ValueError, "training.dataset_path is not set"),
        ("{tmp}/missing/*.jsonl", FileNotFoundError, "matched no files or token-shard folders"),
        ("{tmp}/notes.md", ValueError, "is not a .txt, .jsonl or .parquet file"),
        ("web=abc:{tmp}/ok.jsonl", ValueError, "source 'web' has weight 'abc'; write NAME=WEIGHT:GLOB"),
        ("web=0:{tmp}/ok.jsonl", ValueError, "source 'web' has weight '0'"),
        ("web=1:{tmp}/ok.jsonl,web=2:{tmp}/ok.jsonl", ValueError, "source name 'web' is used twice"),
        ("{tmp}/ok.jsonl,web=1:{tmp}/ok.jsonl", ValueError, "has no NAME=WEIGHT: prefix"),
        ("web=1:", ValueError, "source 'web' has no glob"),
        ("=1:{tmp}/ok.jsonl", ValueError, "needs a source name"),
        ("web=0.7{tmp}/ok.jsonl", FileNotFoundError, "(a weighted source is written NAME=WEIGHT:GLOB)"),
    ],
)
def test_bad_dataset_path_is_one_line_naming_the_setting(tok, tmp_path, value, error, piece):
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "notes.md").write_text("# notes\n")
    value = value.format(tmp=tmp_path) if value else value
    for section, check in (
        ("training", lambda: build_local_text_dataloader(1, 0, tok, _job_config(value))),
        ("training", lambda: resolve_dataset_files(value, "training.dataset_path")),
        ("validation", lambda: build_local_validation_dataloader(1, 0, tok, _job_config(DEFAULT_TRAIN_PATH, val_path=value or ""))),
    ):
        with pytest.raises(error) as err:
            check()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{section}.dataset_path") and piece.replace("training", section) in msg, msg


def test_shard_folder_is_named_by_folder_or_metadata_and_mixes_with_text(tok, tmp_path):
    (tmp_path / "year=2024").mkdir()  # '=' in a directory is still a plain glob
    folder = make_shards(tmp_path / "year=2024" / "shards", [np.arange(3 * WIDTH)], tok)
    (tmp_path / "t.jsonl").write_text('{"text": "hi there"}\n')
    by_folder = open_sources(f"{folder},{tmp_path}/t.jsonl", tok, "training.dataset_path")
    by_meta = open_sources(f"{tmp_path}/year=2024/*/metadata.json,{tmp_path}/t.jsonl", tok, "training.dataset_path")
    for (source,) in (by_folder, by_meta):
        assert (source.name, source.weight) == ("data", 1)
        assert source.shards.num_tokens == 3 * WIDTH + len(tok.encode("hi there", add_bos=True, add_eos=True))
        assert source.shards.folders[0] == folder
