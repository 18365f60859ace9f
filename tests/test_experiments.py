"""experiments/reproduce_tying.py: the variants of one seed start from common initial
weights and are compared with untied seed by seed; --quick trains two variants, which
are evaluated and land in the table (markdown and JSON) and the loss-curve plots."""

import importlib.util
import json
import os
import subprocess
import sys
from itertools import islice

import pytest
import torch
from conftest import load_all

from tiedmoe_titan.data import DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "reproduce_tying.py")


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_tying", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_variants_of_a_seed_start_from_common_weights(tmp_path):
    """A tied model of seed s is the untied model of seed s without the other layers'
    experts; a variant of another shape shares what has the same shape; seeds differ."""
    script = load_script()
    variants = {v.name: v for v in script.VARIANTS}
    chosen = [variants[n] for n in ("untied", "g4", "narrow")]
    scale = script.SCALES["quick"]
    first = script.initial_weights(scale, chosen, 0, str(tmp_path))
    untied, g4, narrow = (load_all(first[n]) for n in ("untied", "g4", "narrow"))

    assert set(g4) < set(untied)
    for key, tensor in g4.items():
        assert torch.equal(tensor, untied[key]), key
    dropped = sorted(set(untied) - set(g4))
    assert dropped and all(".moe.experts." in k for k in dropped)  # only non-owner experts

    same_shape = [k for k in narrow if narrow[k].shape == untied[k].shape]
    other_shape = [k for k in narrow if narrow[k].shape != untied[k].shape]
    assert other_shape and all(".moe." in k for k in other_shape)  # fewer experts, smaller routers: own draw
    for key in same_shape:
        assert torch.equal(narrow[key], untied[key]), key

    second = load_all(script.initial_weights(scale, chosen[:1], 1, str(tmp_path))["untied"])
    assert not torch.equal(second["tok_embeddings.weight"], untied["tok_embeddings.weight"])


def test_difference_is_paired_by_seed():
    script = load_script()
    untied = [{"seed": 0, "val_loss": 5.0}, {"seed": 1, "val_loss": 4.0}, {"seed": 2, "val_loss": 4.5}]
    tied = [{"seed": 2, "val_loss": 4.53}, {"seed": 0, "val_loss": 5.01}, {"seed": 1, "val_loss": 4.02}]
    diff = script.paired_difference(tied, untied)
    assert diff["n"] == 3 and diff["seeds_worse"] == 3
    assert diff["diff"] == pytest.approx(0.02)
    assert diff["standard_error"] == pytest.approx(0.01 / 3**0.5)  # per-seed diffs 0.01, 0.02, 0.03


def head(source: str, target, lines: int) -> str:
    """The first documents of a bundled corpus file: enough for a few steps, quick to tokenize."""
    with open(source) as f:
        target.write_text("".join(islice(f, lines)))
    return str(target)


def test_quick_comparison_writes_table_and_plots(tmp_path):
    train = head(DEFAULT_TRAIN_PATH, tmp_path / "train.jsonl", 30)
    valid = head(DEFAULT_VALID_PATH, tmp_path / "valid.jsonl", 2)
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--quick", "--out", str(out), "--data-train", train, "--data-valid", valid]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    assert set(rows) == {"untied", "g4"}
    assert rows["g4"]["unique_params"] < rows["untied"]["unique_params"]
    assert rows["g4"]["active_params"] == rows["untied"]["active_params"]
    for row in rows.values():
        assert row["val_loss"]["n"] == 1 and row["val_loss"]["mean"] > 0
        assert row["val_perplexity"]["mean"] > 1 and row["tokens_per_s"]["mean"] > 0
    assert rows["g4"]["val_loss_vs_untied"]["n"] == 1
    table = (out / "results.md").read_text()
    assert "| untied (G=1) |" in table and "| tied G=4, 2+2 anchors |" in table
    for run in results["runs"]:
        assert run["train_curve"] and run["val_curve"]

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed (pip install '.[experiments]'): the plots were not checked")
    for plot in ("train_loss.png", "val_loss.png", "val_loss_vs_untied.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_folder_of_other_settings_is_refused(tmp_path):
    """Runs under --out are reused by name: reusing them under other settings would mix
    two comparisons in one table."""
    script = load_script()
    scale = script.SCALES["quick"]
    script.claim_out_folder(str(tmp_path), scale, "train.jsonl", "valid.jsonl")
    more_seeds = script.dataclasses.replace(scale, seeds=5)
    script.claim_out_folder(str(tmp_path), more_seeds, "train.jsonl", "valid.jsonl")  # adds to it
    with pytest.raises(SystemExit, match=r"other settings \(steps: 8 -> 9\)"):
        script.claim_out_folder(str(tmp_path), script.dataclasses.replace(scale, steps=9), "train.jsonl", "valid.jsonl")
    with pytest.raises(SystemExit, match="train_data"):
        script.claim_out_folder(str(tmp_path), scale, "other.jsonl", "valid.jsonl")
