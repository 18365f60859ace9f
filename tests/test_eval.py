"""tiedmoe-eval: held-out loss of a checkpoint equals the loss of the model that was
saved, scored independently over every window of the data; bad input is one line."""

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from tiedmoe_titan.config import parse_recipe, write_resolved_recipe
from tiedmoe_titan.preflight import model_args_of
from tiedmoe_titan.eval import evaluate, main
from tiedmoe_titan.saved_checkpoints import single_process
from tiedmoe_titan.models.flavor_file import write_flavor_file
from tiedmoe_titan.models import FAMILIES
from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH, SentencePieceTokenizer

SEQ_LEN = 16
DOCS = ["The quick brown fox jumps over the lazy dog.", "Return the sum of the two arguments, or raise ValueError.",
        "Iterate over the lines of a file and yield each one stripped of its newline."]


@pytest.fixture
def checkpoint(tmp_path):
    """(model, dump folder) of a small tied olmoe model saved as tiedmoe-train saves one."""
    args = dataclasses.replace(FAMILIES["olmoe"][1]["debug"], n_layers=4, dim=64, n_heads=4, n_kv_heads=4, head_dim=16, moe_inter_dim=32)
    write_flavor_file(args, tmp_path / "flavor.json")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[model]\nname = "tiedmoe_olmoe"\nflavor = "{tmp_path / "flavor.json"}"\nhf_assets_path = "{DEFAULT_TOKENIZER_PATH}"\n'
        f"[training]\nseq_len = {SEQ_LEN}\n[tying]\ngroup_size = 2\nuntied_first = 1\nuntied_last = 1\n"
    )
    job_config = parse_recipe(str(recipe))
    spec, model_args = model_args_of(job_config)
    model = spec.model_cls(model_args)
    with torch.no_grad():
        model.init_weights()
    dump = tmp_path / "dump"
    write_resolved_recipe(job_config, str(dump))
    with single_process():
        dcp.save(model.state_dict(), checkpoint_id=str(dump / "checkpoint" / "step-3"))
    return model.eval(), dump


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def reference_loss(model, data_docs: list[str]) -> tuple[float, int]:
    """Mean next-token loss over consecutive windows of SEQ_LEN + 1 tokens of the
    documents' [bos] + tokens + [eos] stream, computed window by window."""
    tokenizer = SentencePieceTokenizer(DEFAULT_TOKENIZER_PATH)
    stream = [t for d in data_docs for t in tokenizer.encode(d, add_bos=True, add_eos=True)]
    width = SEQ_LEN + 1
    losses = []
    with torch.no_grad():
        for start in range(0, len(stream) - width + 1, width):
            window = torch.tensor([stream[start:start + width]])
            logits = model(window[:, :-1])
            losses.append(F.cross_entropy(logits[0], window[0, 1:], reduction="none"))
    scored = torch.cat(losses)
    return scored.mean().item(), scored.numel()


def test_eval_matches_the_saved_model_over_every_window(checkpoint, data):
    model, dump = checkpoint
    lines = []
    # The checkpoint folder resolves to its latest complete step.
    result = evaluate(str(dump / "checkpoint"), str(data), batch_size=3, progress=lines.append)
    expected, tokens = reference_loss(model, DOCS)
    assert result.checkpoint.endswith("step-3")
    assert result.tokens == tokens > 0
    assert result.loss == pytest.approx(expected, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert any("windows" in line for line in lines)


def test_cli_prints_loss_and_perplexity(checkpoint, data, capsys):
    _, dump = checkpoint
    main([str(dump / "checkpoint" / "step-3"), "--data", str(data), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


@pytest.mark.parametrize("case, message", [
    ("no_checkpoint", "is not a complete DCP checkpoint"),
    ("no_data", "matched no files"),
    ("too_little_data", "fewer tokens than one window"),
    ("seq_len_too_long", "exceeds the model's max_seq_len"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, data, tmp_path, capsys, case, message):
    _, dump = checkpoint
    target, options = str(dump / "checkpoint"), []
    if case == "no_checkpoint":
        target = str(tmp_path / "nowhere")
    elif case == "no_data":
        data = str(tmp_path / "missing.jsonl")
    elif case == "too_little_data":
        (tmp_path / "tiny.txt").write_text("hi\n")
        data = str(tmp_path / "tiny.txt")
    elif case == "seq_len_too_long":
        options = ["--seq-len", "100000"]
    with pytest.raises(SystemExit) as exit_info:
        main([target, "--data", str(data), *options])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress lines
    assert exit_info.value.code == 2
    assert error.startswith("tiedmoe-eval: error:") and message in error
