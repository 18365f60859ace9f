"""Qwen3-MoE-style tied family: torchtitan's qwen3 model with expert banks.

Softmax router with top-k renormalisation (``route_norm``), per-head QK-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
from torchtitan.models.qwen3.model.model import Qwen3Model

from .family import TiedMoEArgs, routed_moe_args
from .moe import tie_experts


@dataclass
class TiedQwen3ModelArgs(TiedMoEArgs, Qwen3ModelArgs):
    def moe_layer_ids(self) -> list[int]:
        return list(range(self.n_layers)) if self.moe_enabled else []

    def attention_flops_head_dims(self) -> int:
        return 2 * self.head_dim


class TiedQwen3Model(Qwen3Model):
    """torchtitan's Qwen3Model whose MoE layers read their experts from banks."""

    tensor_parallel_refusal: str | None = None  # why torchtitan's TP plan would be wrong, if it would

    def __init__(self, model_args: TiedQwen3ModelArgs):
        super().__init__(model_args)
        if model_args.moe_enabled:
            tie_experts(
                self.layers, model_args.tie_layout(), model_args.layer_moe_args(), model_args.dim, model_args.moe_inter_dim
            )


def _qwen3_moe(num_experts: int, top_k: int) -> MoEArgs:
    return routed_moe_args(num_experts, top_k, route_norm=True)


qwen3_flavors = {
    # Tiny, for tests and the CPU debug recipe (vocab of the bundled tokenizer).
    "debug": TiedQwen3ModelArgs(
        vocab_size=2048, max_seq_len=512, head_dim=32, dim=128, n_layers=8, n_heads=4, n_kv_heads=2,
        qk_norm=True, hidden_dim=256, rope_theta=1_000_000, moe_enabled=True, moe_inter_dim=64,
        moe_args=_qwen3_moe(num_experts=8, top_k=2),
    ),
    # The paper's "regular" Qwen3-style config (head_dim = dim / heads).
    "regular": TiedQwen3ModelArgs(
        vocab_size=100277, max_seq_len=4096, head_dim=64, dim=1536, n_layers=28, n_heads=24, n_kv_heads=4,
        qk_norm=True, hidden_dim=4096, rope_theta=1_000_000, moe_enabled=True, moe_inter_dim=768,
        moe_args=_qwen3_moe(num_experts=60, top_k=4),
    ),
    # Qwen3-30B-A3B (30.5B total, 3.3B active at G=1).
    "30B-A3B": TiedQwen3ModelArgs(
        vocab_size=151936, max_seq_len=4096, head_dim=128, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4,
        qk_norm=True, hidden_dim=6144, rope_theta=1_000_000, moe_enabled=True, moe_inter_dim=768,
        moe_args=_qwen3_moe(num_experts=128, top_k=8),
    ),
}
