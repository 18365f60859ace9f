"""OLMoE-style tied family.

Differs from the qwen3 family in two ways: the router keeps raw softmax scores of the
top-k experts (no renormalisation), and QK-norm is an RMSNorm over the full q / k
projection width rather than per head, as in OLMoE.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3.model.model import Attention

from .family import routed_moe_args
from .qwen3 import TiedQwen3Model, TiedQwen3ModelArgs


class OlmoeAttention(Attention):
    """torchtitan's qwen3 attention with OLMoE's full-width QK-norm.

    The norms are applied to the outputs of ``wq`` / ``wk`` by forward hooks, before
    the heads are split, so torchtitan's attention forward (sdpa / flex / varlen,
    rotary embedding) is reused unchanged. Its per-head norms stay off.
    """

    def __init__(self, model_args: TiedQwen3ModelArgs):
        super().__init__(dataclasses.replace(model_args, qk_norm=False))
        self.q_proj_norm = nn.RMSNorm(model_args.n_heads * self.head_dim, eps=model_args.norm_eps)
        self.k_proj_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=model_args.norm_eps)
        self.wq.register_forward_hook(self._normalize_q)
        self.wk.register_forward_hook(self._normalize_k)

    def _normalize_q(self, wq: nn.Module, args, xq: torch.Tensor) -> torch.Tensor:
        return self.q_proj_norm(xq)

    def _normalize_k(self, wk: nn.Module, args, xk: torch.Tensor) -> torch.Tensor:
        return self.k_proj_norm(xk)

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        self.q_proj_norm.reset_parameters()
        self.k_proj_norm.reset_parameters()


class TiedOlmoeModel(TiedQwen3Model):
    tensor_parallel_refusal = "OLMoE's full-width QK-norm would normalise each tensor-parallel shard on its own"

    def __init__(self, model_args: TiedQwen3ModelArgs):
        super().__init__(model_args)
        for block in self.layers.values():
            block.attention = OlmoeAttention(model_args)


def _olmoe_moe(num_experts: int, top_k: int) -> MoEArgs:
    return routed_moe_args(num_experts, top_k, route_norm=False)


def _olmoe(**kwargs) -> TiedQwen3ModelArgs:
    defaults = dict(qk_norm=True, norm_eps=1e-5, rope_theta=10_000, hidden_dim=4096, moe_enabled=True)
    return TiedQwen3ModelArgs(**{**defaults, **kwargs})


olmoe_flavors = {
    "debug": _olmoe(
        vocab_size=2048, max_seq_len=512, head_dim=32, dim=128, n_layers=8, n_heads=4, n_kv_heads=4,
        hidden_dim=256, moe_inter_dim=64, moe_args=_olmoe_moe(num_experts=8, top_k=2),
    ),
    # The paper's "regular" OLMoE-style config.
    "regular": _olmoe(
        vocab_size=100277, max_seq_len=4096, head_dim=128, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16,
        moe_inter_dim=1024, moe_args=_olmoe_moe(num_experts=64, top_k=8),
    ),
    # OLMoE-1B-7B (6.92B total, 1.28B active at G=1).
    "1B-7B": _olmoe(
        vocab_size=50304, max_seq_len=4096, head_dim=128, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16,
        moe_inter_dim=1024, moe_args=_olmoe_moe(num_experts=64, top_k=8),
    ),
}
