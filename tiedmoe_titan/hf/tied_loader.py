"""Load an hf-tied export as a transformers model whose tied layers share memory.

An hf-tied folder is a Hugging Face OLMoE / Qwen3-MoE folder whose config.json also
holds the tie map (``tied_experts``) and whose safetensors hold each bank once, under
the first layer of its group. ``load_tied_pretrained`` builds the model from the
config, gives each layer of a group the same experts module (so the bank is in memory
once; a width-expanded bank's layers get a router and experts of the bank's size) and
loads the weights. Each layer keeps its own router, attention and norms.
"""

from __future__ import annotations

import copy

import torch

from .errors import HFInteropError
from .files import SafetensorsFolder
from .hf_config import TIED_EXPERTS_KEY, read_hf_config, require_transformers
from .state_dict import EXPERT_PROJECTIONS, hf_expert_key


def load_tied_pretrained(path: str, dtype: torch.dtype | None = None):
    """The transformers ``*ForCausalLM`` of the hf-tied export in ``path``, in eval mode."""
    transformers = require_transformers()
    from transformers.initialization import no_init_weights

    config = read_hf_config(path)
    tie_map = getattr(config, TIED_EXPERTS_KEY, None)
    if tie_map is None:
        raise HFInteropError(f"{path}/config.json has no {TIED_EXPERTS_KEY}: it is not an hf-tied export; load it with AutoModelForCausalLM.from_pretrained")
    if dtype is not None:
        config.dtype = dtype
    # Every weight is loaded below: skip the random init.
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=config.dtype)
        layers = model.model.layers
        for bank in tie_map["banks"]:
            if bank["num_experts"] != config.num_experts:
                bank_config = copy.deepcopy(config)
                bank_config.num_experts = bank["num_experts"]
                for layer in bank["layers"]:
                    layers[layer].mlp = type(layers[layer].mlp)(bank_config).to(config.dtype)
    model.tie_weights()  # tie_word_embeddings: part of the init skipped above
    weights = SafetensorsFolder(path)
    state = {k: weights[k] for k in weights if ".mlp.experts." not in k}
    for bank in tie_map["banks"]:
        owner, size = bank["layers"][0], bank["num_experts"]
        experts = layers[owner].mlp.experts
        state.update(_fused_experts(weights, owner, size, experts, path))
        for layer in bank["layers"][1:]:
            layers[layer].mlp.experts = experts
    # A name may be missing only if its parameter is one that is loaded under another
    # name: an aliased bank, or an output projection tied to the embedding.
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in state if name in params}
    left = [name for name in missing if id(params.get(name)) not in loaded]
    if left or unexpected:
        raise HFInteropError(f"{path}: {'no ' + left[0] if left else 'unexpected ' + unexpected[0]}: the weights do not match config.json")
    return model.eval()


def _fused_experts(weights: SafetensorsFolder, owner: int, size: int, experts: torch.nn.Module, path: str) -> dict:
    """The bank's per-expert weights in the layout of transformers >= 5, which keeps a
    layer's experts as ``gate_up_proj (experts, 2 x inter, dim)`` and ``down_proj``."""
    if not hasattr(experts, "gate_up_proj"):
        raise HFInteropError(f"{type(experts).__name__} has no fused gate_up_proj: this transformers version keeps experts differently (tested: 5.23.0)")
    try:
        stacked = {
            projection: torch.stack([weights[hf_expert_key(owner, e, projection)] for e in range(size)])
            for _, projection in EXPERT_PROJECTIONS
        }
    except KeyError as e:
        raise HFInteropError(f"{path} has no {e.args[0]}: the bank of layers.{owner} holds {size} experts in config.json") from None
    prefix = f"model.layers.{owner}.mlp.experts."
    return {
        prefix + "gate_up_proj": torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1),
        prefix + "down_proj": stacked["down_proj"],
    }
