"""Project state dicts <-> Hugging Face (OLMoE / Qwen3-MoE) state dicts.

Names follow torchtitan's Qwen3 adapter (``Qwen3StateDictAdapter.from_hf_map``); the
olmoe family keeps its full-width QK-norm as ``attention.q_proj_norm`` /
``k_proj_norm``. Experts: the bank's ``w1 / w3 / w2`` of shape ``(experts, out, in)``
are the stacked ``gate_proj / up_proj / down_proj`` weights of the Hugging Face
checkpoint layout (``model.layers.L.mlp.experts.E.gate_proj.weight``), which is what
``save_pretrained`` writes in transformers 4.x and 5.x alike (5.x fuses the experts in
memory only); no transposes, and no rotary permutation (torchtitan's qwen3 rotary
embedding is Hugging Face's rotate-half one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

from ..tying import TieLayout
from .errors import HFInteropError

# family -> (Hugging Face model_type, architecture)
HF_ARCHITECTURES = {
    "olmoe": ("olmoe", "OlmoeForCausalLM"),
    "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}

# (bank parameter, Hugging Face projection)
EXPERT_PROJECTIONS = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))

_OLMOE_QK_NORMS = {
    "layers.{}.attention.q_norm.weight": "layers.{}.attention.q_proj_norm.weight",
    "layers.{}.attention.k_norm.weight": "layers.{}.attention.k_proj_norm.weight",
}


def _name_pairs(family: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(model-wide, per-layer) pairs (project name, Hugging Face name) of the non-expert
    weights; per-layer names hold ``{}`` for the layer id."""
    hf_to_project = Qwen3StateDictAdapter(model_args=None, hf_assets_path=None).from_hf_map
    model_wide, per_layer = [], []
    for hf, project in hf_to_project.items():
        if project is None or ".experts." in project or ".feed_forward." in project:
            continue  # rotary buffers; experts are banks; the families have no dense layers
        if family == "olmoe":
            project = _OLMOE_QK_NORMS.get(project, project)
        (per_layer if "{}" in hf else model_wide).append((project, hf))
    return model_wide, per_layer


def hf_expert_key(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def bank_key(owner: int, weight: str) -> str:
    return f"layers.{owner}.moe.experts.{weight}"


def expert_bias_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k in state if re.fullmatch(r"layers\.\d+\.moe\.expert_bias", k)]


def to_hf(
    state: Mapping[str, torch.Tensor], family: str, layout: TieLayout, n_layers: int, tied_output: bool, banks_once: bool
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a project state dict (tensors are views, not copies).

    ``banks_once``: each bank's experts appear once, under its owner layer (hf-tied);
    otherwise every layer carries its bank's experts (hf-untied). ``tied_output``: the
    output projection is the embedding (``tie_word_embeddings``), so it is left out.
    Expert biases are the caller's to check: Hugging Face's routers have none.
    """
    model_wide, per_layer = _name_pairs(family)
    consumed = set(expert_bias_keys(state))
    hf: dict[str, torch.Tensor] = {}

    def take(project: str, hf_name: str) -> None:
        hf[hf_name] = state[project]
        consumed.add(project)

    for project, hf_name in model_wide:
        if project == "output.weight" and tied_output:
            consumed.add(project)
            continue
        take(project, hf_name)
    for layer in range(n_layers):
        for project, hf_name in per_layer:
            take(project.format(layer), hf_name.format(layer))
    for bank in layout.banks:
        for weight, projection in EXPERT_PROJECTIONS:
            stacked = state[bank_key(bank.owner, weight)]
            consumed.add(bank_key(bank.owner, weight))
            for layer in bank.layers[:1] if banks_once else bank.layers:
                for expert in range(bank.num_experts):
                    hf[hf_expert_key(layer, expert, projection)] = stacked[expert]
    left = sorted(set(state) - consumed)
    if left:
        raise HFInteropError(f"{left[0]} has no counterpart in Hugging Face's {HF_ARCHITECTURES[family][1]}: this model cannot be exported")
    return hf


def from_hf(
    hf: Mapping[str, torch.Tensor], family: str, layout: TieLayout, n_layers: int, tied_output: bool
) -> dict[str, torch.Tensor]:
    """The project state dict of a Hugging Face state dict: each bank is its owner
    layer's experts (the experts of the other layers of a group are not read).
    ``hf`` may be lazy; a missing name raises ``HFInteropError``."""
    model_wide, per_layer = _name_pairs(family)

    def get(name: str) -> torch.Tensor:
        try:
            return hf[name]
        except KeyError:
            raise HFInteropError(f"the checkpoint has no {name}: it does not match its config.json") from None

    state = {}
    for project, hf_name in model_wide:
        if project == "output.weight" and tied_output:
            state[project] = state["tok_embeddings.weight"]
        else:
            state[project] = get(hf_name)
    for layer in range(n_layers):
        for project, hf_name in per_layer:
            state[project.format(layer)] = get(hf_name.format(layer))
    for bank in layout.banks:
        for weight, projection in EXPERT_PROJECTIONS:
            experts = [get(hf_expert_key(bank.owner, e, projection)) for e in range(bank.num_experts)]
            state[bank_key(bank.owner, weight)] = torch.stack(experts)
    return state
