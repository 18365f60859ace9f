"""Tests for offline tokenization into token shards (tiedmoe_titan.data.tokenize, sidecar)."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard
from tiny_bpe import make_hf_tokenizer

from tiedmoe_titan.data import iter_documents
from tiedmoe_titan.data.cli import main
from tiedmoe_titan.data.shard_format import dtype_for_vocab
from tiedmoe_titan.data.sidecar import describe
from tiedmoe_titan.data.tokenize import finalize, tokenize
from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH, load_tokenizer

DOCS_PER_SHARD = 16


def _docs(n, start=0):
    return [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(2 + i % 7)) for i in range(start, start + n)]


def _jsonl(docs):
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


@pytest.fixture
def corpus(tmp_path):
    """Five files, one of each input kind; the .gz and .zst hold the same documents as a.jsonl."""
    src = tmp_path / "src"
    src.mkdir()
    docs = _docs(40)
    (src / "a.jsonl").write_bytes(_jsonl(docs))
    (src / "b.txt").write_text("\n\n".join(_docs(20, 100)) + "\n")
    (src / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs), mtime=0))
    (src / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": _docs(33, 200)}), src / "e.parquet", row_group_size=7)
    return str(src / "*")


def _shard_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".bin")}


def _run(corpus, out, **kw):
    return tokenize([corpus], kw.pop("tokenizer", DEFAULT_TOKENIZER_PATH), str(out), docs_per_shard=DOCS_PER_SHARD,
                    log=lambda m: None, **kw)


@pytest.fixture
def reference(corpus, tmp_path):
    out = tmp_path / "ref"
    meta = _run(corpus, out, workers=1)
    return out, meta


def test_shards_are_each_files_documents_bos_tokens_eos(corpus, reference):
    out, meta = reference
    tok = load_tokenizer(DEFAULT_TOKENIZER_PATH)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id and "bos 1" in meta["bos_policy"]
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["tokenizer"]["vocab_size"] == 2048
    by_source = {}
    for shard in meta["shards"]:
        assert shard["documents"] <= DOCS_PER_SHARD
        tokens = np.fromfile(out / shard["file"], dtype="<u2")
        assert len(tokens) == shard["tokens"] and np.count_nonzero(tokens == tok.eos_id) == shard["documents"]
        by_source.setdefault(shard["source"], []).append(tokens)
    assert len(by_source) == 5 and meta["documents"] == 40 * 3 + 20 + 33
    for source, parts in by_source.items():
        expected = [t for d in iter_documents(source) for t in tok.encode(d)]
        assert np.concatenate(parts).tolist() == expected
    streams = {os.path.basename(s)[0]: np.concatenate(p).tobytes() for s, p in by_source.items()}
    assert streams["a"] == streams["c"] == streams["d"]  # .gz / .zst read as their .jsonl


def test_bytes_do_not_depend_on_workers_or_task_split(corpus, reference, tmp_path):
    out, meta = reference
    two = tmp_path / "two"
    assert _run(corpus, two, workers=2) == meta
    split = tmp_path / "split"
    assert _run(corpus, split, workers=1, task_index=1, num_tasks=2) is None
    with pytest.raises(ValueError, match="not tokenized yet"):
        finalize(str(split), log=lambda m: None)
    _run(corpus, split, workers=2, task_index=0, num_tasks=2)
    assert finalize(str(split), log=lambda m: None) == meta
    assert _shard_bytes(two) == _shard_bytes(split) == _shard_bytes(out)


def test_resume_redoes_only_unfinished_work(corpus, reference, tmp_path):
    out, meta = reference
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    os.remove(crashed / "metadata.json")
    os.remove(crashed / "done" / "000000.json")  # a.jsonl: shards 0-1 finished, 2 was being written
    os.remove(crashed / "000000-0002.bin")
    (crashed / ".tmp-000000-0002.bin.12345").write_bytes(b"half a shard")
    os.remove(crashed / "done" / "000004.json")  # e.parquet: its last shard renamed, record not yet written
    kept = {n: os.stat(crashed / n).st_mtime_ns for n in _shard_bytes(crashed)}
    time.sleep(0.01)
    assert _run(corpus, crashed, workers=2) == meta
    assert _shard_bytes(crashed) == _shard_bytes(out)
    assert {n: os.stat(crashed / n).st_mtime_ns for n in kept} == kept  # finished shards not rewritten
    assert not [n for n in os.listdir(crashed) if n.startswith(".tmp-")]


def test_killed_run_resumes_to_identical_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in range(6):
        (src / f"{f}.jsonl").write_bytes(_jsonl(_docs(3000, f * 3000)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tiedmoe_titan.data", "tokenize", "--input", str(src / "*.jsonl"),
           "--tokenizer", DEFAULT_TOKENIZER_PATH, "--output-dir", str(out), "--docs-per-shard", "500", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(n.endswith(".bin") for n in os.listdir(out)):
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "metadata.json").exists()
    resumed = tokenize([str(src / "*.jsonl")], DEFAULT_TOKENIZER_PATH, str(out), workers=2, docs_per_shard=500, log=lambda m: None)
    fresh = tokenize([str(src / "*.jsonl")], DEFAULT_TOKENIZER_PATH, str(tmp_path / "fresh"), workers=1, docs_per_shard=500, log=lambda m: None)
    assert resumed == fresh and _shard_bytes(out) == _shard_bytes(tmp_path / "fresh")


def test_hugging_face_tokenizer_folder_no_bos(corpus, tmp_path):
    folder = make_hf_tokenizer(tmp_path / "hf")
    tok = load_tokenizer(folder)
    meta = _run(corpus, tmp_path / "out", tokenizer=folder, workers=2)
    assert meta["tokenizer"]["kind"] == "huggingface" and meta["tokenizer"]["bos_id"] is None
    assert "no bos" in meta["bos_policy"] and meta["eos_id"] == tok.eos_id
    first = meta["shards"][0]
    tokens = np.fromfile(tmp_path / "out" / first["file"], dtype="<u2").tolist()
    docs = list(iter_documents(first["source"]))[: first["documents"]]
    assert tokens == [t for d in docs for t in tok.tokenizer.encode(d, add_special_tokens=False).ids + [tok.eos_id]]


def test_dtype_is_uint32_only_past_65536_ids():
    assert (dtype_for_vocab(50_304), dtype_for_vocab(65_536), dtype_for_vocab(151_936)) == ("uint16", "uint16", "uint32")


def _refused(capsys, args, out, *pieces):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tiedmoe-data: error: ") and "\n" not in err, err
    assert all(p in err for p in pieces), err
    assert not os.path.exists(out)  # nothing written


@pytest.mark.parametrize("case", ["corrupt_zst", "corrupt_gz", "empty", "no_match", "no_eos", "bad_json"])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "ok.jsonl").write_bytes(_jsonl(_docs(3)))
    tokenizer, glob_ = DEFAULT_TOKENIZER_PATH, str(src / "*")
    bad = {"corrupt_zst": "x.jsonl.zst", "corrupt_gz": "x.jsonl.gz", "empty": "x.txt"}.get(case)
    if bad:
        (src / bad).write_bytes(b"" if case == "empty" else b"not compressed at all")
    if case == "no_match":
        glob_ = str(src / "*.parquet")
    if case == "no_eos":
        tokenizer = make_hf_tokenizer(tmp_path / "noeos", eos=None)
    args = ["tokenize", "--input", glob_, "--tokenizer", tokenizer, "--output-dir", str(out)]
    if case == "bad_json":  # found while reading: one line, but shards of other files may exist
        (src / "ok.jsonl").write_text('{"text": "fine"}\nnot json\n')
        assert main(args) == 2
        assert "ok.jsonl:2" in capsys.readouterr().err
        return
    pieces = {"no_eos": [tokenizer, "eos_token"], "no_match": ["matched no files"], "empty": ["is empty"]}.get(case, [bad])
    _refused(capsys, args, out, *pieces)


def test_another_tokenizer_into_the_same_folder_is_refused(corpus, reference, tmp_path):
    out, _ = reference
    with pytest.raises(ValueError, match="other tokenizer"):
        _run(corpus, out, tokenizer=make_hf_tokenizer(tmp_path / "hf"))


def test_describe_writes_the_sidecar_of_existing_token_files(tmp_path, capsys):
    tok = load_tokenizer(DEFAULT_TOKENIZER_PATH)
    stream = np.array([t for d in _docs(10) for t in tok.encode(d, add_bos=False)], dtype="<u2")
    folder = tmp_path / "olmo"
    folder.mkdir()
    stream[:100].tofile(folder / "part-0.npy")  # OLMo-core style: raw, despite the name
    np.save(folder / "part-1.npy", stream[100:])  # a real .npy with a header
    meta = describe([str(folder / "*.npy")], DEFAULT_TOKENIZER_PATH, "uint16", log=lambda m: None)
    assert meta["tokens"] == len(stream) and meta["documents"] == 10 and meta["dtype"] == "uint16"
    assert [s["offset"] for s in meta["shards"]] == [0, 128]
    assert json.loads((folder / "metadata.json").read_text()) == meta
    other = tmp_path / "odd"
    other.mkdir()
    (other / "x.npy").write_bytes(b"\x01\x00\x02")
    _refused(capsys, ["describe", "--input", str(other / "*"), "--tokenizer", DEFAULT_TOKENIZER_PATH, "--dtype", "uint16"],
             other / "metadata.json", "x.npy", "--dtype")
    np.array([5000], dtype="<u2").tofile(other / "x.npy")
    _refused(capsys, ["describe", "--input", str(other / "*"), "--tokenizer", DEFAULT_TOKENIZER_PATH, "--dtype", "uint16"],
             other / "metadata.json", "token id 5000", "2048")
