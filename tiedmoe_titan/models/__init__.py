"""Tied-expert model families built on torchtitan's model code.

Importing it makes torchtitan's models run on CPU as well (``compat.enable``)."""

from .. import compat

compat.enable()

from .bank import ExpertBank, banks_of
from .deepseek import TiedDeepSeekModel, TiedDeepSeekModelArgs, deepseek_flavors
from .family import RoutingConfig, TiedMoEArgs
from .moe import TiedMoE, loss_with_routing, model_routing_loss, routing_losses, tie_experts
from .olmoe import OlmoeAttention, TiedOlmoeModel, olmoe_flavors
from .qwen3 import TiedQwen3Model, TiedQwen3ModelArgs, qwen3_flavors

# family name -> (model class, flavors)
FAMILIES = {
    "qwen3": (TiedQwen3Model, qwen3_flavors),
    "olmoe": (TiedOlmoeModel, olmoe_flavors),
    "deepseek": (TiedDeepSeekModel, deepseek_flavors),
}

__all__ = [
    "ExpertBank",
    "FAMILIES",
    "OlmoeAttention",
    "RoutingConfig",
    "TiedDeepSeekModel",
    "TiedDeepSeekModelArgs",
    "TiedMoE",
    "TiedMoEArgs",
    "TiedOlmoeModel",
    "TiedQwen3Model",
    "TiedQwen3ModelArgs",
    "banks_of",
    "deepseek_flavors",
    "loss_with_routing",
    "model_routing_loss",
    "olmoe_flavors",
    "qwen3_flavors",
    "routing_losses",
    "tie_experts",
]
