"""Issue #16's report from the paper-style groups' output folders (written by
``reproduce_tying.py --paper ...``, see docs/results.md): the G=4 gap at each corner of
depth x optimizer, the bank LR under Muon, and the gap against tokens on the doc corpus.

    python experiments/summarize_paper.py     # outputs/reproduce_tying_paper* -> docs/results/paper/

Writes ``summary.md`` (the tables), ``summary.json`` and ``gap_vs_tokens.png``, and copies
each group's ``results.{json,md}`` and plots into a folder of its own. A group that has not
run yet is named as missing; nothing is trained here."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_tying import paired_difference  # noqa: E402  (the groups' own pairing by seed)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIED = ("g4", "g4_lr_inv_sqrt_g")  # the G=4 variants the groups hold

# (MoE layers, optimizer recipe) -> the group's output folder; the G=4 variant each compares.
CORNERS = {
    (8, "AdamW"): "reproduce_tying_paper_adamw_8layers",
    (16, "AdamW"): "reproduce_tying_paper_adamw",
    (8, "Muon"): "reproduce_tying_paper_8layers",
    (16, "Muon"): "reproduce_tying_paper",
}
TOKEN_GROUPS = ("reproduce_tying_paper_doc_1x", "reproduce_tying_paper_doc_4x")
# Paired comparisons within the paper group that no column of its table shows.
WITHIN_PAPER = (("g4", "g4_lr_inv_sqrt_g"), ("narrow", "g4_lr_inv_sqrt_g"), ("narrow", "g4"))
PLOTS = ("train_loss.png", "val_loss.png", "val_loss_vs_untied.png")


def read_group(outputs: str, name: str) -> dict | None:
    path = os.path.join(outputs, name, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def row(group: dict, variant: str) -> dict | None:
    return next((r for r in group["rows"] if r["variant"] == variant), None)


def delta(group: dict, variant: str) -> str:
    r = row(group, variant)
    return pm(r and r.get("val_loss_vs_untied"))


def pm(d: dict | None) -> str:
    if not d:
        return "—"
    return f"{d['diff']:+.4f} ± {d['standard_error']:.4f} ({d['seeds_worse']}/{d['n']} worse)"


def runs_of(group: dict, variant: str) -> list[dict]:
    return [r for r in group["runs"] if r["variant"] == variant]


def tokens_per_run(group: dict) -> int:
    s = group["scale"]
    return s["steps"] * s["batch"] * s["seq_len"]


def in_run_gap(group: dict, variant: str) -> list[tuple[int, float, float]]:
    """(step, mean, s.e.) of the in-run validation loss minus untied's, paired by seed."""
    curves = {name: {r["seed"]: dict(r["val_curve"]) for r in runs_of(group, name)} for name in ("untied", variant)}
    if not all(curves.values()):
        return []
    steps = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs.values())))
    out = []
    for step in steps:
        at_step = {name: [{"seed": seed, "val_loss": c[step]} for seed, c in runs.items()] for name, runs in curves.items()}
        d = paired_difference(at_step[variant], at_step["untied"])
        out.append((step, d["diff"], d["standard_error"]))
    return out


def copy_group(outputs: str, name: str, docs: str) -> None:
    dest = os.path.join(docs, name.removeprefix("reproduce_tying_") or "paper")
    os.makedirs(dest, exist_ok=True)
    for f in ("results.json", "results.md", *PLOTS):
        src = os.path.join(outputs, name, f)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dest, f))


def plot_gap_vs_tokens(points: list[dict], docs: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("summarize_paper: matplotlib is not installed (pip install '.[experiments]'): no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, p in enumerate(points):
        color = f"C{i}"
        curve = p["in_run_gap"]
        tokens_per_step = p["tokens"] / p["steps"]
        ax.plot([s * tokens_per_step / 1e6 for s, _, _ in curve], [m for _, m, _ in curve], color=color, alpha=0.5,
                linestyle=":", label=f"{p['label']}: in-run validation (8 batches) during the run")
        ax.errorbar(p["tokens"] / 1e6, p["diff"], yerr=2 * p["standard_error"], fmt="o", capsize=5, color=color,
                    label=f"{p['label']}: held-out loss at the end, mean ± 2 s.e. (n={p['n']})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("G=4 loss − untied's, same seed (nats)")
    ax.set_title("G=4 gap against tokens (doc corpus, paper recipe, 16 MoE layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = os.path.join(docs, "gap_vs_tokens.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outputs", default=os.path.join(REPO, "outputs"), help="where the groups' folders are")
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "results", "paper"), help="where the report goes")
    a = p.parse_args(argv)
    os.makedirs(a.docs, exist_ok=True)
    groups = {name: read_group(a.outputs, name) for name in (*CORNERS.values(), *TOKEN_GROUPS)}
    missing = [name for name, g in groups.items() if g is None]
    for name, group in groups.items():
        if group is not None:
            copy_group(a.outputs, name, a.docs)

    lines = ["G=4 (2+2 anchors) held-out loss minus untied's, paired by seed (± s.e.), bank LR as the rest's:", "",
             "| MoE layers | optimizer | G=4 − untied | group |", "|---|---|---|---|"]
    for (layers, optimizer), name in CORNERS.items():
        g = groups[name]
        lines.append(f"| {layers} | {optimizer} | {delta(g, 'g4') if g else 'not run'} | `outputs/{name}` |")
    paper = groups[CORNERS[(16, "Muon")]]
    if paper:
        lines += ["", "The paper's recipe and depth (16 MoE layers, Muon), every variant:", "",
                  "| variant | Δ vs untied |", "|---|---|"]
        lines += [f"| {r['label']} | {delta(paper, r['variant'])} |" for r in paper["rows"] if r["variant"] != "untied"]
        lines += ["", "| paired by seed | difference |", "|---|---|"]
        lines += [f"| {a} − {b} | {pm(paired_difference(runs_of(paper, a), runs_of(paper, b)))} |"
                  for a, b in WITHIN_PAPER if runs_of(paper, a) and runs_of(paper, b)]

    points = []
    for name in TOKEN_GROUPS:
        g = groups[name]
        variant = g and next((v for v in TIED if row(g, v)), None)
        if variant and row(g, variant).get("val_loss_vs_untied"):
            d = row(g, variant)["val_loss_vs_untied"]
            points.append({"group": name, "label": f"{g['scale']['steps']} steps", "variant": variant,
                           "tokens": tokens_per_run(g), "steps": g["scale"]["steps"], **d,
                           "in_run_gap": in_run_gap(g, variant)})
    if points:
        lines += ["", "The gap against tokens (doc corpus, paper recipe, 16 MoE layers):", "",
                  "| tokens per run | G=4 variant | G=4 − untied | group |", "|---|---|---|---|"]
        lines += [f"| {p['tokens'] / 1e6:.2f}M | {p['variant']} | {p['diff']:+.4f} ± {p['standard_error']:.4f} "
                  f"({p['seeds_worse']}/{p['n']} worse) | `outputs/{p['group']}` |" for p in points]
    walls = {name: g["wall_seconds"] for name, g in groups.items() if g}
    lines += ["", "Wall time per group (min): " + ", ".join(f"{n.removeprefix('reproduce_tying_')} {s / 60:.1f}"
                                                      for n, s in walls.items())]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing)]
    plot = plot_gap_vs_tokens(points, a.docs) if points else None
    with open(os.path.join(a.docs, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.docs, "summary.json"), "w") as f:
        json.dump({"gap_vs_tokens": points, "wall_seconds": walls, "missing": missing}, f, indent=1)
    print("\n".join(lines))
    print(f"summarize_paper: wrote {a.docs}/summary.md, summary.json" + (", gap_vs_tokens.png" if plot else ""))


if __name__ == "__main__":
    main()
