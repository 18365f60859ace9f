"""DeepSeek-style tied family: torchtitan's deepseek_v3 model with expert banks.

Multi-head latent attention (MLA), the first ``n_dense_layers`` blocks dense, then MoE
blocks with shared experts and a sigmoid router (top-k scores renormalised) that
may limit each token to ``num_limited_groups`` of ``num_expert_groups`` expert groups,
balanced by each layer's aux-loss-free expert bias. Only the routed experts are tied:
shared experts and dense FFNs stay per layer (see docs/deepseek.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchtitan.models.deepseek_v3 import deepseekv3_args
from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
from torchtitan.models.moe import MoEArgs

from .family import RoutingConfig, TiedMoEArgs, routed_moe_args
from .moe import tie_experts


@dataclass
class TiedDeepSeekModelArgs(TiedMoEArgs, DeepSeekV3ModelArgs):
    moe_impl: str = "standard"
    """torchtitan's blocks read this; torchtitan sets it only in ``update_from_config``.
    Banks always use torchtitan's standard all-to-all (DeepEP is refused at parallelize)."""

    def moe_layer_ids(self) -> list[int]:
        return list(range(self.n_dense_layers, self.n_layers))

    def attention_flops_head_dims(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim


class TiedDeepSeekModel(DeepSeekV3Model):
    """torchtitan's DeepSeekV3Model whose MoE blocks read their routed experts from banks."""

    tensor_parallel_refusal: str | None = None  # G=1 keeps torchtitan's TP plan; tied layouts refuse TP

    def __init__(self, model_args: TiedDeepSeekModelArgs):
        super().__init__(model_args)
        tie_experts(
            self.layers, model_args.tie_layout(), model_args.layer_moe_args(), model_args.dim, model_args.moe_inter_dim
        )

    def get_attention_masks(self, input_batch: torch.Tensor, tokenizer, extra_inputs=None):
        # torchtitan 0.2.2's validator asks every model for masks and skips them on
        # TypeError (qwen3 raises it under sdpa); deepseek_v3 builds a flex BlockMask
        # whatever its attn_type, which its sdpa attention then refuses.
        if self.model_args.attn_type != "flex":
            raise TypeError(f"attn_type {self.model_args.attn_type!r} takes no attention masks")
        return super().get_attention_masks(input_batch, tokenizer, extra_inputs)


# DeepSeek-V3's routing: sigmoid affinities, top-k renormalised, aux-loss-free bias.
DEEPSEEK_ROUTING = RoutingConfig(aux_loss_coeff=1e-4, z_loss_coeff=1e-4, expert_bias_rate=1e-3)


def _deepseek_moe(num_experts: int, num_shared_experts: int, top_k: int, **groups) -> MoEArgs:
    return routed_moe_args(
        num_experts, top_k, route_norm=True, score_func="sigmoid", num_shared_experts=num_shared_experts, **groups
    )


def _deepseek(**kwargs) -> TiedDeepSeekModelArgs:
    return TiedDeepSeekModelArgs(
        routing=dataclasses.replace(DEEPSEEK_ROUTING), attn_type="sdpa", attn_mask_type="causal", **kwargs
    )


def _v2_lite_shape() -> dict:
    """torchtitan's "16B" flavor (DeepSeek-V2-Lite's shape), without its attention and routing choices."""
    shape = dataclasses.asdict(deepseekv3_args["16B"])
    for key in ("moe_args", "attn_type", "attn_mask_type", "max_seq_len"):
        del shape[key]
    return shape


deepseek_flavors = {
    # Tiny, for tests and the CPU debug recipe (vocab of the bundled tokenizer). Two
    # expert groups, one allowed per token, exercise group-limited routing.
    "debug": _deepseek(
        vocab_size=2048, max_seq_len=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=6, n_dense_layers=1,
        n_heads=4, q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_args=_deepseek_moe(8, 1, 2, num_expert_groups=2, num_limited_groups=1),
    ),
    # The paper's "regular" DeepSeek-style config: d2048, 16 layers (the first dense),
    # 64 routed experts top-6 of width 1024 and, as in V2-Lite, 2 shared experts; the
    # dense layer's FFN is as wide as the experts a token runs ((2 + 6) x 1024).
    "regular": _deepseek(
        vocab_size=100277, max_seq_len=4096, dim=2048, inter_dim=8192, moe_inter_dim=1024, n_layers=16,
        n_dense_layers=1, n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, moe_args=_deepseek_moe(64, 2, 6),
    ),
    # DeepSeek-V2-Lite's shape (15.7B total, 2.4B active at G=1): 27 layers, the first
    # dense, 64 routed + 2 shared experts of width 1408, top-6.
    "16B": _deepseek(**_v2_lite_shape(), max_seq_len=4096, moe_args=_deepseek_moe(64, 2, 6)),
}
