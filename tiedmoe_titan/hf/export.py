"""``tiedmoe-export CHECKPOINT OUTDIR --format {hf-untied,hf-tied}``: a project checkpoint
as a Hugging Face OLMoE / Qwen3-MoE folder.

* hf-untied: a standard ``OlmoeForCausalLM`` / ``Qwen3MoeForCausalLM`` folder; every
  layer of a tie group carries a copy of the group's bank, so vanilla transformers loads
  and runs it. Width-expanded banks (more experts than a layer of the config) are refused:
  a standard config has one expert count.
* hf-tied: the same folder with each bank stored once (under its owner layer) and the
  tie map in config.json; ``tiedmoe_titan.hf.load_tied_pretrained`` loads it with the
  banks shared in memory.

CHECKPOINT is a step folder written by tiedmoe-train, its checkpoint folder (the latest
complete step) or the run's dump folder; the model comes from the ``recipe.resolved.toml``
of that run. tiedmoe-import's OUTDIR (or its ``model/``) exports as it stands, with the
``recipe.toml`` the import wrote.
"""

from __future__ import annotations

import sys

from ..config import ArgumentParser, RecipeError
from ..saved_checkpoints import SavedCheckpointError, find_recipe, find_step, read_model_state
from .checkpoints import model_of_recipe
from .errors import HFInteropError
from .files import make_output_folder, write_safetensors
from .hf_config import hf_config
from .state_dict import HF_ARCHITECTURES, expert_bias_keys, to_hf

FORMATS = ("hf-untied", "hf-tied")
PROG = "tiedmoe-export"


def progress(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def export(checkpoint: str, outdir: str, fmt: str, recipe: str | None = None, drop_expert_bias: bool = False) -> None:
    step = find_step(checkpoint)
    recipe = recipe or find_recipe(step)
    model = model_of_recipe(recipe)
    args, layout = model.args, model.layout
    progress(f"{model.family} model of {recipe}: {args.n_layers} layers, {layout.num_banks} banks ({layout.num_shared_banks} shared)")
    banks_once = fmt == "hf-tied"
    config = hf_config(model.family, args, layout, banks_once)  # before reading: refusals come first
    state = read_model_state(step, model, recipe)
    progress(f"read {len(state)} tensors from {step}")
    config.dtype = state["tok_embeddings.weight"].dtype
    biased = [key for key in expert_bias_keys(state) if state[key].any()]
    if biased and not drop_expert_bias:
        raise HFInteropError(
            f"{biased[0]} is non-zero (aux-loss-free balancing): Hugging Face's routers have no expert bias, so the exported "
            "model would route differently; pass --drop-expert-bias to export without it"
        )
    hf_state = to_hf(state, model.family, layout, args.n_layers, args.enable_weight_tying, banks_once)
    make_output_folder(outdir)
    config.save_pretrained(outdir)
    files = write_safetensors(hf_state, outdir)
    dropped = f"; dropped the expert bias of {len(biased)} layers" if biased else ""
    progress(
        f"wrote {outdir} ({fmt}, {HF_ARCHITECTURES[model.family][1]}): config.json and {len(files)} safetensors "
        f"file(s), {len(hf_state)} tensors{dropped}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step-N folder, a run's checkpoint or dump folder (latest step), or tiedmoe-import's OUTDIR")
    parser.add_argument("outdir", help="new folder for the Hugging Face model")
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf-untied: standard transformers folder; hf-tied: banks once + tie map")
    parser.add_argument("--recipe", help="the run's recipe (default: recipe.resolved.toml above CHECKPOINT, or an import's recipe.toml)")
    parser.add_argument("--drop-expert-bias", action="store_true", help="export although the routers' expert biases are non-zero")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export(options.checkpoint, options.outdir, options.format, options.recipe, options.drop_expert_bias)
    except (HFInteropError, RecipeError, SavedCheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
