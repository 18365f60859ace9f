"""Optimizers for tied models: torchtitan's, plus bank learning-rate groups and a
per-layer expert-bias update.

* A bank shared by g layers receives the gradient of all g layers; ``[tying]
  bank_lr_scale`` optionally scales its learning rate by 1/sqrt(g) or 1/g. This is
  done with parameter groups, so the LR scheduler keeps the ratio at every step.
* torchtitan 0.2.2's aux-loss-free expert-bias hook stops at the first MoE layer
  without a coefficient; ours updates every layer that has a bias, each from its
  own token counts, whatever bank it reads.
* ``[optimizer] name = "Muon"`` trains matrices and banks with Muon and the rest with
  AdamW (``tiedmoe_titan.muon``); torchtitan 0.2.2 builds only Adam and AdamW.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, OptimizersInBackwardContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from .models.bank import banks_of
from .models.moe import tied_moe_layers
from .muon import MuonConfig, MuonOptimizersContainer

OPTIMIZER_NAMES = ("Adam", "AdamW", "Muon")


def bank_lr_scales(model: nn.Module) -> dict[nn.Parameter, float]:
    """Learning-rate multiplier of each bank parameter whose multiplier is not 1."""
    layout = model.model_args.tie_layout()
    scales = {}
    for bank in banks_of(model):
        scale = layout.lr_scale(layout.banks[bank.bank_index])
        if scale != 1.0:
            scales.update({p: scale for p in bank.parameters()})
    return scales


def split_bank_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Move bank parameters with an LR scale into their own groups (before any step),
    each a copy of the group it leaves (Muon or AdamW) at that group's LR x scale."""
    scales = bank_lr_scales(model)
    for group in list(optimizer.param_groups):
        by_scale: dict[float, list[nn.Parameter]] = defaultdict(list)
        for p in group["params"]:
            if p in scales:
                by_scale[scales[p]].append(p)
        group["params"] = [p for p in group["params"] if p not in scales]
        for scale, params in sorted(by_scale.items()):
            optimizer.add_param_group({**group, "params": params, "lr": group["lr"] * scale})


@torch.no_grad()
def update_expert_biases(model_parts: list[nn.Module], parallel_dims: ParallelDims) -> None:
    """Aux-loss-free load balancing (https://arxiv.org/abs/2408.15664), as torchtitan
    computes it, for every MoE layer that has an expert bias."""
    layers = [m for part in model_parts for m in tied_moe_layers(part) if m.load_balance_coeff is not None]
    if not layers:
        return
    counts = torch.vstack([m.tokens_per_expert for m in layers])
    # Counts are summed over the ranks that see different tokens (data and context parallel).
    loss_mesh = parallel_dims.get_optional_mesh("loss") if parallel_dims.dp_cp_enabled else None
    if loss_mesh is not None:
        if isinstance(counts, DTensor):
            counts = counts.redistribute(placements=[Replicate()] * counts.device_mesh.ndim).to_local()
        else:
            torch.distributed.all_reduce(counts, group=loss_mesh.get_group())
    for layer, layer_counts in zip(layers, counts.float()):
        delta = layer.load_balance_coeff * torch.sign(layer_counts.mean() - layer_counts)
        layer.expert_bias.add_(delta - delta.mean())
        layer.tokens_per_expert.zero_()


def build_tied_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    optimizers = _build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    if isinstance(optimizers, OptimizersInBackwardContainer):
        if any(bank_lr_scales(m) for m in model_parts):
            raise ValueError(
                "optimizer.early_step_in_backward = true cannot scale bank learning rates: "
                "set tying.bank_lr_scale = \"none\" or early_step_in_backward = false"
            )
    else:
        for model, optimizer in zip(model_parts, optimizers.optimizers):
            split_bank_param_groups(model, optimizer)
    optimizers.register_step_pre_hook(lambda *args, **kwargs: update_expert_biases(model_parts, parallel_dims))
    return optimizers


def _build_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None,
) -> OptimizersContainer:
    """torchtitan's optimizers, or Muon with AdamW for ``name = "Muon"``."""
    if optimizer_config.name != "Muon":  # (recipes' values were checked against domains.DOMAINS)
        return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    refusals = {
        "optimizer.early_step_in_backward = true": optimizer_config.early_step_in_backward,
        "fault tolerance (fault_tolerance.enable)": ft_manager is not None and ft_manager.enabled,
    }
    for what, refused in refusals.items():
        if refused:
            raise ValueError(f"{what} is not supported with optimizer.name = \"Muon\": turn it off or use AdamW")
    # A plain torchtitan job config has no [optimizer.muon]: the paper's defaults then.
    muon = getattr(optimizer_config, "muon", None) or MuonConfig()
    implementation = optimizer_config.implementation
    adamw_kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        "fused": implementation == "fused",
        "foreach": implementation == "foreach",
    }
    return MuonOptimizersContainer(model_parts, adamw_kwargs, muon)
