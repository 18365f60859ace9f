"""Reproduce the tied-experts comparison: untied, tied G=2 / G=4, G=4 with 4x bank
expansion and the iso-parameter narrow control, trained on the same tokens.

    python experiments/reproduce_tying.py [--out DIR] [--data-train GLOBS --data-valid GLOBS]
                                          [--seeds 6] [--jobs 2] [--quick | --scale]
                                          [--paper [--optimizer muon|adamw] [--layers 16]]

Every variant x seed is one ``tiedmoe-train`` run (a subprocess) of the same model
shape on the same data in the same order, started from that seed's initial weights.
The variants of one seed share those weights wherever they have the same tensor
(``initial_weights``: common random numbers), so a variant's held-out loss is compared
with untied's seed by seed. With independent draws, the seed-to-seed spread of this
small MoE (0.01-0.04 nats) hid a 0.02-nat difference; paired, the differences
spread much less. Per run:

* train and in-run validation loss curves and tokens/s come from the run's TensorBoard
  events; the final train loss is the mean of the last ``FINAL_TRAIN_POINTS`` logged
  steps (one step's loss is one batch's; every run sees the same batches);
* the held-out loss and perplexity are ``tiedmoe-eval``'s (``tiedmoe_titan.eval``) on
  the run's last checkpoint over every token of the validation files.

Per variant, once: unique and active parameters (``tiedmoe-plan``'s counts) and the
peak tensor memory of one training step (``shard_check.peak_step_memory``: torch's
MemTracker on CPU, which follows every tensor of the step; the CUDA allocator's peak on
a GPU; never process RSS), measured on synthetic tokens of the same batch shape in one
``shard_check`` launch that takes a run slot (MemTracker makes that step slow, minutes
on CPU; ``--quick`` skips it).

Tokens/s is the median over a run's logged intervals (the first excluded) with
``--jobs`` runs side by side, each on cores / jobs threads: on a shared machine it
moves with the load, so compare it within one comparison only.

Positive controls, which should come out clearly worse, or the comparison could not see
a real loss: all MoE layers share one bank (G = every MoE layer, no anchors) holding
only top-k experts, so the layers stop routing and share one set of expert weights;
and the same with experts ``THIN_EXPERT_FFN`` wide (next to no expert capacity).

The default corpus is real English prose available offline: the docstrings of this
Python's standard library (``tiedmoe_titan.assets.stdlib_corpus``, one document
per module, split into train / valid by module path), collected under ``--out``. More
text, for longer runs: ``experiments/build_doc_corpus.py`` (Debian's documentation as
token shards, ``--data-train outputs/doc_corpus/train --data-valid outputs/doc_corpus/valid``).

Paper-style mode (``--paper``): the recipe of the paper's reference code (epfml/looped-moe,
``moe_train.py``: ``build_optimizer``, ``get_lr``, ``TRAIN_CONFIGS``) on the debug shape
with 16 MoE layers, the depth of the paper's OLMoE-style model (everything else as the
default: d128, 8 experts top-2, expert FFN 64). Its variants: untied, G=2 and G=4 with the
bank LR / sqrt(G) (the reference's G=4 runs pass ``--tied-lr-divisor 2.0``), G=4 unscaled,
G=4 with a 4x bank (LR / sqrt(G)) and the narrow control of G=4. The reference's settings
mapped onto this project's knobs::

    reference (torch.optim.Muon + AdamW)       here
    Muon on 2-D matrices and on each expert    optimizer.name = "Muon" (banks are
      matrix on its own                          orthogonalised expert by expert)
    Muon lr 2e-2, cosine to 2e-3               optimizer.lr = 0.02; lr_scheduler.decay_type =
                                                 "cosine", min_lr_factor = 0.1 (base recipe)
    100 linear warm-up steps of 20,000         lr_scheduler.warmup_steps = 0.5% of the steps
    momentum 0.95, Nesterov                    optimizer.muon.momentum = 0.95, nesterov = true
    adjust_lr_fn None (torch's default)        optimizer.muon.adjust_lr_fn = "original"
    Newton-Schulz: torch's, 5 steps, bf16      optimizer.muon.ns_steps = 5, ns_dtype = "bfloat16"
    Muon weight decay 0.1                      optimizer.muon.weight_decay = 0.1
    AdamW at 0.1 x the Muon lr (and schedule)  optimizer.muon.adamw_lr_ratio = 0.1
    AdamW weight decay 0.01, betas 0.9, 0.95,  optimizer.weight_decay = 0.01, beta1 = 0.9,
      eps 1e-8 (torch's default)                 beta2 = 0.95, eps = 1e-8
    AdamW on router, embeddings, head, 1-D     the same split (muon.muon_and_adamw_params)
    gradient clipping 1.0                      training.max_norm = 1.0 (base recipe)
    aux loss 0.01, z-loss 1e-4, layer means    routing.aux_loss_coeff = 0.01, z_loss_coeff =
                                                 1e-4, layer means (base recipe)
    --tied-lr-divisor 2.0 at G=4               tying.bank_lr_scale = "inv_sqrt_g" (1/sqrt(4))

Not mapped exactly (no knob here, or not an optimizer setting): the reference's OLMoE
stores an expert's w1 and w3 as one fused (2 x FFN, dim) matrix, which Muon
orthogonalises as a whole; here they are orthogonalised one by one (their LR adjustment,
sqrt(max(1, out / in)), is 1 either way at this shape). The reference re-initialises every
matrix with depth-scaled Xavier (gain 1 / sqrt(3 x layers)); here torchtitan's init. Its
G=4 runs take a 2x micro-batch at the same tokens per step, so their routing losses are
means over twice the tokens; here every variant takes one micro-batch per step. It trains
under bf16 autocast; here in fp32. Warm-up cannot be both 100 steps and 0.5% of a run
50x shorter: the fraction is kept.

Attribution: ``--paper --optimizer adamw`` (16 layers, today's AdamW recipe: lr 3e-3,
weight decay 0.1, 5% warm-up) and ``--paper --layers 8`` (the Muon recipe at the default
depth) train untied and G=4 (bank LR as the rest) by default: depth alone, optimizer
alone. Each setting has its own default output folder.

Outputs under ``--out``: ``results.json``, ``results.md`` (the table), ``train_loss.png``,
``val_loss.png`` and ``val_loss_vs_untied.png`` (matplotlib), ``init/s<seed>/<variant>``
(initial weights), ``runs/<variant>-s<seed>/`` (each run's dump folder, log and
``result.json``; a run whose ``result.json`` exists is not run again, so an interrupted
comparison resumes, and more seeds or variants add to it). ``settings.json`` records
the training settings and the code they ran (``code_version``); a later invocation with
other settings or other code is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_RECIPE = os.path.join(REPO, "recipes", "debug_cpu.toml")
# Runs train in subprocesses but are evaluated in this process's worker threads, and
# the recipe parser (tyro) keeps a process-wide stack that two threads corrupt.
EVAL_LOCK = threading.Lock()
FINAL_TRAIN_POINTS = 5  # logged steps averaged into the final train loss
ALL_LAYERS = -1  # group_size placeholder: every MoE layer of the model
THIN_EXPERT_FFN = 8  # expert FFN width of the second positive control


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    tying: dict
    shape: dict = field(default_factory=dict)  # model-arg overrides on top of the scale's shape
    positive_control: bool = False


ANCHORS = {"untied_first": 2, "untied_last": 2}
VARIANTS = (
    Variant("untied", "untied (G=1)", {"group_size": 1}),
    Variant("g2", "tied G=2, 2+2 anchors", {"group_size": 2, **ANCHORS}),
    Variant("g4", "tied G=4, 2+2 anchors", {"group_size": 4, **ANCHORS}),
    Variant("g4_x4", "tied G=4, 2+2 anchors, 4x bank", {"group_size": 4, **ANCHORS, "bank_expansion": 4}),
    Variant("narrow", "narrow control of G=4 (untied, iso-params)", {"group_size": 4, **ANCHORS, "narrow_control": True}),
    Variant(
        "one_bank_topk", "positive control: one bank of top-k experts for all layers",
        {"group_size": ALL_LAYERS}, shape={"moe_args": {"num_experts": "top_k"}}, positive_control=True,
    ),
    # The same with experts THIN_EXPERT_FFN wide: almost no expert capacity left at all.
    Variant(
        "thin_one_bank", f"positive control: as above, experts {THIN_EXPERT_FFN} wide",
        {"group_size": ALL_LAYERS}, shape={"moe_inter_dim": THIN_EXPERT_FFN, "moe_args": {"num_experts": "top_k"}},
        positive_control=True,
    ),
)
# The comparison of the default and --scale modes; the ablations below run on request (--variants).
DEFAULT_VARIANTS = tuple(v.name for v in VARIANTS)


def bank_lr_variant(base: Variant, bank_lr_scale: str) -> Variant:
    """``base`` with each shared bank's learning rate scaled by ``tying.bank_lr_scale``."""
    g = base.tying["group_size"]
    label = {"inv_sqrt_g": f"/ sqrt({g})", "inv_g": f"/ {g}"}[bank_lr_scale]
    return Variant(f"{base.name}_lr_{bank_lr_scale}", f"{base.label}, bank LR {label}",
                   {**base.tying, "bank_lr_scale": bank_lr_scale})


_BY_NAME = {v.name: v for v in VARIANTS}
VARIANTS += (
    # The default comparison's bank-LR ablation.
    bank_lr_variant(_BY_NAME["g4"], "inv_sqrt_g"),
    bank_lr_variant(_BY_NAME["g4"], "inv_g"),
    # --paper's tied variants: its reference divides a shared bank's LR by sqrt(G).
    bank_lr_variant(_BY_NAME["g2"], "inv_sqrt_g"),
    bank_lr_variant(_BY_NAME["g4_x4"], "inv_sqrt_g"),
)
QUICK_VARIANTS = ("untied", "g4")
# --paper: the reference's bank-LR rule on every tied variant, and G=4 without it.
PAPER_MODE_VARIANTS = ("untied", "g2_lr_inv_sqrt_g", "g4_lr_inv_sqrt_g", "g4", "g4_x4_lr_inv_sqrt_g", "narrow")
# --paper with today's optimizer or depth changes one thing against the default
# comparison, so G=4 keeps its bank LR as the rest's there.
ATTRIBUTION_VARIANTS = ("untied", "g4")
QUICK_PAPER_VARIANTS = ("untied", "g4_lr_inv_sqrt_g")
PAPER_LAYERS = 16  # the paper's OLMoE-style model: 16 layers, all MoE


@dataclass(frozen=True)
class Recipe:
    """An optimizer and its schedule: ``[optimizer]`` keys besides ``lr``, and the
    warm-up as a fraction of the run (runs here are far shorter than the recipes' own)."""

    lr: float
    warmup_fraction: float
    optimizer: dict

    def warmup(self, steps: int) -> int:
        return max(1, round(self.warmup_fraction * steps))


RECIPES = {
    # Today's: recipes/debug_cpu.toml with the default scale's lr and warm-up (20 of 400 steps).
    "adamw": Recipe(lr=3e-3, warmup_fraction=20 / 400,
                    optimizer={"name": "AdamW", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}),
    # The paper's reference, mapped key by key in the module docstring (100 warm-up steps of 20,000).
    "muon": Recipe(lr=2e-2, warmup_fraction=100 / 20_000, optimizer={
        "name": "Muon", "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
        "muon": {"adamw_lr_ratio": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_dtype": "bfloat16",
                 "adjust_lr_fn": "original", "weight_decay": 0.1},
    }),
}


@dataclass(frozen=True)
class Scale:
    """Model shape (overrides of the olmoe debug flavor), training budget and optimizer."""

    shape: dict
    steps: int
    batch: int
    seq_len: int
    warmup: int
    log_freq: int
    val_freq: int
    val_batches: int
    lr: float
    seeds: int
    variants: tuple[str, ...]
    mixed_precision: str = "float32"
    optimizer: dict = field(default_factory=dict)  # [optimizer] keys besides lr; none: the base recipe's AdamW


PAPER_STEPS = 400
SCALES = {
    # The olmoe debug flavor (d128, 8 layers, 8 experts top-2, expert FFN 64, vocab 2048).
    "default": Scale(shape={}, steps=400, batch=8, seq_len=128, warmup=20, log_freq=10, val_freq=100, val_batches=8,
                     lr=3e-3, seeds=6, variants=DEFAULT_VARIANTS),
    # A CI smoke test: two variants, one seed, a handful of steps.
    "quick": Scale(shape={}, steps=8, batch=2, seq_len=64, warmup=2, log_freq=2, val_freq=4, val_batches=2,
                   lr=3e-3, seeds=1, variants=QUICK_VARIANTS),
    # The same comparison bigger, for a GPU: d512, 16 layers, 16 experts top-4.
    "scale": Scale(
        shape={"dim": 512, "n_layers": 16, "n_heads": 8, "n_kv_heads": 8, "head_dim": 64, "moe_inter_dim": 256,
               "max_seq_len": 1024, "moe_args": {"num_experts": 16, "top_k": 4}},
        steps=5000, batch=32, seq_len=1024, warmup=200, log_freq=50, val_freq=500, val_batches=16,
        lr=1e-3, seeds=3, variants=DEFAULT_VARIANTS, mixed_precision="bfloat16",
    ),
    # --paper: the debug flavor at the paper's depth, the reference's Muon recipe.
    "paper": Scale(
        shape={"n_layers": PAPER_LAYERS}, steps=PAPER_STEPS, batch=8, seq_len=128, warmup=RECIPES["muon"].warmup(PAPER_STEPS),
        log_freq=10, val_freq=100, val_batches=8, lr=RECIPES["muon"].lr, seeds=4, variants=PAPER_MODE_VARIANTS,
        optimizer=RECIPES["muon"].optimizer,
    ),
}


def paper_scale(recipe: str, layers: int, steps: int | None, seeds: int | None, quick: bool) -> Scale:
    """--paper's scale with the recipe, depth and steps asked for (--quick: the smoke
    test's budget). The variants: the paper's at its recipe and depth; otherwise those
    of the attribution, untied and G=4."""
    budget = SCALES["quick" if quick else "paper"]
    steps = steps or budget.steps
    if quick:
        variants = QUICK_PAPER_VARIANTS
    elif (recipe, layers) == ("muon", PAPER_LAYERS):
        variants = PAPER_MODE_VARIANTS
    else:
        variants = ATTRIBUTION_VARIANTS
    return dataclasses.replace(
        budget, shape={"n_layers": layers}, steps=steps, warmup=RECIPES[recipe].warmup(steps), lr=RECIPES[recipe].lr,
        optimizer=RECIPES[recipe].optimizer, seeds=seeds or budget.seeds, variants=variants,
    )


def log(message: str) -> None:
    print(f"[reproduce_tying {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- model shape and tying of a variant ---------------------------------------------


def model_args(scale: Scale, variant: Variant):
    """The variant's model args: the olmoe debug flavor, the scale's shape, the variant's
    shape and tying."""
    from tiedmoe_titan.models import FAMILIES
    from tiedmoe_titan.tying import TieConfig

    args = copy.deepcopy(FAMILIES["olmoe"][1]["debug"])  # flavors are shared objects
    for key, value in _resolved_shape(scale, variant).items():
        current = getattr(args, key)
        setattr(args, key, dataclasses.replace(current, **value) if isinstance(value, dict) else value)
    args.tying = TieConfig(**tying_of(variant, args.n_layers))
    return args


def _resolved_shape(scale: Scale, variant: Variant) -> dict:
    shape = {**scale.shape, **variant.shape, "moe_args": {**scale.shape.get("moe_args", {}), **variant.shape.get("moe_args", {})}}
    if shape["moe_args"].get("num_experts") == "top_k":
        from tiedmoe_titan.models import FAMILIES

        shape["moe_args"]["num_experts"] = shape["moe_args"].get("top_k", FAMILIES["olmoe"][1]["debug"].moe_args.top_k)
    return shape


def tying_of(variant: Variant, n_layers: int) -> dict:
    """Every [tying] key (the base recipe's anchors must not leak into a variant)."""
    from tiedmoe_titan.tying import TieConfig

    tying = {**dataclasses.asdict(TieConfig()), **variant.tying}
    if tying["group_size"] == ALL_LAYERS:
        tying["group_size"] = n_layers  # every layer of the olmoe flavors is an MoE layer
    return tying


def check_shape(scale: Scale, variant: Variant) -> dict:
    """The variant as ``shard_check.CheckConfig`` fields (shape as model overrides)."""
    shape = _resolved_shape(scale, variant)
    args = model_args(scale, variant)
    return {
        "family": "olmoe", "flavor": "debug", "tying": tying_of(variant, args.n_layers), "model_overrides": shape,
        "batch": scale.batch, "seq_len": scale.seq_len, "microbatches": 1, "steps": 2, "timing": True,
        "expert_bias_rate": 0.0, "lr": scale.lr, "optimizer": scale.optimizer, "mixed_precision_param": scale.mixed_precision,
    }


# ---- data ---------------------------------------------------------------------------


def default_corpus(out: str) -> tuple[str, str]:
    """The stdlib-docstring corpus, collected under ``out`` once."""
    from tiedmoe_titan.assets.stdlib_corpus import build_stdlib_corpus

    folder = os.path.join(out, "corpus")
    train, valid = os.path.join(folder, "train.jsonl"), os.path.join(folder, "valid.jsonl")
    if not (os.path.isfile(train) and os.path.isfile(valid)):
        log(f"collecting the default corpus (standard-library docstrings) into {folder}")
        build_stdlib_corpus(folder, max_bytes=64_000_000)  # no real cap: every docstring (~1.9 MB)
    return train, valid


# ---- the output folder ----------------------------------------------------------------


# What a run's numbers depend on besides its settings: the package (model, loader,
# optimizer, trainer), the recipes and this script (the overrides it passes).
RUN_CODE = ("tiedmoe_titan", "recipes", "experiments/reproduce_tying.py", "pyproject.toml")


def code_version() -> str:
    """The last commit that changed ``RUN_CODE``, and if the working tree changes it
    further, a digest of those changes (diff and untracked files):
    ``<commit>`` or ``<commit>+uncommitted:<digest>``.

    Not HEAD, nor ``git describe --dirty``: a commit elsewhere (docs, tests) does not
    change a run, and would stop an interrupted comparison from resuming; and ``-dirty``
    names every uncommitted state alike, so two different edits would pass as one."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout

    try:
        commit = git("log", "-1", "--format=%H", "--", *RUN_CODE).decode().strip()
        diff = git("diff", "HEAD", "--binary", "--", *RUN_CODE)
        untracked = sorted(filter(None, git("ls-files", "--others", "--exclude-standard", "-z", "--", *RUN_CODE).split(b"\0")))
    except (OSError, subprocess.CalledProcessError):
        return "unknown: not a git checkout"
    if not diff and not untracked:
        return commit
    digest = hashlib.sha256(diff)
    for path in untracked:
        with open(os.path.join(REPO, path.decode()), "rb") as f:
            digest.update(path + b"\0" + f.read())
    return f"{commit}+uncommitted:{digest.hexdigest()[:16]}"


def claim_out_folder(out: str, scale: Scale, train: str, valid: str) -> None:
    """Finished runs and initial weights under ``out`` are reused, which is right only
    for the same settings and code: the first invocation records them in
    ``settings.json`` and a later one must match (more seeds or variants are fine)."""
    settings = {**dataclasses.asdict(scale), "train_data": os.path.abspath(train), "valid_data": os.path.abspath(valid),
                "code": code_version()}
    for key in ("seeds", "variants"):
        del settings[key]
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    path = os.path.join(out, "settings.json")
    if not os.path.isfile(path):
        with open(path, "w") as f:
            json.dump(settings, f, indent=1)
        return
    with open(path) as f:
        before = json.load(f)
    changed = [f"{k}: {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]
    if changed:
        raise SystemExit(f"reproduce_tying: {out} holds runs made with other settings ({'; '.join(changed)}): "
                         f"pass another --out, or remove the folder to start over")


# ---- common initial weights -----------------------------------------------------------


def initial_weights(scale: Scale, variants: list[Variant], seed: int, out: str) -> dict[str, str]:
    """Seed ``seed``'s initial checkpoint of every variant (variant -> DCP folder).

    Common random numbers: every variant starts from the untied model's initial weights
    at this seed wherever it has the same tensor (same name and shape), and from its
    own initialisation at this seed elsewhere. A bank is stored under its group's first
    layer's expert names and is initialised by that layer in a tied model too, so a
    tied G=2 / G=4 model starts as exactly the untied one with the other layers'
    experts dropped: the same embeddings, attention, norms, routers and owner experts.
    Each variant keeps its natural initial distribution; what changes is that the
    variants of one seed no longer differ by unrelated random draws, so the per-seed
    difference from untied measures tying, not the luck of the draw."""
    from tiedmoe_titan.saved_checkpoints import single_process
    from tiedmoe_titan.testing.shard_check import CheckConfig, initial_state

    import torch.distributed.checkpoint as dcp

    def init(variant: Variant) -> dict[str, torch.Tensor]:
        return initial_state(CheckConfig.from_fields({**check_shape(scale, variant), "seed": seed}))

    folders = {v.name: os.path.join(out, "init", f"s{seed}", v.name) for v in variants}
    missing = [v for v in variants if not os.path.isfile(os.path.join(folders[v.name], ".metadata"))]
    if not missing:
        return folders
    untied = init(next(v for v in VARIANTS if v.name == "untied"))
    for variant in missing:
        state = init(variant)
        shared = [k for k, t in state.items() if k in untied and untied[k].shape == t.shape]
        state.update({k: untied[k] for k in shared})
        numel = sum(t.numel() for t in state.values())
        log(f"{variant.name}-s{seed}: initial weights, {sum(state[k].numel() for k in shared) / numel:.0%} "
            f"of them the untied model's")
        partial = folders[variant.name] + ".partial"  # complete once renamed
        for folder in (partial, folders[variant.name]):
            shutil.rmtree(folder, ignore_errors=True)
        with single_process():
            dcp.save(state, checkpoint_id=partial)
        os.replace(partial, folders[variant.name])
    return folders


# ---- one training run ---------------------------------------------------------------


def train_command(scale: Scale, variant: Variant, seed: int, run_dir: str, flavor_file: str, init: str, train: str, valid: str) -> list[str]:
    from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH

    tying = tying_of(variant, model_args(scale, variant).n_layers)
    overrides = {
        "job.dump_folder": run_dir,
        "model.flavor": flavor_file,
        "model.hf_assets_path": DEFAULT_TOKENIZER_PATH,
        "training.dataset_path": train,
        "training.steps": scale.steps,
        "training.local_batch_size": scale.batch,
        "training.seq_len": scale.seq_len,
        "training.mixed_precision_param": scale.mixed_precision,
        "optimizer.lr": scale.lr,
        "lr_scheduler.warmup_steps": scale.warmup,
        "validation.dataset_path": valid,
        "validation.freq": scale.val_freq,
        "validation.steps": scale.val_batches,
        "validation.local_batch_size": scale.batch,
        "validation.seq_len": scale.seq_len,
        "metrics.log_freq": scale.log_freq,
        # The last step's model is saved (model only) for tiedmoe-eval; nothing before it.
        "checkpoint.enable": True,
        "checkpoint.interval": scale.steps,
        "checkpoint.initial_load_path": init,  # model only (torchtitan's default)
        "debug.seed": seed,
        **{f"tying.{key}": value for key, value in tying.items()},
        **optimizer_overrides(scale.optimizer),
    }
    argv = [sys.executable, "-m", "tiedmoe_titan.train", BASE_RECIPE]
    for key, value in overrides.items():
        if isinstance(value, bool):  # a flag; False is every base-recipe default it could undo
            argv += [f"--{key}"] if value else []
        else:
            argv += [f"--{key}", str(value)]
    return argv


def optimizer_overrides(keys: dict, prefix: str = "optimizer") -> dict:
    """``[optimizer]`` keys (a nested dict for ``[optimizer.muon]``) as dotted overrides."""
    flat = {}
    for key, value in keys.items():
        flat.update(optimizer_overrides(value, f"{prefix}.{key}") if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return flat


def read_events(tb_root: str) -> dict[str, list[tuple[int, float]]]:
    """Scalar series of a run's TensorBoard events: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(tb_root, "**", "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def run_one(scale: Scale, variant: Variant, seed: int, init: str, out: str, train: str, valid: str, threads: int) -> dict:
    """Train one variant x seed (unless done before) and evaluate its last checkpoint."""
    from tiedmoe_titan.eval import evaluate
    from tiedmoe_titan.saved_checkpoints import single_process
    from tiedmoe_titan.models.flavor_file import write_flavor_file

    name = f"{variant.name}-s{seed}"
    run_dir = os.path.join(out, "runs", name)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            log(f"{name}: done before, reusing {result_path}")
            return json.load(f)
    # Whatever an interrupted attempt left (a checkpoint would be resumed) goes.
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    flavor_file = os.path.join(run_dir, "flavor.json")
    write_flavor_file(model_args(scale, variant), flavor_file)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    log(f"{name}: training {scale.steps} steps ({threads} thread(s)), log {run_dir}/train.log")
    with open(os.path.join(run_dir, "train.log"), "w") as log_file:
        done = subprocess.run(train_command(scale, variant, seed, run_dir, flavor_file, init, train, valid),
                              stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False)
    if done.returncode:
        raise RuntimeError(f"{name}: tiedmoe-train exited with {done.returncode}; see {run_dir}/train.log")
    train_seconds = time.perf_counter() - start
    series = read_events(os.path.join(run_dir, "tb"))
    train_curve = series["loss_metrics/global_avg_loss"]
    tps = [value for step, value in series["throughput(tps)"] if step > 1]  # step 1 is warm-up
    with EVAL_LOCK, single_process():
        held_out = evaluate(os.path.join(run_dir, "checkpoint"), valid, progress=lambda m: log(f"{name}: eval: {m}"))
    result = {
        "variant": variant.name,
        "seed": seed,
        "train_curve": train_curve,
        "val_curve": series.get("validation_metrics/loss", []),
        "final_train_loss": statistics.fmean(v for _, v in train_curve[-FINAL_TRAIN_POINTS:]),
        "tokens_per_s": statistics.median(tps),
        "val_loss": held_out.loss,
        "val_perplexity": held_out.perplexity,
        "val_tokens": held_out.tokens,
        "train_seconds": train_seconds,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    log(f"{name}: held-out loss {held_out.loss:.4f} (ppl {held_out.perplexity:.2f}), "
        f"final train loss {result['final_train_loss']:.4f}, {result['tokens_per_s']:.0f} tokens/s, {train_seconds:.0f} s")
    return result


# ---- per-variant measurements -------------------------------------------------------


def param_counts(scale: Scale, variant: Variant) -> dict:
    """Unique and active parameters, as tiedmoe-plan counts them."""
    from tiedmoe_titan.models import FAMILIES
    from tiedmoe_titan.plan import meta_param_counts
    from tiedmoe_titan.tying import TieConfigError

    args = model_args(scale, variant)
    try:
        counts = meta_param_counts(FAMILIES["olmoe"][0], args)
    except TieConfigError as e:  # e.g. --layers too few for the anchors
        raise SystemExit(f"reproduce_tying: {variant.name} with {args.n_layers} layers: {e}") from None
    return {"unique_params": counts.total, "active_params": counts.active, "expert_params": counts.expert}


def peak_memory(scale: Scale, variants: list[Variant], out: str) -> dict[str, int]:
    """Peak tensor memory (bytes) of one training step of each variant, one launch."""
    path = os.path.join(out, "peak_memory.json")
    peaks = {}
    if os.path.isfile(path):
        with open(path) as f:
            peaks = json.load(f)
    configs = {v.name: check_shape(scale, v) for v in variants if v.name not in peaks}
    if not configs:
        return peaks
    log(f"measuring the peak memory of one step of each variant ({', '.join(configs)})")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "peak.pt")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "tiedmoe_titan.testing.shard_check", "--configs", json.dumps(configs), "--out", result_file]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        if done.returncode:
            raise RuntimeError(f"peak-memory launch failed:\n{done.stderr[-3000:]}")
        measured = torch.load(result_file, weights_only=False)
    peaks.update({name: int(r["peak_memory"]) for name, r in measured.items()})
    with open(path, "w") as f:
        json.dump(peaks, f)
    return peaks


# ---- summary --------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def paired_difference(mine: list[dict], baseline: list[dict]) -> dict | None:
    """Held-out loss minus untied's, seed by seed (both start from that seed's common
    initial weights, see ``initial_weights``): the mean, its standard error (the paired
    differences' standard deviation / sqrt(n)) and in how many seeds the variant is worse."""
    untied = {r["seed"]: r["val_loss"] for r in baseline}
    diffs = [r["val_loss"] - untied[r["seed"]] for r in mine if r["seed"] in untied]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"diff": statistics.fmean(diffs), "standard_error": se, "seeds_worse": sum(d > 0 for d in diffs),
            "n": len(diffs), "per_seed": diffs}


def summarize(variants: list[Variant], runs: list[dict], params: dict, peaks: dict) -> list[dict]:
    rows = []
    baseline = [r for r in runs if r["variant"] == "untied"]
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant.name]
        if not mine:
            continue
        row = {
            "variant": variant.name, "label": variant.label, "positive_control": variant.positive_control,
            **params[variant.name], "peak_memory_bytes": peaks.get(variant.name),
            "seeds": sorted(r["seed"] for r in mine),
            "tokens_per_s": spread([r["tokens_per_s"] for r in mine]),
            "final_train_loss": spread([r["final_train_loss"] for r in mine]),
            "val_loss": spread([r["val_loss"] for r in mine]),
            "val_perplexity": spread([r["val_perplexity"] for r in mine]),
        }
        if variant.name != "untied":
            row["val_loss_vs_untied"] = paired_difference(mine, baseline)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    def pm(s: dict, digits: int) -> str:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    lines = [
        "| variant | unique params | active params | peak MiB / step | tokens/s | final train loss | held-out loss | held-out ppl | Δ held-out loss vs untied, paired by seed (± s.e.) | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = r.get("val_loss_vs_untied")
        delta = f"{diff['diff']:+.4f} ± {diff['standard_error']:.4f} (worse in {diff['seeds_worse']}/{diff['n']})" if diff else "—"
        peak = f"{r['peak_memory_bytes'] / 2**20:.1f}" if r["peak_memory_bytes"] else "—"
        lines.append(
            f"| {r['label']} | {r['unique_params'] / 1e6:.3f}M | {r['active_params'] / 1e6:.3f}M | {peak} "
            f"| {pm(r['tokens_per_s'], 0)} | {pm(r['final_train_loss'], 4)} | {pm(r['val_loss'], 4)} "
            f"| {pm(r['val_perplexity'], 2)} | {delta} | {len(r['seeds'])} |"
        )
    return "\n".join(lines)


def plot(variants: list[Variant], runs: list[dict], rows: list[dict], out: str) -> list[str]:
    """train_loss.png and val_loss.png: per variant the mean over seeds, min-max shaded;
    val_loss_vs_untied.png: each seed's held-out difference from untied, mean ± 2 s.e."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install '.[experiments]'): no plots")
        return []
    written = []
    for key, title, filename in (("train_curve", "train loss", "train_loss.png"), ("val_curve", "validation loss (in-run subset)", "val_loss.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for variant in variants:
            curves = [dict(r[key]) for r in runs if r["variant"] == variant.name and r[key]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = [[c[s] for c in curves] for s in steps]
            mean = [statistics.fmean(v) for v in values]
            line, = ax.plot(steps, mean, label=f"{variant.label} (n={len(curves)})",
                            linestyle="--" if variant.positive_control else "-")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if key == "train_curve":  # the first steps (loss ~ ln vocab) would flatten the rest
            ax.set_ylim(top=min(max(v for r in runs for _, v in r[key][len(r[key]) // 10:]) + 0.2, 10))
        written.append(save(fig, plt, os.path.join(out, filename)))
    paired = [r for r in rows if r.get("val_loss_vs_untied")]
    if paired:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, row in enumerate(paired):
            diff = row["val_loss_vs_untied"]
            ax.scatter([i] * diff["n"], diff["per_seed"], s=12, color="grey", alpha=0.7, zorder=2)
            ax.errorbar(i, diff["diff"], yerr=2 * diff["standard_error"], fmt="o", capsize=5, zorder=3,
                        color="C3" if row["positive_control"] else "C0")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhspan(-0.02, 0.02, color="C2", alpha=0.1, label="±0.02 nats")
        ax.set_xticks(range(len(paired)), [r["variant"] for r in paired])
        ax.set_ylabel("held-out loss − untied's, same seed")
        ax.set_title("paired differences from untied: seeds (grey), mean ± 2 s.e.")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        written.append(save(fig, plt, os.path.join(out, "val_loss_vs_untied.png")))
    return written


def save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


# ---- main ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default: outputs/reproduce_tying, _quick or _scale)")
    p.add_argument("--data-train", help="training data: .txt / .jsonl / .parquet globs or a token-shard folder "
                   "(default: stdlib docstrings)")
    p.add_argument("--data-valid", help="held-out data, same kinds (required with --data-train)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke test: 2 variants, 1 seed, a few steps")
    size.add_argument("--scale", action="store_true", help="the bigger comparison, for a GPU")
    p.add_argument("--paper", action="store_true",
                   help="paper-style: the reference's Muon recipe, 16 MoE layers and its variants (see the docstring)")
    p.add_argument("--optimizer", choices=sorted(RECIPES), help="with --paper: muon (the reference's, default) or adamw (today's)")
    p.add_argument("--layers", type=int, help=f"with --paper: MoE layers (default {PAPER_LAYERS})")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 6; --paper 4; --quick 1)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the scale's; --paper scales the warm-up with it)")
    p.add_argument("--variants", help=f"comma-separated, of: {', '.join(v.name for v in VARIANTS)} "
                   "(default: the mode's comparison; without --paper every variant before the *_lr_* bank-LR ones)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (default with --quick: it is slow)")
    p.add_argument("--jobs", type=int, default=0, help="runs at a time (default: 2 on CPU, each on half the cores; 1 on GPU)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    a = p.parse_args(argv)
    if bool(a.data_train) != bool(a.data_valid):
        p.error("--data-train and --data-valid go together")
    if a.paper and a.scale:
        p.error("--paper and --scale are two comparisons: choose one")
    if not a.paper and (a.optimizer or a.layers):
        p.error("--optimizer and --layers go with --paper")
    if a.layers is not None and a.layers < 1:
        p.error(f"--layers {a.layers}: must be at least 1")
    a.optimizer = a.optimizer or "muon"
    a.layers = a.layers or PAPER_LAYERS
    a.no_memory = a.no_memory or a.quick
    return a


def default_out_folder(a) -> str:
    """outputs/<this>: one folder per mode, and with --paper per recipe, depth and steps."""
    if not a.paper:
        return "reproduce_tying" + ("_quick" if a.quick else "_scale" if a.scale else "")
    return "reproduce_tying_paper" + "".join((
        "_adamw" if a.optimizer == "adamw" else "",
        f"_{a.layers}layers" if a.layers != PAPER_LAYERS else "",
        f"_{a.steps}steps" if a.steps else "",
        "_quick" if a.quick else "",
    ))


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.paper:
        scale = paper_scale(a.optimizer, a.layers, a.steps, a.seeds, a.quick)
    else:
        scale = SCALES["quick" if a.quick else "scale" if a.scale else "default"]
        scale = dataclasses.replace(scale, seeds=a.seeds or scale.seeds, steps=a.steps or scale.steps)
    names = a.variants.split(",") if a.variants else list(scale.variants)
    unknown = [n for n in names if n not in {v.name for v in VARIANTS}]
    if unknown:
        raise SystemExit(f"reproduce_tying: unknown variant {unknown[0]!r}: choose from {', '.join(v.name for v in VARIANTS)}")
    variants = [v for v in VARIANTS if v.name in names]
    out = os.path.abspath(a.out or os.path.join(REPO, "outputs", default_out_folder(a)))
    os.makedirs(out, exist_ok=True)
    train, valid = (a.data_train, a.data_valid) if a.data_train else default_corpus(out)
    claim_out_folder(out, scale, train, valid)
    jobs = a.jobs or (1 if torch.cuda.is_available() else 2)
    threads = a.threads or max(1, (os.cpu_count() or 1) // jobs)
    # Evaluations run in this process, beside the other slot's run: more threads than
    # cores make every parallel op wait for a descheduled thread.
    torch.set_num_threads(threads)
    started = time.perf_counter()
    log(f"{len(variants)} variants x {scale.seeds} seeds, {scale.steps} steps of {scale.batch} x {scale.seq_len} tokens, "
        f"{jobs} run(s) at a time; output {out}")

    params = {v.name: param_counts(scale, v) for v in variants}  # (refuses a variant that cannot be built)
    inits = {seed: initial_weights(scale, variants, seed, out) for seed in range(scale.seeds)}
    # Seed-major order: an interrupted comparison holds whole seeds of every variant.
    tasks = [(v, seed) for seed in range(scale.seeds) for v in variants]
    reused = sum(os.path.isfile(os.path.join(out, "runs", f"{v.name}-s{seed}", "result.json")) for v, seed in tasks)
    runs, peaks = [], {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        # The memory measurement takes a slot like a run (MemTracker makes its step slow).
        memory = None if a.no_memory else pool.submit(peak_memory, scale, variants, out)
        futures = [pool.submit(run_one, scale, v, seed, inits[seed][v.name], out, train, valid, threads) for v, seed in tasks]
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            runs.append(future.result())
            log(f"{done}/{len(tasks)} runs done, {time.perf_counter() - started:.0f} s elapsed")
        if memory is not None:
            peaks = memory.result()

    rows = summarize(variants, runs, params, peaks)
    table = markdown_table(rows)
    plots = plot(variants, runs, rows, out)
    summary = {
        "machine": machine(), "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "scale": dataclasses.asdict(scale), "train_data": train, "valid_data": valid,
        "wall_seconds": time.perf_counter() - started, "reused_runs": reused, "jobs": jobs, "threads_per_run": threads,
        "rows": rows, "runs": runs,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"Machine: {summary['machine']}; {jobs} run(s) at a time, {threads} thread(s) each; "
                f"wall {summary['wall_seconds'] / 60:.1f} min ({reused} of {len(tasks)} runs reused from an earlier invocation; "
                f"each run's own time is in results.json).\n\n{table}\n")
    print(table)
    log(f"wrote {out}/results.json, results.md{''.join(', ' + os.path.basename(p) for p in plots)} "
        f"in {summary['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
