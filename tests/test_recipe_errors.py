"""Every bad input is refused before anything starts: one line naming the key or the
path, exit code 2, nothing written. The classes: values outside their key's domain
(every key of the embedded default recipe is mutated), files that exist but cannot be
read or parsed, and command-line mistakes; for tiedmoe-train, -plan and -launch."""

import gzip
import signal
import subprocess
import sys

import pytest

from tiedmoe_titan.data.readers import iter_documents
from tiedmoe_titan import launch, plan, train
from tiedmoe_titan.config import RecipeError, load_recipe, parse_recipe, to_toml
from tiedmoe_titan.preflight import check_run
from tiedmoe_titan.domains import DOMAINS

DEBUG = "recipes/debug_cpu.toml"

# Keys whose domain another check owns (the model's, the tie layout's, the file
# system's), with a value each refuses.
CHECKED_ELSEWHERE = {
    "model.name": "llama3",
    "model.flavor": "huge",
    "model.hf_assets_path": "/nonexistent.model",
    "training.dataset_path": "/nonexistent/*.jsonl",
    "validation.dataset_path": "/nonexistent/*.jsonl",
    "tying.group_size": 0,
    "tying.untied_first": -1,
    "tying.untied_last": 7,
    "tying.bank_expansion": 0,
    "tying.bank_lr_scale": "half",
    "lr_scheduler.decay_type": "cosin",
    "training.mixed_precision_param": "fp8",
    "activation_checkpoint.mode": "some",
}


def leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def with_value(values: dict, key: str, value) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    *sections, last = key.split(".")
    table = out
    for section in sections:
        table = table[section]
    table[last] = value
    return out


def wrong_type(value):
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "many"
    return 5


def refusal(recipe: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as error:
        check_run(parse_recipe(recipe, list(overrides)), 1)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_every_key_of_the_default_recipe_refuses_what_it_cannot_take(tmp_path):
    values = load_recipe(DEBUG)
    keys = dict(leaves(values))
    numeric = {k for k, v in keys.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= DOMAINS.keys() | CHECKED_ELSEWHERE.keys(), "a numeric key without a domain"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    outside = {key: list(domain.outside) for key, domain in DOMAINS.items()}
    outside["job.dump_folder"].append(str(a_file / "out"))
    tried = 0
    for key, value in keys.items():
        mutations = [wrong_type(value), *outside.get(key, ()), *([CHECKED_ELSEWHERE[key]] if key in CHECKED_ELSEWHERE else [])]
        for bad in mutations:
            path = tmp_path / "recipe.toml"
            path.write_text(to_toml(with_value(values, key, bad)))
            message = refusal(str(path))
            assert key in message, (key, bad, message)
            tried += 1
    assert tried >= 2 * len(keys)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--tying.group_size", "two"], "command line: --tying.group_size two: must be an integer"),
        (["--training.seq_len=x"], "command line: --training.seq_len x: must be an integer"),
        (["--tying.group_size"], "command line: --tying.group_size: takes one value, got 0"),
        (["--checkpoint.enable", "yes"], "--checkpoint.enable yes: a switch takes no value: write --checkpoint.enable or --checkpoint.no-enable"),
        (["--checkpoint.exclude_from_loading", "model", "optimizer"], "takes one comma-separated value (a,b,c), got 2"),
        (["--checkpoint.exclude_from_loading", "dataloader,optimiser"], "checkpoint.exclude_from_loading = ['dataloader', 'optimiser']: must be a list of"),
        (["--lr_scheduler.total_steps", "0"], "lr_scheduler.total_steps = 0: must be an integer >= 1, or unset"),
        (["--optimizer.lr", "nan"], "optimizer.lr = nan: must be a finite number >= 0"),
        (["stray"], "command line: Unrecognized options: stray"),  # what tyro refuses itself, as one line
    ],
)
def test_command_line_mistakes(overrides, message):
    assert message in refusal(DEBUG, overrides)


def test_cross_key_settings(tmp_path):
    assert "needs loader workers" in refusal(DEBUG, ["--training.dataloader.prefetch_factor", "2"])
    assert "is not a torch.compile backend" in refusal(DEBUG, ["--compile.enable", "--compile.backend", "inductr"])


def test_files_that_cannot_be_read(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "child.toml").write_text('extends = "binary.toml"\n')
    assert "is a folder: name a .toml file" in refusal(str(tmp_path / "folder.toml"))
    assert "binary.toml: not valid TOML" in refusal(str(tmp_path / "binary.toml"))
    assert "binary.toml: not valid TOML" in refusal(str(tmp_path / "child.toml"))

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:40])
    (tmp_path / "flavor.json").write_text('{"dim": "wide"}')
    for path, message in [
        ("bad.parquet", "bad.parquet: not a readable parquet file"),
        ("latin1.txt", "latin1.txt: not UTF-8 text"),
    ]:
        assert message in refusal(DEBUG, ["--training.dataset_path", str(tmp_path / path)])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: cannot be read \(Compressed file ended"):  # tiedmoe-data tokenize's inputs
        list(iter_documents(str(tmp_path / "cut.jsonl.gz")))
    assert "flavor.json': dim = 'wide' must be an integer" in refusal(DEBUG, ["--model.flavor", str(tmp_path / "flavor.json")])

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    load = ["--checkpoint.initial_load_path", str(checkpoint)]
    assert "not a complete DCP checkpoint (no .metadata)" in refusal(DEBUG, load)
    (checkpoint / ".metadata").write_bytes(b"")
    (checkpoint / "tokenizer_identity.json").write_text("{")
    assert "tokenizer_identity.json cannot be read" in refusal(DEBUG, load)


def test_the_trainer_says_one_line_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "tiedmoe_titan.train", DEBUG, "--job.dump_folder", str(out), "--optimizer.lr", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "tiedmoe-train: error: command line: optimizer.lr = -1.0: must be a finite number >= 0"
    assert "Traceback" not in result.stdout
    assert not out.exists()


@pytest.fixture
def in_process(monkeypatch):
    """Run a command's main() here: as rank 0 of one, its signal handlers undone after."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("NPROC", "1")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    "main, args, message",
    [
        (train.main, ["--tying.grup_size", "2"], "command line: unknown key [tying] 'grup_size': did you mean 'group_size'?"),
        (train.main, ["--checkpoint.initial_load_path", "/nonexistent"], "checkpoint.initial_load_path = '/nonexistent': no such folder"),
        (launch.main, ["--tying.group_size", "two"], "command line: --tying.group_size two: must be an integer"),
        (launch.main, ["--parallelism.expert_parallel_degree", "2"], "expert_parallel_degree = 2 (x etp 1) must divide"),
        (plan.main, ["--training.seq_len", "0"], "command line: training.seq_len = 0: must be an integer >= 1"),
        (plan.main, ["--gpus-per-node", "x"], "argument --gpus-per-node: invalid int value: 'x'"),
    ],
)
def test_each_command_says_one_line_exits_2_and_writes_nothing(tmp_path, capsys, in_process, main, args, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        main([DEBUG, "--job.dump_folder", str(out), *args])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    command = main.__module__.split(".")[-1]
    assert line.startswith(f"tiedmoe-{command}: error: ") and message in line, line
    assert "Traceback" not in captured.out
    assert not out.exists()
