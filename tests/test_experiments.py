"""experiments/reproduce_tying.py: the variants of one seed start from common initial
weights and are compared with untied seed by seed; --quick trains two variants, which
are evaluated and land in the table (markdown and JSON) and the loss-curve plots;
--paper --quick does the same under the reference's Muon recipe at 16 MoE layers; an
output folder is reused only by the same settings and code. experiments/build_doc_corpus.py:
the prose of HTML and POD pages. experiments/summarize_paper.py: the groups' paired gaps,
by corner and by tokens, and the groups not run yet."""

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from itertools import islice

import pytest
import torch
from conftest import load_all

from tiedmoe_titan.data import DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "reproduce_tying.py")
SUMMARIZER = os.path.join(REPO, "experiments", "summarize_paper.py")
CORPUS_BUILDER = os.path.join(REPO, "experiments", "build_doc_corpus.py")


def load_script(path: str = SCRIPT):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
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


def _group(script, steps: int, g4_name: str, gaps: list[float]) -> dict:
    """A group's results.json as reproduce_tying writes it, with held-out gaps per seed."""
    runs = []
    for seed, gap in enumerate(gaps):
        curve = [[steps // 2, 5.0 + seed], [steps, 4.0 + seed]]
        runs.append({"variant": "untied", "seed": seed, "val_loss": 4.0 + seed, "val_curve": curve})
        runs.append({"variant": g4_name, "seed": seed, "val_loss": 4.0 + seed + gap,
                     "val_curve": [[s, v + 2 * gap] for s, v in curve]})
    rows = [{"variant": "untied", "label": "untied"},
            {"variant": g4_name, "label": g4_name, "val_loss_vs_untied": script.paired_difference(runs[1::2], runs[::2])}]
    return {"scale": {"steps": steps, "batch": 8, "seq_len": 128}, "wall_seconds": 60.0, "rows": rows, "runs": runs}


def test_paper_summary_reads_each_groups_paired_gap(tmp_path):
    script, summarizer = load_script(), load_script(SUMMARIZER)
    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    groups = {
        "reproduce_tying_paper": _group(script, 400, "g4", [0.01, 0.03]),
        "reproduce_tying_paper_doc_1x": _group(script, 400, "g4_lr_inv_sqrt_g", [0.04, 0.06, 0.05]),
        "reproduce_tying_paper_doc_4x": _group(script, 1600, "g4_lr_inv_sqrt_g", [0.01, 0.02, 0.03]),
    }
    for name, group in groups.items():
        (outputs / name).mkdir(parents=True)
        (outputs / name / "results.json").write_text(json.dumps(group))
    summarizer.main(["--outputs", str(outputs), "--docs", str(docs)])

    summary = (docs / "summary.md").read_text()
    assert "| 16 | Muon | +0.0200 ± 0.0100 (2/2 worse) |" in summary
    assert "| 8 | AdamW | not run |" in summary
    assert "Not run yet: reproduce_tying_paper_adamw_8layers, reproduce_tying_paper_adamw, reproduce_tying_paper_8layers" in summary
    points = json.loads((docs / "summary.json").read_text())["gap_vs_tokens"]
    assert [(p["tokens"], round(p["diff"], 6)) for p in points] == [(409_600, 0.05), (1_638_400, 0.02)]
    assert [[round(m, 6) for _, m, _ in p["in_run_gap"]] for p in points] == [[0.1, 0.1], [0.04, 0.04]]
    assert (docs / "paper_doc_4x" / "results.json").exists()


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


def test_paper_quick_comparison_trains_with_the_muon_recipe(tmp_path):
    """--paper --quick: 16 MoE layers under the reference's recipe (Muon at 0.02, AdamW
    at a tenth), untied and G=4 with the bank LR / sqrt(4), evaluated and paired."""
    script = load_script()
    train = head(DEFAULT_TRAIN_PATH, tmp_path / "train.jsonl", 30)
    valid = head(DEFAULT_VALID_PATH, tmp_path / "valid.jsonl", 2)
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--paper", "--quick", "--out", str(out), "--data-train", train, "--data-valid", valid]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = {row["variant"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"untied", "g4_lr_inv_sqrt_g"}
    assert rows["g4_lr_inv_sqrt_g"]["val_loss_vs_untied"]["n"] == 1
    assert json.loads((out / "settings.json").read_text())["code"] == script.code_version()
    muon = script.RECIPES["muon"].optimizer
    for name in rows:
        run = out / "runs" / f"{name}-s0"
        recipe = tomllib.loads((run / "recipe.resolved.toml").read_text())
        assert recipe["optimizer"]["lr"] == 0.02
        assert {k: recipe["optimizer"][k] for k in muon if k != "muon"} == {k: v for k, v in muon.items() if k != "muon"}
        assert {k: recipe["optimizer"]["muon"][k] for k in muon["muon"]} == muon["muon"]
        assert json.loads((run / "flavor.json").read_text())["n_layers"] == 16
        bank_lr = recipe["tying"]["bank_lr_scale"]
        assert bank_lr == ("inv_sqrt_g" if name == "g4_lr_inv_sqrt_g" else "none")


def test_paper_groups_have_their_own_folders_and_variants():
    """Each group of runs is one command into its own folder: the paper's variants under
    its recipe, and the attribution (untied, G=4) with today's optimizer or depth."""
    script = load_script()
    groups = {
        ("--paper",): ("reproduce_tying_paper", "muon", 16, script.PAPER_MODE_VARIANTS),
        ("--paper", "--optimizer", "adamw"): ("reproduce_tying_paper_adamw", "adamw", 16, ("untied", "g4")),
        ("--paper", "--layers", "8"): ("reproduce_tying_paper_8layers", "muon", 8, ("untied", "g4")),
        ("--paper", "--steps", "1600"): ("reproduce_tying_paper_1600steps", "muon", 16, script.PAPER_MODE_VARIANTS),
        (): ("reproduce_tying", None, 8, script.DEFAULT_VARIANTS),
    }
    for argv, (folder, recipe, layers, variants) in groups.items():
        a = script.parse_args(list(argv))
        assert script.default_out_folder(a) == folder, argv
        if not a.paper:
            continue
        scale = script.paper_scale(a.optimizer, a.layers, a.steps, a.seeds, a.quick)
        assert scale.variants == variants and scale.shape == {"n_layers": layers} and scale.seeds == 4, argv
        assert (scale.lr, scale.optimizer) == (script.RECIPES[recipe].lr, script.RECIPES[recipe].optimizer), argv
    # Warm-up as a fraction of the run: the reference's 100 of 20,000 steps, today's 20 of 400.
    assert script.paper_scale("muon", 16, 1600, None, False).warmup == 8
    assert script.paper_scale("adamw", 16, None, None, False).warmup == 20
    assert script.paper_scale("muon", 16, None, None, False) == script.SCALES["paper"]
    for wrong in (["--layers", "8"], ["--optimizer", "adamw"], ["--paper", "--scale"], ["--paper", "--layers", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(wrong)


def test_output_folder_of_other_code_is_refused(tmp_path, monkeypatch):
    script = load_script()
    scale = script.SCALES["quick"]
    script.claim_out_folder(str(tmp_path), scale, "train.jsonl", "valid.jsonl")
    monkeypatch.setattr(script, "code_version", lambda: "0123abc")
    with pytest.raises(SystemExit, match=r"other settings \(code: .* -> 0123abc\)"):
        script.claim_out_folder(str(tmp_path), scale, "train.jsonl", "valid.jsonl")


def test_code_version_follows_the_code_a_run_depends_on(tmp_path, monkeypatch):
    """The last commit of the run's code, plus a digest of its uncommitted changes: a
    commit elsewhere changes nothing, each different edit gives another version."""
    script = load_script()
    monkeypatch.setattr(script, "REPO", str(tmp_path))

    def git(*args):
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "tiedmoe_titan").mkdir()
    (tmp_path / "tiedmoe_titan" / "model.py").write_text("width = 1\n")
    git("add", "-A")
    git("commit", "-q", "-m", "model")
    model_commit = git("rev-parse", "HEAD")
    assert script.code_version() == model_commit
    (tmp_path / "notes.md").write_text("results\n")
    git("add", "notes.md")
    git("commit", "-q", "-m", "docs")
    assert script.code_version() == model_commit

    (tmp_path / "tiedmoe_titan" / "model.py").write_text("width = 2\n")
    edited = script.code_version()
    assert edited.startswith(model_commit + "+uncommitted:")
    (tmp_path / "tiedmoe_titan" / "model.py").write_text("width = 3\n")
    assert script.code_version() not in (edited, model_commit)
    (tmp_path / "tiedmoe_titan" / "model.py").write_text("width = 1\n")
    (tmp_path / "tiedmoe_titan" / "loader.py").write_text("new = True\n")  # untracked code counts too
    assert script.code_version().startswith(model_commit + "+uncommitted:")


def test_doc_corpus_keeps_prose_and_drops_code_and_navigation():
    builder = load_script(CORPUS_BUILDER)
    page = """<html><head><title>T</title></head><body>
    <ul class="docnav"><li>Prev</li><li>Next</li></ul>
    <div class="toc"><dl><dt>1. Contents</dt></dl></div>
    <h1>1. Packages</h1><p>APT installs a <code>.deb</code> and
    its dependencies.<p>Second paragraph &amp; more.</p>
    <pre>apt-get install foo</pre><div class="para">A DocBook paragraph.</div>
    <table><tr><td>cell</td></tr></table><ul><li>an item</li></ul></body></html>"""
    assert builder.html_prose(page).split("\n\n") == [
        "1. Packages", "APT installs a .deb and its dependencies.", "Second paragraph & more.",
        "A DocBook paragraph.", "an item",
    ]
    pod = """=head1 NAME

perlfoo - a B<bold> claim about C<< $a <=> $b >>

    my $code = "verbatim, left out";

=over 4

=item * Z<>An item with E<lt>angleE<gt> brackets

See L<perlfunc/sort> and L<the manual|perlop> for more.X<index entry>

=back

=begin html

<p>formatter-specific</p>

=end html

=cut

code after =cut
"""
    assert builder.pod_prose(pod).split("\n\n") == [
        "NAME", "perlfoo - a bold claim about $a <=> $b", "An item with <angle> brackets",
        'See "sort" in perlfunc and the manual for more.',
    ]
