"""Hugging Face interop: export (hf-untied, hf-tied) and import, proven by fp32 logits
parity with transformers on tiny random models, an exact round trip, bad input, and
training continued from an import with tiedmoe-train."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tiedmoe_titan.config import parse_recipe, write_resolved_recipe  # noqa: E402
from tiedmoe_titan.preflight import model_args_of
from tiedmoe_titan.hf import load_tied_pretrained  # noqa: E402
from tiedmoe_titan.saved_checkpoints import single_process  # noqa: E402
from tiedmoe_titan.hf.export import main as export_main  # noqa: E402
from tiedmoe_titan.models.flavor_file import write_flavor_file  # noqa: E402
from tiedmoe_titan.hf.importer import main as import_main  # noqa: E402
from tiedmoe_titan.models import FAMILIES  # noqa: E402

TOLERANCE = 2e-6  # max abs logits difference, fp32 (README)
VOCAB = 2048  # the bundled tokenizer's, so an import can be trained on the bundled corpus
LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, EXPERT_DIM = 4, 64, 4, 2, 16, 32
EXPERTS, TOP_K = 8, 2
HF_TYPES = {"olmoe": "olmoe", "qwen3": "qwen3_moe"}
# G=2 with one leading anchor: banks [0], [1, 2], [3].
TIE_FLAGS = {1: [], 2: ["--tie-group-size", "2", "--untied-first", "1"]}
TYING = {1: {"group_size": 1}, 2: {"group_size": 2, "untied_first": 1}}


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))


def logits_diff(model, hf_model) -> float:
    with torch.no_grad():
        return (model(tokens()) - hf_model(tokens()).logits).abs().max().item()


def perturb_(module: torch.nn.Module) -> None:
    """Random offsets on every weight, norms included (they start at one, where a
    swapped q/k norm would go unnoticed)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # only this command's output
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def project_checkpoint(tmp_path, family: str, **tying):
    """A project model and a checkpoint of it laid out as tiedmoe-train writes one:
    ``dump/checkpoint/step-1`` next to ``dump/recipe.resolved.toml``."""
    args = dataclasses.replace(
        FAMILIES[family][1]["debug"], n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        moe_inter_dim=EXPERT_DIM, vocab_size=VOCAB,
    )
    write_flavor_file(args, tmp_path / "flavor.json")
    recipe = tmp_path / "recipe.toml"
    tying_lines = "".join(f"{k} = {v}\n" for k, v in tying.items())
    recipe.write_text(f'[model]\nname = "tiedmoe_{family}"\nflavor = "{tmp_path / "flavor.json"}"\n[tying]\n{tying_lines}')
    job_config = parse_recipe(str(recipe))
    spec, model_args = model_args_of(job_config)
    model = spec.model_cls(model_args)
    with torch.no_grad():
        model.init_weights()
    perturb_(model)
    dump = tmp_path / "dump"
    write_resolved_recipe(job_config, str(dump))
    with single_process():
        dcp.save(model.state_dict(), checkpoint_id=str(dump / "checkpoint" / "step-1"))
    return model.eval(), dump / "checkpoint" / "step-1"


def hf_checkpoint(tmp_path, family: str, tie_word_embeddings: bool = False):
    """A random transformers model of the family, saved with save_pretrained."""
    sizes = dict(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, num_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=128,
        eos_token_id=VOCAB - 1, tie_word_embeddings=tie_word_embeddings,
    )
    if family == "qwen3":
        sizes.update(head_dim=HEAD_DIM, moe_intermediate_size=EXPERT_DIM, intermediate_size=96, norm_topk_prob=True)
    else:
        sizes.update(intermediate_size=EXPERT_DIM)
    config = transformers.AutoConfig.for_model(HF_TYPES[family], **sizes)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb_(model)
    model.save_pretrained(tmp_path / "hf")
    return model.eval(), tmp_path / "hf"


def load_import(outdir):
    """The project model an import describes, with the imported weights."""
    spec, args = model_args_of(parse_recipe(str(outdir / "recipe.toml")))
    model = spec.model_cls(args)
    state = model.state_dict()
    with single_process():
        dcp.load(state, checkpoint_id=str(outdir / "model"))
    return model.eval()


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("family", ["olmoe", "qwen3"])
def test_export_logits_match_transformers(tmp_path, capsys, family, group_size):
    model, step = project_checkpoint(tmp_path, family, **TYING[group_size])
    code, out, err = run_cli(export_main, [step, tmp_path / "untied", "--format", "hf-untied"], capsys)
    assert code == 0, err
    assert "read " in out and "wrote " in out
    untied = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert type(untied).__name__ == {"olmoe": "OlmoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}[family]
    diff_untied = logits_diff(model, untied)

    code, _, err = run_cli(export_main, [step.parent.parent, tmp_path / "tied", "--format", "hf-tied"], capsys)  # the dump folder
    assert code == 0, err
    tied = load_tied_pretrained(str(tmp_path / "tied"))
    diff_tied = logits_diff(model, tied)
    print(f"{family} G={group_size}: max |logits diff| hf-untied {diff_untied:.2e}, hf-tied {diff_tied:.2e}")
    assert diff_untied <= TOLERANCE and diff_tied <= TOLERANCE

    unique = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (parameters() counts shared ones once)
    assert unique(tied) == sum(p.numel() for p in model.parameters())
    layers = tied.model.layers
    if group_size == 2:
        assert layers[2].mlp.experts is layers[1].mlp.experts  # one bank in memory
        assert layers[2].mlp.gate is not layers[1].mlp.gate  # each layer routes on its own
        assert unique(tied) < unique(untied)
    else:
        assert unique(tied) == unique(untied)


def test_width_expanded_banks_export_tied_only(tmp_path, capsys):
    model, step = project_checkpoint(tmp_path, "olmoe", group_size=2, untied_first=1, untied_last=1, bank_expansion=2)
    code, _, err = run_cli(export_main, [step, tmp_path / "untied", "--format", "hf-untied"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "8 and 16 experts" in err and "hf-tied" in err
    assert not (tmp_path / "untied").exists()

    code, _, err = run_cli(export_main, [step, tmp_path / "tied", "--format", "hf-tied"], capsys)
    assert code == 0, err
    tied = load_tied_pretrained(str(tmp_path / "tied"))
    assert tied.model.layers[1].mlp.gate.weight.shape[0] == 16 and tied.model.layers[0].mlp.gate.weight.shape[0] == 8
    diff = logits_diff(model, tied)
    print(f"olmoe G=2 x2 experts: max |logits diff| hf-tied {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("family", ["olmoe", "qwen3"])
def test_import_logits_match_transformers(tmp_path, capsys, family, group_size):
    hf_model, hf_dir = hf_checkpoint(tmp_path, family)
    code, out, err = run_cli(import_main, [hf_dir, tmp_path / "out", *TIE_FLAGS[group_size]], capsys)
    assert code == 0, err
    model = load_import(tmp_path / "out")
    if group_size == 2:
        # The bank of layers 1-2 is layer 1's experts; the transformers reference aliases them the same way.
        assert "dropped the experts of layers.2" in out
        layers = hf_model.model.layers
        layers[2].mlp.experts = layers[1].mlp.experts
    diff = logits_diff(model, hf_model)
    print(f"{family} import G={group_size}: max |logits diff| {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("family, tie_word_embeddings", [("olmoe", False), ("qwen3", True)])
def test_import_then_export_reproduces_the_checkpoint(tmp_path, capsys, family, tie_word_embeddings):
    _, hf_dir = hf_checkpoint(tmp_path, family, tie_word_embeddings)
    assert run_cli(import_main, [hf_dir, tmp_path / "out"], capsys)[0] == 0
    out = tmp_path / "out"
    code, _, err = run_cli(export_main, [out / "model", tmp_path / "back", "--format", "hf-untied", "--recipe", out / "recipe.toml"], capsys)
    assert code == 0, err
    original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("folder", ["", "model"])
def test_export_takes_an_import_as_it_stands(tmp_path, capsys, folder):
    """The import's OUTDIR or its model/ exports without --recipe: export finds the
    checkpoint and the recipe.toml the import wrote."""
    hf_model, hf_dir = hf_checkpoint(tmp_path, "qwen3")
    out = tmp_path / "out"
    assert run_cli(import_main, [hf_dir, out], capsys)[0] == 0
    code, printed, err = run_cli(export_main, [out / folder, tmp_path / "back", "--format", "hf-untied"], capsys)
    assert code == 0, err
    assert f"model of {out / 'recipe.toml'}" in printed and f"from {out / 'model'}" in printed
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        diff = (back(tokens()).logits - hf_model(tokens()).logits).abs().max().item()
    assert diff <= TOLERANCE


def test_imported_checkpoint_trains_with_its_own_tokenizer_evaluates_and_exports(tmp_path, capsys):
    """An import (tied, G=2) of a model folder with its Hugging Face tokenizer (a tiny BPE
    built here) copies the tokenizer and records it; the corpus is tokenized with it into
    shards (tiedmoe-data tokenize), tiedmoe-train continues from the import on them,
    tiedmoe-eval scores the result, and it exports. Another tokenizer is refused."""
    from tiny_bpe import make_hf_tokenizer

    from tiedmoe_titan.assets import DEFAULT_TOKENIZER_PATH, DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH
    from tiedmoe_titan.data.cli import main as data_main
    from tiedmoe_titan.eval import main as eval_main

    _, hf_dir = hf_checkpoint(tmp_path, "olmoe")
    make_hf_tokenizer(hf_dir, vocab_size=400)
    base = os.path.abspath("recipes/debug_cpu.toml")
    code, out, _ = run_cli(import_main, [hf_dir, tmp_path / "out", *TIE_FLAGS[2], "--extends", base], capsys)
    assert code == 0 and "tokenizer of" in out and "the recipe uses it" in out
    recipe = tmp_path / "out" / "recipe.toml"
    assert f'hf_assets_path = "{tmp_path / "out" / "tokenizer"}"' in recipe.read_text()
    assert sorted(os.listdir(tmp_path / "out" / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]

    shards = tmp_path / "shards"
    assert run_cli(data_main, ["tokenize", "--input", DEFAULT_TRAIN_PATH, "--tokenizer", str(tmp_path / "out" / "tokenizer"),
                               "--output-dir", str(shards), "--workers", "1"], capsys)[0] == 0
    dump = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "tiedmoe_titan.train", str(recipe), "--job.dump_folder", str(dump),
        "--training.dataset_path", str(shards), "--training.steps", "2", "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--metrics.log_freq", "1", "--validation.no-enable", "--metrics.no-enable-tensorboard",
    ]
    wrong = subprocess.run([*cmd, "--model.hf_assets_path", DEFAULT_TOKENIZER_PATH], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr[-3000:]
    assert re.search(r"model.hf_assets_path is a sentencepiece tokenizer of 2,048 ids .* was trained with a huggingface "
                     r"tokenizer of \d+ ids", wrong.stderr) and not dump.exists()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
    assert f"Loading the checkpoint from {tmp_path / 'out' / 'model'}" in log
    losses = [float(v) for v in re.findall(r"step:\s*\d+\s.*?loss:\s*([0-9.]+)", log)]
    assert len(losses) == 2 and all(l == l for l in losses)

    code, printed, err = run_cli(eval_main, [dump / "checkpoint", "--data", DEFAULT_VALID_PATH, "--seq-len", "32", "--json"], capsys)
    assert code == 0, err
    result = json.loads(printed.strip().splitlines()[-1])
    assert 0 < result["loss"] < 2 * math.log(400) and "out/tokenizer" in err  # scored with the model's own tokenizer

    code, _, err = run_cli(export_main, [dump, tmp_path / "exported", "--format", "hf-untied"], capsys)
    assert code == 0, err
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").config.model_type == "olmoe"


def one_line_error(code: int, err: str, prog: str) -> str:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


def test_import_refuses_an_unsupported_architecture(tmp_path, capsys):
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64)
    llama.save_pretrained(tmp_path / "llama")
    err = one_line_error(*run_cli(import_main, [tmp_path / "llama", tmp_path / "out"], capsys)[::2], "tiedmoe-import")
    assert "model_type 'llama' is not supported" in err and "OlmoeForCausalLM" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(*run_cli(import_main, [tmp_path / "empty", tmp_path / "out"], capsys)[::2], "tiedmoe-import")
    assert "has no config.json" in err


def test_import_refuses_weights_that_do_not_match_the_config(tmp_path, capsys):
    _, hf_dir = hf_checkpoint(tmp_path, "qwen3")
    config = json.loads((hf_dir / "config.json").read_text())
    config["moe_intermediate_size"] = 2 * EXPERT_DIM
    (hf_dir / "config.json").write_text(json.dumps(config))
    err = one_line_error(*run_cli(import_main, [hf_dir, tmp_path / "out"], capsys)[::2], "tiedmoe-import")
    assert f"has shape [{EXPERT_DIM}, {DIM}]" in err and f"config.json implies [{2 * EXPERT_DIM}, {DIM}]" in err
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_tie_layout_the_model_cannot_hold(tmp_path, capsys):
    _, hf_dir = hf_checkpoint(tmp_path, "olmoe")
    argv = [hf_dir, tmp_path / "out", "--tie-group-size", "2", "--untied-first", "2", "--untied-last", "1"]
    err = one_line_error(*run_cli(import_main, argv, capsys)[::2], "tiedmoe-import")
    assert "4 MoE layers" in err and "untied_first + tying.untied_last = 3" in err


def test_export_refuses_a_checkpoint_of_another_layout_and_a_non_checkpoint(tmp_path, capsys):
    _, step = project_checkpoint(tmp_path, "qwen3", group_size=2)
    recipe = step.parent.parent / "recipe.resolved.toml"
    recipe.write_text(recipe.read_text().replace("group_size = 2", "group_size = 1"))
    err = one_line_error(*run_cli(export_main, [step, tmp_path / "x", "--format", "hf-tied"], capsys)[::2], "tiedmoe-export")
    assert "layers.1 owns a bank in the recipe but not in the checkpoint" in err
    err = one_line_error(*run_cli(export_main, [tmp_path, tmp_path / "x", "--format", "hf-tied"], capsys)[::2], "tiedmoe-export")
    assert "is not a complete DCP checkpoint" in err and "pass a step-N folder" in err
    (step.parent.parent / "model").symlink_to(step)  # e.g. a run dumped into an import's OUTDIR
    err = one_line_error(*run_cli(export_main, [step.parent.parent, tmp_path / "x", "--format", "hf-tied"], capsys)[::2], "tiedmoe-export")
    assert "holds 2 checkpoints" in err and "pass the one to use" in err
