"""experiments/reproduce_tying.py --quick: two variants train, are evaluated and land
in the table (markdown and JSON) and the loss-curve plots."""

import json
import os
import subprocess
import sys
from itertools import islice

import pytest

from tiedmoe_titan.data import DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "reproduce_tying.py")


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
    assert "val_loss_vs_untied" in rows["g4"]
    table = (out / "results.md").read_text()
    assert "| untied (G=1) |" in table and "| tied G=4, 2+2 anchors |" in table
    for run in results["runs"]:
        assert run["train_curve"] and run["val_curve"]

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed (pip install '.[experiments]'): the plots were not checked")
    for plot in ("train_loss.png", "val_loss.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
