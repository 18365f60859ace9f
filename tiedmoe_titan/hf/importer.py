"""``tiedmoe-import HF_DIR OUTDIR [--tie-group-size G --untied-first A --untied-last B --merge first]``:
a Hugging Face OLMoE / Qwen3-MoE checkpoint as a project checkpoint to continue pretraining.

G = 1 converts exactly. G > 1 ties the experts of consecutive MoE layers: each group's
bank is the experts of its first layer (``--merge first``, as the paper's code aliases
them); the experts of the group's other layers are dropped (and listed), while every
layer keeps its own router, attention and norms.

OUTDIR gets a model-only DCP checkpoint, a flavor file and ``recipe.toml``, which
``tiedmoe-train`` runs (``--extends RECIPE`` makes it inherit data, tokenizer and
optimizer settings from one of yours).  If HF_DIR holds the model's tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``), it is copied to ``OUTDIR/tokenizer``,
the recipe points ``model.hf_assets_path`` at it, and its identity is recorded with the
checkpoint: continued pretraining with another tokenizer is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import torch

from ..checkpoint import record_tokenizer
from ..config import ArgumentParser, RecipeError
from ..tokenizer import HF_FILES, is_hf_folder, load_tokenizer
from ..models import FAMILIES
from ..tying import TieConfig, TieConfigError
from ..saved_checkpoints import IMPORT_MODEL, IMPORT_RECIPE, IMPORT_TOKENIZER, ProjectModel
from .checkpoints import write_import
from .errors import HFInteropError
from .files import SafetensorsFolder, make_output_folder
from .hf_config import TIED_EXPERTS_KEY, model_args_of_hf, read_hf_config
from .state_dict import EXPERT_PROJECTIONS, from_hf, to_hf

PROG = "tiedmoe-import"
MERGES = ("first",)
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer some older checkpoints saved
PARAM_DTYPE = torch.float32  # what the trainer's parameters are


def progress(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def check_weights(weights: SafetensorsFolder, model: ProjectModel, hf_dir: str) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is."""
    untied = dataclasses.replace(model, args=dataclasses.replace(model.args, tying=TieConfig()))
    expected = to_hf(untied.meta_state_dict(), model.family, untied.layout, model.args.n_layers, model.args.enable_weight_tying, banks_once=False)
    for name, tensor in expected.items():
        if name not in weights:
            raise HFInteropError(f"{hf_dir} has no {name}: the weights do not match config.json")
        if weights.shape(name) != tuple(tensor.shape):
            raise HFInteropError(
                f"{name} has shape {list(weights.shape(name))} in {hf_dir}, config.json implies {list(tensor.shape)}: "
                "the weights do not match the config"
            )
    extra = sorted(n for n in weights if n not in expected and not n.endswith(IGNORED_SUFFIX))
    if extra:
        raise HFInteropError(f"{hf_dir} holds {extra[0]}, which config.json does not describe: it is not a supported layout")


def import_hf(hf_dir: str, outdir: str, tying: TieConfig, extends: str | None = None) -> str:
    """Convert ``hf_dir`` into ``outdir``; returns the written recipe."""
    config = read_hf_config(hf_dir)
    if hasattr(config, TIED_EXPERTS_KEY):
        raise HFInteropError(f"{hf_dir} is an hf-tied export: import its hf-untied export, or load it with load_tied_pretrained")
    family, args = model_args_of_hf(config, hf_dir)
    args.tying = tying
    model = ProjectModel(family, args, FAMILIES[family][0])
    try:
        layout = model.layout
    except TieConfigError as e:
        raise HFInteropError(f"{hf_dir} has {args.n_layers} MoE layers: {e}") from None
    progress(f"{config.architectures[0] if config.architectures else family} of {hf_dir}: {args.n_layers} layers, {args.moe_args.num_experts} experts, top-{args.moe_args.top_k}")
    weights = SafetensorsFolder(hf_dir)
    check_weights(weights, model, hf_dir)
    state = {k: v.to(PARAM_DTYPE) for k, v in from_hf(weights, family, layout, args.n_layers, args.enable_weight_tying).items()}
    per_layer = sum(state[f"layers.{layout.banks[0].owner}.moe.experts.{w}"].numel() for w, _ in EXPERT_PROJECTIONS)
    for bank in layout.banks:
        if bank.group_size > 1:
            others = ", ".join(f"layers.{layer}" for layer in bank.layers[1:])
            progress(
                f"bank {bank.index} (layers {list(bank.layers)}) = experts of layers.{bank.owner}; dropped the experts of "
                f"{others} ({(bank.group_size - 1) * per_layer:,} parameters)"
            )
    tokenizer = model_tokenizer(hf_dir, args.vocab_size)
    make_output_folder(outdir)
    tokenizer_dir = None
    if tokenizer is not None:
        tokenizer_dir = os.path.join(os.path.abspath(outdir), IMPORT_TOKENIZER)
        os.makedirs(tokenizer_dir)
        for name in (*HF_FILES, "special_tokens_map.json"):
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy2(os.path.join(hf_dir, name), tokenizer_dir)
    recipe = write_import(outdir, family, args, tying, state, hf_dir, extends, tokenizer_dir)
    if tokenizer_dir is not None:
        record_tokenizer(os.path.join(outdir, IMPORT_MODEL), load_tokenizer(tokenizer_dir))
        progress(f"tokenizer of {hf_dir} copied to {tokenizer_dir} ({tokenizer.get_vocab_size():,} ids); the recipe uses it")
    progress(f"wrote {outdir}: {layout.num_banks} banks, {sum(t.numel() for t in state.values()):,} parameters; train with: tiedmoe-train {recipe}")
    return recipe


def model_tokenizer(hf_dir: str, vocab_size: int):
    """The model folder's own tokenizer, checked (None: the folder has none)."""
    if not is_hf_folder(hf_dir):
        progress(f"{hf_dir} has no tokenizer.json: set model.hf_assets_path to the model's tokenizer to train on")
        return None
    try:
        tokenizer = load_tokenizer(hf_dir, f"the tokenizer of {hf_dir}")
    except ValueError as e:
        raise HFInteropError(str(e)) from None
    if tokenizer.get_vocab_size() > vocab_size:
        raise HFInteropError(
            f"the tokenizer of {hf_dir} has {tokenizer.get_vocab_size():,} ids, more than the model's vocab_size "
            f"{vocab_size:,} in config.json: the folder mixes two models"
        )
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="folder of a Hugging Face OLMoE or Qwen3-MoE model (config.json + safetensors)")
    parser.add_argument("outdir", help=f"new folder for the project checkpoint, flavor and {IMPORT_RECIPE}")
    parser.add_argument("--tie-group-size", type=int, default=1, help="G: consecutive MoE layers sharing one bank (1: exact conversion)")
    parser.add_argument("--untied-first", type=int, default=0, help="leading MoE layers that keep their own experts")
    parser.add_argument("--untied-last", type=int, default=0, help="trailing MoE layers that keep their own experts")
    parser.add_argument("--merge", choices=MERGES, default="first", help="how a group's bank is made: first = the first layer's experts")
    parser.add_argument("--extends", metavar="RECIPE", help="recipe the written recipe extends (data, tokenizer, optimizer, ...)")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tying = TieConfig(group_size=options.tie_group_size, untied_first=options.untied_first, untied_last=options.untied_last)
    try:
        import_hf(options.hf_dir, options.outdir, tying, options.extends)
    except (HFInteropError, RecipeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
