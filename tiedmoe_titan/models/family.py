"""What every tied family (qwen3, olmoe, ...) adds to its torchtitan model args."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn
from torchtitan.models.moe import MoEArgs

from ..tying import TieConfig, TieLayout
from .accounting import count_params, flops_per_token


def routed_moe_args(
    num_experts: int, top_k: int, *, route_norm: bool, score_func: str = "softmax", num_shared_experts: int = 0, **groups
) -> MoEArgs:
    """torchtitan's MoEArgs as every family here sets them: routing weights scaled by 1
    and applied after the experts, and no expert bias of torchtitan's own (each layer
    gets it from ``[routing] expert_bias_rate``, ``TiedMoEArgs.layer_moe_args``).
    ``groups``: DeepSeek's ``num_expert_groups`` / ``num_limited_groups``."""
    return MoEArgs(
        num_experts=num_experts,
        num_shared_experts=num_shared_experts,
        top_k=top_k,
        score_func=score_func,
        route_norm=route_norm,
        route_scale=1.0,
        score_before_experts=False,
        load_balance_coeff=None,
        **groups,
    )


@dataclass
class RoutingConfig:
    """The ``[routing]`` section of a recipe: the router's training objective."""

    aux_loss_coeff: float = 0.01
    """Load-balancing loss weight (OLMoE: 0.01), applied to the mean over MoE layers."""

    z_loss_coeff: float = 1e-4
    """Router z-loss weight (the paper: 1e-4), applied to the mean over MoE layers."""

    expert_bias_rate: float = 0.0
    """Aux-loss-free load balancing: per-step update of each layer's expert bias
    (torchtitan's ``load_balance_coeff``; DeepSeek-V3 uses 1e-3). 0 turns it off."""


@dataclass
class TiedMoEArgs:
    """Mixin for a family's model args (put it first among the bases)."""

    tying: TieConfig = field(default_factory=TieConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def moe_layer_ids(self) -> list[int]:
        raise NotImplementedError

    def attention_flops_head_dims(self) -> int:
        raise NotImplementedError

    def tie_layout(self) -> TieLayout:
        moe = self.moe_args
        return TieLayout.build(self.tying, self.moe_layer_ids(), moe.num_experts, moe.top_k, moe.num_expert_groups)

    def layer_moe_args(self):
        """The MoEArgs every MoE layer is built with (expert bias from [routing])."""
        return dataclasses.replace(self.moe_args, load_balance_coeff=self.routing.expert_bias_rate or None)

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        # Recipes carry [tying] and [routing] when run with tiedmoe_titan.config;
        # a plain torchtitan job config keeps the flavor's settings.
        if hasattr(job_config, "tying"):
            self.tying = dataclasses.replace(job_config.tying)
        if hasattr(job_config, "routing"):
            self.routing = dataclasses.replace(job_config.routing)
        self.tie_layout()  # validate now, before anything is built

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        counts = count_params(model)
        flops = flops_per_token(counts, self.n_layers, self.n_heads, self.attention_flops_head_dims(), seq_len)
        return counts.total, flops
