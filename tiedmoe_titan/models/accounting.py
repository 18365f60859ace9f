"""Parameter and FLOP counts of a built (possibly meta-device) tied model.

A bank is stored once but computed by every layer of its group, so two numbers
differ from a naive count: unique parameters count each bank once, while active
parameters and FLOPs count it once per layer that uses it, at top-k activity.
The classification follows torchtitan's ``get_moe_model_nparams_and_flops`` so that
a G=1 model reports torchtitan's FLOPs exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .bank import banks_of
from .moe import TiedMoE


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Unique parameters (each bank once, tied embeddings once)."""
    expert: int
    """Routed-expert parameters, over all banks (each bank once)."""
    embedding: int
    """Token-embedding parameters (excluded from FLOPs, as torchtitan does)."""
    active: int
    """Parameters a token touches: everything but routed experts, plus top_k/experts of
    each layer's bank, summed over the layers (a bank counts once per layer using it)."""

    @property
    def other(self) -> int:
        return self.total - self.expert

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "other": self.other}


def count_params(model: nn.Module) -> ParamCounts:
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embedding" in name)
    banks = banks_of(model)
    expert = sum(p.numel() for bank in banks for p in bank.parameters())
    active_expert = 0
    for layer in (m for m in model.modules() if isinstance(m, TiedMoE)):
        bank = layer.experts
        bank_numel = sum(p.numel() for p in bank.parameters())
        active_expert += bank_numel * layer.router.top_k // bank.num_experts
    return ParamCounts(total=total, expert=expert, embedding=embedding, active=total - expert + active_expert)


def flops_per_token(counts: ParamCounts, n_layers: int, n_heads: int, attn_head_dims: int, seq_len: int) -> int:
    """6 x (active non-embedding parameters) + attention scores, as torchtitan counts
    (``attn_head_dims`` is the sum of the q/k and v head dims)."""
    return 6 * (counts.active - counts.embedding) + 6 * n_layers * n_heads * attn_head_dims * seq_len
