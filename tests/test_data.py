"""Tests for tiedmoe_titan.data (local-files dataset, loaders, validator, corpus)."""

import contextlib
import itertools
import json
import logging
import os
import random
from fractions import Fraction

import pytest
import torch
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.config import JobConfig

from tiedmoe_titan.data import (
    DEFAULT_CORPUS_DIR,
    DEFAULT_TRAIN_PATH,
    DEFAULT_VALID_PATH,
    LocalTextDataset,
    build_local_text_dataloader,
    build_local_validation_dataloader,
    build_local_validator,
    iter_documents,
    pick_source,
    resolve_dataset_files,
)
from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)


def _docs(n, start=0):
    """Distinct documents of varying length, some spanning several samples.

    Every word is unique so that no two samples have the same tokens.
    """
    return [
        f"Document {i} says: " + " ".join(f"fox{i}x{j}" for j in range(3 + 2 * (i % 5)))
        for i in range(start, start + n)
    ]


@pytest.fixture
def corpus(tmp_path):
    """Two files, 13 documents in total: a .jsonl (9) and a .txt (4)."""
    docs_a, docs_b = _docs(9), _docs(4, start=9)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs_a))
    (tmp_path / "b.txt").write_text("\n\n".join(docs_b) + "\n")
    return str(tmp_path / "*.jsonl") + "," + str(tmp_path / "*.txt"), docs_a + docs_b


def _job_config(path, batch_size=2, val_path=None, num_workers=0):
    cfg = JobConfig()
    cfg.training.dataset_path = path
    cfg.training.seq_len = SEQ_LEN
    cfg.training.local_batch_size = batch_size
    cfg.training.dataloader.num_workers = num_workers
    cfg.validation.dataset_path = val_path if val_path is not None else path
    cfg.validation.seq_len = SEQ_LEN
    cfg.validation.local_batch_size = batch_size
    return cfg


def _stream(tok, docs):
    return [t for d in docs for t in tok.encode(d, add_bos=True, add_eos=True)]


def _take(loader, n):
    out, it = [], iter(loader)
    for _ in range(n):
        inputs, labels = next(it)
        out.append((inputs["input"].clone(), labels.clone()))
    return out


# ------------------------------------------------------------------ reading


def test_txt_blocks_and_jsonl_lines(tmp_path):
    (tmp_path / "d.txt").write_text("one\nstill one\n\n\n  \ntwo\n\nthree")
    assert list(iter_documents(str(tmp_path / "d.txt"))) == ["one\nstill one", "two", "three"]
    (tmp_path / "d.jsonl").write_text('{"text": "a\\n\\nb"}\n\n{"text": ""}\n{"text": "c", "id": 3}\n')
    assert list(iter_documents(str(tmp_path / "d.jsonl"))) == ["a\n\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


# ------------------------------------------------------------------ packing


def test_packing_is_the_concatenated_bos_doc_eos_stream(tok, corpus):
    path, docs = corpus
    ds = LocalTextDataset(path, tok, seq_len=SEQ_LEN)
    samples = list(ds)
    stream = _stream(tok, docs)
    assert len(samples) == len(stream) // (SEQ_LEN + 1) == ds.samples_in(ds.sources[0]) > 3
    flat = []
    for inputs, labels in samples:
        x = inputs["input"]
        assert x.shape == labels.shape == (SEQ_LEN,) and x.dtype == torch.long
        assert torch.equal(x[1:], labels[:-1])
        flat += x.tolist() + labels[-1:].tolist()
    assert flat == stream[: len(flat)]
    # every document ends in eos, and the next one starts right after it with bos
    eos_positions = [i for i, t in enumerate(flat) if t == tok.eos_id]
    assert len(eos_positions) >= 3
    assert all(flat[i + 1] == tok.bos_id for i in eos_positions if i + 1 < len(flat))


def test_dp_ranks_get_disjoint_documents_covering_all(tok, corpus):
    path, docs = corpus
    world = 3
    shards = [LocalTextDataset(path, tok, SEQ_LEN, dp_rank=r, dp_world_size=world) for r in range(world)]
    indices = [set(ds.sources[0].doc_indices) for ds in shards]
    assert all(not (indices[a] & indices[b]) for a in range(world) for b in range(a + 1, world))
    assert set().union(*indices) == set(range(len(docs)))
    for ds in shards:  # each rank's stream is made of exactly its own documents
        expected = _stream(tok, [docs[i] for i in ds.sources[0].doc_indices])
        assert ds.sources[0].tokens.tolist() == expected
    again = LocalTextDataset(path, tok, SEQ_LEN, dp_rank=1, dp_world_size=world)
    assert [s[1].tolist() for s in again] == [s[1].tolist() for s in shards[1]]  # deterministic


# ------------------------------------------------------------------ resume / re-loop


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_resume_continues_exactly_across_epochs(tok, corpus, tmp_path, num_workers, weighted):
    path, _ = corpus
    if weighted:  # same files as two sources of a mixture
        path = f"web=0.7:{tmp_path}/*.jsonl,notes=0.3:{tmp_path}/*.txt"
    cfg = _job_config(path, num_workers=num_workers)
    ref_loader = build_local_text_dataloader(2, 1, tok, cfg)
    assert isinstance(ref_loader, ParallelAwareDataloader)
    ds = ref_loader.dataset
    assert len(ds.sources) == (2 if weighted else 1)
    sizes = [ds.samples_in(s) for s in ds.sources]
    n_batches = sum(sizes) + 2  # 2 samples per batch: goes well past one epoch
    reference = _take(ref_loader, n_batches)
    # no source re-loops within the first min(sizes) samples, so none may repeat
    # there (workers must not duplicate data)
    seen = [tuple(x.tolist()) for b in reference for x in b[1]]
    assert len(set(seen[: min(sizes)])) == min(sizes)

    cut = 3
    loader = build_local_text_dataloader(2, 1, tok, cfg)
    it = iter(loader)
    for _ in range(cut):
        next(it)
    state = loader.state_dict()
    del it, loader

    resumed = build_local_text_dataloader(2, 1, tok, cfg)
    resumed.load_state_dict(state)
    continuation = _take(resumed, n_batches - cut)
    for (x, y), (rx, ry) in zip(reference[cut:], continuation):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_infinite_wraps_like_a_carried_over_buffer(tok, corpus):
    path, docs = corpus
    ds = LocalTextDataset(path, tok, SEQ_LEN, infinite=True)
    stream = _stream(tok, docs)
    n = 2 * ds.samples_in(ds.sources[0]) + 1
    flat = []
    for _, (inputs, labels) in zip(range(n), ds):
        flat += inputs["input"].tolist() + labels[-1:].tolist()
    assert flat == (stream * 3)[: len(flat)]


def test_finite_training_stops_but_validation_restarts(tok, corpus):
    path, _ = corpus
    cfg = _job_config(path)
    train = build_local_text_dataloader(1, 0, tok, cfg, infinite=False)
    first = list(train)
    assert sum(len(y) for _, y in first) == train.dataset.samples_in(train.dataset.sources[0])
    assert list(train) == []  # a finished finite stream stays finished, like torchtitan's
    val = build_local_validation_dataloader(1, 0, tok, cfg)
    a, b = list(val), list(val)
    assert len(a) == len(first) and all(torch.equal(x[1], y[1]) for x, y in zip(a, b))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "value, error, pieces",
    [
        (None, ValueError, ["training.dataset_path is not set"]),
        ("  ", ValueError, ["training.dataset_path is not set"]),
        ("{tmp}/missing/*.jsonl", FileNotFoundError, ["training.dataset_path", "/missing/*.jsonl", "matched no files"]),
        ("{tmp}/*.jsonl,{tmp}/nope.txt", FileNotFoundError, ["'{tmp}/nope.txt' matched no files"]),
        ("{tmp}/empty.txt", ValueError, ["contain no documents"]),
        ("{tmp}/notes.md", ValueError, ["is not a .txt, .jsonl or .parquet file"]),
    ],
)
def test_clear_one_line_errors(tok, tmp_path, value, error, pieces):
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    cfg = _job_config(value.format(tmp=tmp_path) if value else value)
    with pytest.raises(error) as err:
        build_local_text_dataloader(1, 0, tok, cfg)
    msg = str(err.value)
    assert "\n" not in msg
    for piece in pieces:
        assert piece.format(tmp=tmp_path) in msg


def test_validation_errors_name_validation_setting(tok, tmp_path):
    cfg = _job_config(str(tmp_path / "*.jsonl"), val_path=str(tmp_path / "val/*.txt"))
    with pytest.raises(FileNotFoundError, match=r"validation.dataset_path: glob '.*val/\*.txt' matched no files"):
        build_local_validation_dataloader(1, 0, tok, cfg)


def test_too_few_documents_for_world_size(tok, tmp_path):
    (tmp_path / "two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="too few for dp_world_size 3"):
        LocalTextDataset(str(tmp_path / "two.jsonl"), tok, SEQ_LEN, dp_rank=2, dp_world_size=3)


# ------------------------------------------------------------------ validator


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
    logged = []

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
    assert isinstance(ds, LocalTextDataset) and ds.files == [DEFAULT_VALID_PATH]

    torch.manual_seed(0)
    model = _TinyLM(tok.get_vocab_size())
    validator.validate([model], step=1)
    validator.validate([model], step=2)
    (s1, loss1), (s2, loss2) = metrics.logged
    assert (s1, s2) == (1, 2) and loss1 == pytest.approx(loss2)  # same batches each time
    assert loss1 == pytest.approx(torch.log(torch.tensor(2048.0)).item(), rel=0.1)


# ------------------------------------------------------------------ bundled corpus


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
    text = next(iter_documents(DEFAULT_VALID_PATH))
    assert " the " in text


# ------------------------------------------------------------------ parquet


def _write_parquet(path, columns, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)


def test_parquet_round_trip(tok, tmp_path):
    docs = _docs(7)
    texts = docs[:3] + [None, "", "  "] + docs[3:]  # nulls and blanks are skipped
    _write_parquet(tmp_path / "p.parquet", {"id": list(range(len(texts))), "text": texts})
    assert list(iter_documents(str(tmp_path / "p.parquet"))) == docs
    # parquet and jsonl files mix freely within one source
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(2, start=7)))
    ds = LocalTextDataset(f"{tmp_path}/*.parquet,{tmp_path}/*.jsonl", tok, SEQ_LEN)
    assert ds.sources[0].tokens.tolist() == _stream(tok, docs + _docs(2, start=7))


def test_parquet_without_text_column_names_file_and_columns(tmp_path):
    _write_parquet(tmp_path / "bad.parquet", {"body": ["a", "b"], "id": [1, 2]})
    with pytest.raises(ValueError) as err:
        list(iter_documents(str(tmp_path / "bad.parquet")))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{tmp_path}/bad.parquet: no 'text' column (it has: body, id)" == msg


# ------------------------------------------------------------------ mixtures


@pytest.fixture
def mixture(tmp_path):
    """Three sources in three formats; 'b' is small, so it re-loops often."""
    docs = {"a": _docs(9), "b": _docs(3, start=9), "c": _docs(8, start=12)}
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs["a"]))
    (tmp_path / "b.txt").write_text("\n\n".join(docs["b"]) + "\n")
    _write_parquet(tmp_path / "c.parquet", {"text": docs["c"]})
    path = f"a=0.5:{tmp_path}/a.jsonl, b=0.2:{tmp_path}/b.txt, c=0.3:{tmp_path}/c.parquet"
    return path, docs


def _windows(tok, docs, j):
    """Sample j of the circular stream of docs."""
    stream, width = _stream(tok, docs), SEQ_LEN + 1
    return [stream[(j * width + i) % len(stream)] for i in range(width)]


def test_mixture_realises_weights_and_reloops_each_source(tok, mixture):
    path, docs = mixture
    ds = LocalTextDataset(path, tok, SEQ_LEN, infinite=True)
    assert [(s.name, str(s.weight)) for s in ds.sources] == [("a", "1/2"), ("b", "1/5"), ("c", "3/10")]
    weights = {"a": 0.5, "b": 0.2, "c": 0.3}
    counts = dict.fromkeys(docs, 0)
    for n, (inputs, labels) in enumerate(itertools.islice(ds, 200), start=1):
        x = inputs["input"].tolist() + labels[-1:].tolist()
        # the sample is the next window of exactly one source's own stream
        (name,) = [s for s in docs if x == _windows(tok, docs[s], counts[s])]
        counts[name] += 1
        for s, w in weights.items():
            assert abs(counts[s] - round(w * n)) <= 1, (n, counts)
    assert counts == {"a": 100, "b": 40, "c": 60}
    b = ds.sources[1]
    assert counts["b"] > 3 * ds.samples_in(b)  # 'b' re-looped on its own


def test_pick_source_stays_within_one_sample_of_the_weights():
    rng = random.Random(0)
    for _ in range(20):
        raw = [Fraction(rng.randint(1, 50)) for _ in range(rng.randint(2, 8))]
        weights = [w / sum(raw) for w in raw]
        counts = [0] * len(weights)
        for n in range(1, 201):
            counts[pick_source(weights, counts)] += 1
            assert all(abs(c - n * w) < 1 for c, w in zip(counts, weights))


def test_mixture_is_deterministic_and_logs_each_source(tok, mixture, caplog):
    path, _ = mixture
    with caplog.at_level(logging.INFO):
        runs = [
            [y.tolist() for _, y in itertools.islice(LocalTextDataset(path, tok, SEQ_LEN, infinite=True), 50)]
            for _ in range(2)
        ]
    assert runs[0] == runs[1]
    for name, weight in [("a", "0.5"), ("b", "0.2"), ("c", "0.3")]:
        line = f"training.dataset_path: source '{name}' weight {weight}: 1 files, "
        assert any(line in m and "documents" in m and "tokens" in m for m in caplog.messages), name


def test_mixture_resume_from_dataset_state(tok, mixture):
    path, _ = mixture
    ref = [y for _, y in itertools.islice(LocalTextDataset(path, tok, SEQ_LEN, infinite=True), 60)]
    ds = LocalTextDataset(path, tok, SEQ_LEN, infinite=True)
    it = iter(ds)
    for _ in range(37):
        next(it)
    state = ds.state_dict()
    assert {k: v["position"] for k, v in state["sources"].items()} == {"a": 19, "b": 7, "c": 11}
    resumed = LocalTextDataset(path, tok, SEQ_LEN, infinite=True)
    resumed.load_state_dict(state)
    rest = [y for _, y in itertools.islice(resumed, 23)]
    assert all(torch.equal(a, b) for a, b in zip(ref[37:], rest))


def test_changed_weights_resume_each_source_where_it_stopped(tok, mixture):
    path, docs = mixture
    ds = LocalTextDataset(path, tok, SEQ_LEN, infinite=True)
    it = iter(ds)
    for _ in range(20):
        next(it)
    state = ds.state_dict()
    heavier_b = path.replace("a=0.5", "a=0.1").replace("b=0.2", "b=0.6")
    resumed = LocalTextDataset(heavier_b, tok, SEQ_LEN, infinite=True)
    resumed.load_state_dict(state)
    positions = {k: v["position"] for k, v in state["sources"].items()}
    x = next(iter(resumed))  # the fresh interleaving starts with b, at its saved position
    assert x[0]["input"].tolist() + x[1][-1:].tolist() == _windows(tok, docs["b"], positions["b"])
    # a checkpoint from before mixtures (one sample index) resumes a single source
    single = LocalTextDataset(f"{path.split(',')[0].split(':', 1)[1]}", tok, SEQ_LEN)
    single.load_state_dict({"sample_idx": 2, "num_tokens": len(single.sources[0].tokens), "seq_len": SEQ_LEN})
    assert next(iter(single))[1].tolist() == _windows(tok, docs["a"], 2)[1:]


def test_validation_accepts_mixtures_and_ends_with_a_source(tok, mixture):
    path, docs = mixture
    val = build_local_validation_dataloader(1, 0, tok, _job_config(path))
    a, b = list(val), list(val)
    assert len(a) > 1 and all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    ds = val.dataset
    # the pass stopped because one source had no sample left
    assert any(p >= ds.samples_in(s) for p, s in zip(ds._positions, ds.sources))


def test_equals_sign_in_a_directory_is_still_a_plain_glob(tok, tmp_path):
    (tmp_path / "year=2024").mkdir()
    (tmp_path / "year=2024" / "d.jsonl").write_text('{"text": "hi there"}\n')
    (source,) = LocalTextDataset(f"{tmp_path}/year=2024/*.jsonl", tok, SEQ_LEN).sources
    assert (source.name, source.weight, len(source.files)) == ("data", 1, 1)


@pytest.mark.parametrize(
    "value, error, piece",
    [
        ("web=abc:{tmp}/ok.jsonl", ValueError, "source 'web' has weight 'abc'; write NAME=WEIGHT:GLOB"),
        ("web=0:{tmp}/ok.jsonl", ValueError, "source 'web' has weight '0'"),
        ("web=-1:{tmp}/ok.jsonl", ValueError, "source 'web' has weight '-1'"),
        ("web=1:{tmp}/ok.jsonl,web=2:{tmp}/ok.jsonl", ValueError, "source name 'web' is used twice"),
        ("{tmp}/ok.jsonl,web=1:{tmp}/ok.jsonl", ValueError, "has no NAME=WEIGHT: prefix"),
        ("web=1:", ValueError, "source 'web' has no glob"),
        ("=1:{tmp}/ok.jsonl", ValueError, "needs a source name"),
        ("web=0.7{tmp}/ok.jsonl", FileNotFoundError, "(a weighted source is written NAME=WEIGHT:GLOB)"),
    ],
)
def test_bad_weight_syntax_is_one_line_naming_the_setting(tok, tmp_path, value, error, piece):
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    value = value.format(tmp=tmp_path)
    for check in (
        lambda: build_local_text_dataloader(1, 0, tok, _job_config(value)),
        lambda: resolve_dataset_files(value, "training.dataset_path"),  # the up-front config check
    ):
        with pytest.raises(error) as err:
            check()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("training.dataset_path") and piece in msg, msg
    with pytest.raises(error, match="^validation.dataset_path"):
        build_local_validation_dataloader(1, 0, tok, _job_config(DEFAULT_TRAIN_PATH, val_path=value))
