"""Expert banks: routed-expert weights that several MoE layers may share.

``ExpertBank`` is torchtitan's ``GroupedExperts`` (same parameters ``w1, w2, w3`` of
shape ``(experts, ...)``, same grouped-mm / for-loop compute, same expert-parallel
hooks) that knows which tie group uses it. Keeping the class and parameter names of
``GroupedExperts`` means a G=1 model has exactly torchtitan's state_dict, and
torchtitan's own helpers (expert parallelism, ``moe.experts`` FLOP classification,
checkpoint adapters) keep working on banks.
"""

from __future__ import annotations

from torch import nn
from torchtitan.models.moe.moe import GroupedExperts

from ..tying import BankSpec


class ExpertBank(GroupedExperts):
    """Routed-expert weights shared by the MoE layers of one tie group."""

    def __init__(self, spec: BankSpec, dim: int, hidden_dim: int, use_grouped_mm: bool):
        super().__init__(dim=dim, hidden_dim=hidden_dim, num_experts=spec.num_experts, use_grouped_mm=use_grouped_mm)
        self.bank_index = spec.index
        self.tie_group = spec.layers
        self.owner = spec.owner  # the layer that registers (and so saves and shards) the bank
        self.hidden_dim = hidden_dim

    def extra_repr(self) -> str:
        return f"bank={self.bank_index}, layers={list(self.tie_group)}, experts={self.num_experts}"


def banks_of(model: nn.Module) -> list[ExpertBank]:
    """Each bank of ``model`` once (``modules()`` visits a shared bank once)."""
    return [m for m in model.modules() if isinstance(m, ExpertBank)]
